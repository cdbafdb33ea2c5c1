"""The errors art_sglang raises. Each message names what went wrong and what to do about it."""

from __future__ import annotations


class ArtSGLangError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(ArtSGLangError, ValueError):
    """An invalid configuration value: names the field, the value and what is allowed."""

    def __init__(self, field: str, value: object, allowed: str) -> None:
        self.field = field
        self.value = value
        self.allowed = allowed
        super().__init__(f"{field}={value!r} is invalid: {allowed}")


class ServerNotInstalledError(ArtSGLangError):
    """No Python with SGLang was found for the server."""


class PortInUseError(ArtSGLangError):
    """An explicitly configured port is already taken."""


class _ServerLogError(ArtSGLangError):
    """An error that carries the tail of the server's log, appended to its message."""

    def __init__(self, message: str, log_tail: str = "") -> None:
        self.log_tail = log_tail
        if log_tail:
            message = f"{message}\n--- last lines of the server log ---\n{log_tail}"
        super().__init__(message)


class ServerStartError(_ServerLogError):
    """The server exited or did not become healthy in time; carries the tail of its log."""


class ServerUnreachableError(ArtSGLangError):
    """The server did not answer an admin call (it crashed, or is restarting)."""


class SGLangAPIError(ArtSGLangError):
    """An SGLang endpoint answered with an error; carries the server's own message."""

    def __init__(self, endpoint: str, status: int, message: str) -> None:
        self.endpoint = endpoint
        self.status = status
        self.server_message = message
        super().__init__(f"SGLang {endpoint} failed with HTTP {status}: {message}")


class CapabilityError(ArtSGLangError):
    """The server cannot do what was asked (refused here instead of crashing the server)."""


class ModelNotFoundError(ArtSGLangError):
    """A model directory is missing or incomplete."""


class TrajectoryError(ArtSGLangError, ValueError):
    """A trajectory cannot be trained on as given; the message names it and the fix."""


class TrainerCrashedError(ArtSGLangError):
    """A trainer worker died or failed; carries the tail of its log."""


class StepFailedError(ArtSGLangError):
    """A training step failed after its trajectories were saved; the policy and the trainer stay at the last
    published step, and the next train() starts from there."""


class PolicyMismatchError(ArtSGLangError):
    """The server and the trainer give different logprobs to the same tokens: SGLang serves this model differently
    from transformers, and training on its samples would be wrong."""


class LeaseError(ArtSGLangError):
    """A policy step cannot be served by its own weights (an adapter lease that cannot be granted)."""
