"""The SGLang server process (or replicas of it, server/replicas.py), where its Python lives, and a typed client for
its HTTP API."""

from .client import GenerateOutput, SGLangClient
from .process import SGLangServer
from .replicas import ReplicaClient, ReplicaSet
from .venv import ServerPython, find_server_python

__all__ = [
    "GenerateOutput",
    "ReplicaClient",
    "ReplicaSet",
    "SGLangClient",
    "SGLangServer",
    "ServerPython",
    "find_server_python",
]
