"""The SGLang server process (or replicas of it, server/replicas.py; or servers started elsewhere, server/external.py),
where its Python lives, and a typed client for its HTTP API."""

from .client import GenerateOutput, SGLangClient
from .external import ExternalServer
from .process import SGLangServer
from .replicas import ReplicaClient, ReplicaSet
from .venv import ServerPython, find_server_python

__all__ = [
    "ExternalServer",
    "GenerateOutput",
    "ReplicaClient",
    "ReplicaSet",
    "SGLangClient",
    "SGLangServer",
    "ServerPython",
    "find_server_python",
]
