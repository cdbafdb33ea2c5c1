"""The SGLang server process, where its Python lives, and a typed client for its HTTP API."""

from .client import GenerateOutput, SGLangClient
from .process import SGLangServer
from .venv import ServerPython, find_server_python

__all__ = ["GenerateOutput", "SGLangClient", "SGLangServer", "ServerPython", "find_server_python"]
