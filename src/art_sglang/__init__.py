"""art-sglang: an SGLang backend for OpenPipe ART."""

from .config import DeviceConfig, SGLangConfig, TrainerConfig
from .errors import (
    ArtSGLangError,
    CapabilityError,
    ConfigError,
    LeaseError,
    ModelNotFoundError,
    PolicyMismatchError,
    PortInUseError,
    ServerNotInstalledError,
    ServerStartError,
    ServerUnreachableError,
    SGLangAPIError,
    StepFailedError,
    TrainerCrashedError,
    TrajectoryError,
)
from .server import SGLangClient, SGLangServer

__all__ = [
    "ArtSGLangError",
    "CapabilityError",
    "ConfigError",
    "LeaseError",
    "DeviceConfig",
    "ModelNotFoundError",
    "PolicyMismatchError",
    "PortInUseError",
    "SGLangAPIError",
    "SGLangClient",
    "SGLangBackend",
    "SGLangConfig",
    "SGLangServer",
    "ServerUnreachableError",
    "ServerNotInstalledError",
    "ServerStartError",
    "StepFailedError",
    "TrainerConfig",
    "TrainerCrashedError",
    "TrajectoryError",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    # Imported on first use: the backend imports ART (several seconds), which the CLI's set-up steps never need.
    if name == "SGLangBackend":
        from .backend import SGLangBackend

        return SGLangBackend
    raise AttributeError(f"module 'art_sglang' has no attribute {name!r}")
