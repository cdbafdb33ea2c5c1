"""The OpenAI-compatible gateway in front of the SGLang server (see gateway.py)."""

from .gateway import Gateway, GatewayError, Route

__all__ = ["Gateway", "GatewayError", "Route"]
