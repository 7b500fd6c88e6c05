"""The one domain error family. The transport maps each class to a gRPC status
code in one place (transport/errors.py); nothing else inspects messages."""

from __future__ import annotations


class AcroscreenError(Exception):
    """Base of every error the service raises on purpose."""


class InvalidRequest(AcroscreenError):
    """The request or stream is malformed as a whole (e.g. frames before options)."""


class Overloaded(AcroscreenError):
    """A limit was reached; the caller may retry after `retry_after_s` (None: the same request
    would meet the same limit, so no retry hint is sent)."""

    def __init__(self, message: str, *, retry_after_s: float | None = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class NotReady(AcroscreenError):
    """The server is starting or draining and takes no new work."""


class ModelError(AcroscreenError):
    """The model could not be loaded or failed while running."""


INFERENCE_FAILED = "inference failed"
"""The whole detail a client gets for a frame whose model run raised an unexpected
exception: the exception itself is logged on the server, never sent."""


class Cancelled(AcroscreenError):
    """The caller went away or its deadline passed: the work was dropped and nobody reads an answer."""


class ConfigurationError(AcroscreenError):
    """The server's settings cannot work together (found at start, never sent to clients)."""


class Unauthenticated(AcroscreenError):
    """The caller gave no valid credentials."""
