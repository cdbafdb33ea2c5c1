"""art-sglang: an SGLang backend for OpenPipe ART."""

from .config import DeviceConfig, SGLangConfig
from .errors import (
    ArtSGLangError,
    CapabilityError,
    ConfigError,
    ModelNotFoundError,
    PortInUseError,
    ServerCrashedError,
    ServerNotInstalledError,
    ServerStartError,
    SGLangAPIError,
)
from .server import SGLangClient, SGLangServer

__all__ = [
    "ArtSGLangError",
    "CapabilityError",
    "ConfigError",
    "DeviceConfig",
    "ModelNotFoundError",
    "PortInUseError",
    "SGLangAPIError",
    "SGLangClient",
    "SGLangConfig",
    "SGLangServer",
    "ServerCrashedError",
    "ServerNotInstalledError",
    "ServerStartError",
]
__version__ = "0.1.0"
