"""The OpenAI-compatible gateway in front of the SGLang server or its replicas (see gateway.py)."""

from .gateway import Gateway, GatewayError, Route
from .upstreams import Upstreams

__all__ = ["Gateway", "GatewayError", "Route", "Upstreams"]
