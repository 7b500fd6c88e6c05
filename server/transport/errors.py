"""The one mapping from domain errors to gRPC status codes, applied by one interceptor.

Unexpected exceptions are logged with their traceback and reach the client as
INTERNAL with a fixed message (a grpc.RpcError, raised when the caller has gone, only as CANCELLED): raw exception text never leaves the server. Every failed call's
trailing metadata names its request id, refusals before the call was accepted included, so a
client can quote it and an operator find the call's log lines. Being the outermost
interceptor, it also opens each call's request-id scope (`logs.request_scope`; for a stream
`logs.request_scoped`), so that log line, and every other one logged for the call, names the call.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from ..errors import (
    AcroscreenError,
    Cancelled,
    InvalidRequest,
    ModelError,
    NotReady,
    Overloaded,
    Unauthenticated,
)
from ..logs import current_request_id, new_request_id, request_scope, request_scoped
from .handlers import HandlerInterceptor, behaviour_of, with_behaviour

log = logging.getLogger(__name__)

STATUS_CODES: dict[type[AcroscreenError], grpc.StatusCode] = {
    InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    NotReady: grpc.StatusCode.UNAVAILABLE,
    ModelError: grpc.StatusCode.INTERNAL,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    Cancelled: grpc.StatusCode.CANCELLED,  # the caller is gone: nobody reads it
}
RETRY_PUSHBACK_KEY = "grpc-retry-pushback-ms"
# Metadata naming the call in the server's logs, for an integrator to quote: initial metadata once
# a call is accepted (servicer), trailing metadata when it fails (here).
REQUEST_ID_KEY = "x-request-id"


def status_code(error: AcroscreenError) -> grpc.StatusCode:
    for kind in type(error).__mro__:
        if kind in STATUS_CODES:
            return STATUS_CODES[kind]
    return grpc.StatusCode.INTERNAL


def _abort(context: grpc.ServicerContext, error: Exception) -> None:
    trailing = [(REQUEST_ID_KEY, request_id)] if (request_id := current_request_id()) else []
    if isinstance(error, Overloaded) and error.retry_after_s is not None:
        trailing.append((RETRY_PUSHBACK_KEY, str(int(error.retry_after_s * 1000))))
    context.set_trailing_metadata(tuple(trailing))
    if isinstance(error, AcroscreenError):
        context.abort(status_code(error), str(error))
    if isinstance(error, grpc.RpcError):  # the server calls no one: this call's own end, its caller gone
        log.info("the caller went away")
        context.abort(grpc.StatusCode.CANCELLED, "the caller went away")
    log.exception("unexpected error in %s", type(error).__name__, exc_info=error)
    context.abort(grpc.StatusCode.INTERNAL, "internal server error")


class ErrorMappingInterceptor(HandlerInterceptor):
    def handler_for(self, handler: grpc.RpcMethodHandler, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        behaviour = behaviour_of(handler)
        if not handler.response_streaming:
            wrap = _wrap_unary
        elif getattr(behaviour, "experimental_non_blocking", False):
            wrap = _wrap_non_blocking
        else:
            wrap = _wrap_streaming
        wrapped = wrap(behaviour, request_streaming=handler.request_streaming)
        return with_behaviour(handler, wrapped, request_deserializer=_tolerant(handler.request_deserializer))


class _Malformed:
    """Stands for a request message that is not valid protobuf, so the call answers INVALID_ARGUMENT
    (grpc's own deserialization failure is INTERNAL, logged as an error) and a stream still gets
    its final result for the frames before it."""


MALFORMED = _Malformed()


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception:  # noqa: BLE001 — protobuf's DecodeError and anything a parser raises on bytes
            return MALFORMED

    return parse


def _well_formed(request: Any) -> Any:
    if request is MALFORMED:
        raise InvalidRequest("a request message that is not valid protobuf")
    return request


def _checked(requests: Iterator[Any]) -> Iterator[Any]:
    for request in requests:
        yield _well_formed(request)


def _argument(request: Any, *, request_streaming: bool) -> Any:
    return _checked(request) if request_streaming else _well_formed(request)


@contextlib.contextmanager
def _errors_mapped(context: grpc.ServicerContext) -> Iterator[None]:
    try:
        yield
    except Exception as error:  # noqa: BLE001 — every error is mapped here, once
        if _is_abort(error):
            raise
        _abort(context, error)


def _wrap_unary(behaviour: Callable[..., Any], *, request_streaming: bool) -> Callable[..., Any]:
    @functools.wraps(behaviour)  # keeps gRPC's experimental_* attributes (a thread pool of its own)
    def wrapped(request: Any, context: grpc.ServicerContext) -> Any:
        with request_scope(new_request_id()), _errors_mapped(context):
            return behaviour(_argument(request, request_streaming=request_streaming), context)

    return wrapped


def _wrap_non_blocking(behaviour: Callable[..., Any], *, request_streaming: bool) -> Callable[..., Any]:
    """A behaviour that answers through gRPC's callback and returns at once (a health Watch)."""

    @functools.wraps(behaviour)
    def wrapped(request: Any, context: grpc.ServicerContext, send_response_callback: Callable[[Any], None]) -> None:
        with request_scope(new_request_id()), _errors_mapped(context):
            behaviour(_argument(request, request_streaming=request_streaming), context, send_response_callback)

    return wrapped


def _wrap_streaming(behaviour: Callable[..., Iterator[Any]], *, request_streaming: bool) -> Callable[..., Iterator[Any]]:
    def mapped(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        with _errors_mapped(context):
            yield from behaviour(_argument(request, request_streaming=request_streaming), context)

    @functools.wraps(behaviour)
    def wrapped(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        return request_scoped(new_request_id(), mapped(request, context))

    return wrapped


def _is_abort(error: Exception) -> bool:
    """context.abort() raises a bare Exception after setting the status; let it through."""
    return type(error) is Exception
