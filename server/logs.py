"""Structured JSON logs, one object a line. Never pixels, never a raw subject id:
streams are named by a request id and a short hash of the subject id.

Every call gets a request id (`request_scope`, opened by the transport for each call and sent
to the client as ``x-request-id`` initial metadata). It lives in a context variable, so any line
logged while serving that call carries it without being passed down, the service layer's
included: a stream's threads run in a copy of the opening call's context.
"""

from __future__ import annotations

import contextvars
import functools
import hashlib
import json
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TextIO, TypeVar

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}
T = TypeVar("T")
_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("acroscreen_request_id", default=None)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update({k: v for k, v in record.__dict__.items() if k not in _STANDARD})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class RequestIdFilter(logging.Filter):
    """Stamps a record with the request id of the call it was logged for, if any."""

    def filter(self, record: logging.LogRecord) -> bool:
        request_id = _request_id.get()
        if request_id is not None and not hasattr(record, "request_id"):
            record.request_id = request_id
        return True


def handler(json_format: bool, stream: TextIO | None = None) -> logging.Handler:
    """The server's log handler (stderr by default)."""
    result = logging.StreamHandler(stream)
    result.addFilter(RequestIdFilter())
    result.setFormatter(
        JsonFormatter() if json_format else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    return result


def configure(level: str, json_format: bool) -> None:
    root = logging.getLogger()
    root.handlers[:] = [handler(json_format)]
    root.setLevel(level.upper())


def new_request_id() -> str:
    return uuid.uuid4().hex[:12]


@contextmanager
def request_scope(request_id: str) -> Iterator[str]:
    """Lines logged in this context carry `request_id`. Only for code that enters and leaves it
    on one thread (a unary handler): a generator may be closed on another thread, where the
    reset fails and the id stays with the first thread; it uses `request_scoped`."""
    token = _request_id.set(request_id)
    try:
        yield request_id
    finally:
        _request_id.reset(token)


def request_scoped(request_id: str, steps: Iterator[T]) -> Iterator[T]:
    """`steps`, each step run in a context of its own holding `request_id`: the id never enters
    the context of the pool thread that runs or closes it, so nothing needs resetting there."""
    context = contextvars.copy_context()
    context.run(_request_id.set, request_id)
    try:
        while True:
            try:
                step = context.run(next, steps)
            except StopIteration:
                return
            yield step
    finally:
        close = getattr(steps, "close", None)
        if close is not None:
            context.run(close)


def in_this_call(target: Callable[[], T]) -> Callable[[], T]:
    """`target`, to run on another thread in a copy of this context: what it logs names this call."""
    return functools.partial(contextvars.copy_context().run, target)


def current_request_id() -> str | None:
    return _request_id.get()


def subject_hash(subject_id: str) -> str:
    """What logs say instead of the subject id."""
    if not subject_id:
        return "-"
    return hashlib.sha256(subject_id.encode()).hexdigest()[:12]
