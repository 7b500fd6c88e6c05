"""Calls before their first request message: a time limit for it, a cap on the calls waiting
for it, and the health and reflection services on threads of their own.

gRPC's sync server gives a call a handler thread as soon as it opens and, for a unary call,
reads the request on that thread before any code of ours runs, with no time limit; a server-
streaming call the interceptors wrap (a health Watch) then holds its thread while it watches.
So calls that open and never send their message, or health watches, took every thread
(measured: 25 of either on a 20-thread server, and a health Check timed out). Here:

- every method is served request-streaming (the same on the wire: one message, then the
  client's half-close), and its first message is awaited for FIRST_MESSAGE_WAIT_S
  (LARGE_REQUEST_WAIT_S for methods whose request may hold megabytes of photographs); a call
  silent for longer is cancelled;
- at most `max_waiting` calls of each screening method wait for their first message at once,
  `max_waiting_per_caller` of them one caller's (its token), so one caller's silent calls do not
  take another's turn, nor silent streams model info's; more are refused at once
  (RESOURCE_EXHAUSTED);
- the other services (health, reflection) run on SIDE_THREADS threads of their own, so neither
  side can starve the other: a liveness probe is answered while screening calls fill the server,
  and probes cannot take a screening call's thread. Their requests are a few bytes sent with the
  call, so they wait SIDE_MESSAGE_WAIT_S for them; a health Watch keeps gRPC's non-blocking mode
  (no thread is held while it watches), and at most REFLECTION_STREAMS reflection streams are
  open at once, so open streams cannot hold every side thread either.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc

from ..errors import Cancelled, InvalidRequest
from ..service.screening import CallSlots
from .auth import principal_of
from .handlers import HandlerInterceptor

log = logging.getLogger(__name__)

FIRST_MESSAGE_WAIT_S = 10.0
# A ScreenImages request holds up to 64 photographs (tens of MiB): 32 MiB in 60 s is ~4.5 Mbit/s.
LARGE_REQUEST_WAIT_S = 60.0
SIDE_THREADS = 16
SIDE_MESSAGE_WAIT_S = 2.0
REFLECTION_STREAMS = 4


class CallAdmission(HandlerInterceptor):
    """The innermost interceptor: what it returns is always request-streaming, so the outer ones
    (errors, authentication) refuse a call without waiting for or reading its request."""

    def __init__(
        self, *, main_service: str, main_methods: tuple[str, ...], max_waiting: int, max_waiting_per_caller: int,
        large_requests: frozenset[str],
    ) -> None:
        self._main_prefix = f"/{main_service}/"
        self._large_requests = large_requests
        self._lock = threading.Lock()
        self._waiting = {
            name: CallSlots(noun=f"{name} calls", state="waiting for their first message", limit=max_waiting,
                            per_caller=max_waiting_per_caller, retry_after_s=1.0, caller_retry_after_s=1.0)
            for name in main_methods
        }
        self._reflection_streams = CallSlots(noun="reflection streams", state="open", limit=REFLECTION_STREAMS,
                                             per_caller=0, retry_after_s=1.0, caller_retry_after_s=1.0)
        self._side_threads = ThreadPoolExecutor(SIDE_THREADS, thread_name_prefix="acroscreen-side")

    def stop(self) -> None:
        self._side_threads.shutdown(wait=False, cancel_futures=True)

    def handler_for(self, handler: grpc.RpcMethodHandler, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        method = details.method
        caller = principal_of(details.invocation_metadata)
        if method.startswith(self._main_prefix):
            wait_s = LARGE_REQUEST_WAIT_S if method in self._large_requests else FIRST_MESSAGE_WAIT_S
            slots = self._waiting[method.removeprefix(self._main_prefix)]
            return _request_streaming(handler, _Admit(self._lock, slots, caller, wait_s), pool=None)
        if handler.request_streaming:  # reflection: a stream a client may hold open
            admit = _Admit(self._lock, self._reflection_streams, caller, SIDE_MESSAGE_WAIT_S, held_for_the_call=True)
        else:  # health: answered at once (a Watch by callback)
            admit = _Admit(self._lock, None, caller, SIDE_MESSAGE_WAIT_S)
        return _request_streaming(handler, admit, pool=self._side_threads)


class _Admit:
    """One call's admission: a slot (when `slots` are given) while it waits for its first message,
    or while the whole call runs, then that message."""

    def __init__(
        self, lock: threading.Lock, slots: CallSlots | None, caller: str, wait_s: float, *, held_for_the_call: bool = False
    ) -> None:
        self._lock, self._slots, self._caller = lock, slots, caller
        self._wait_s, self._held_for_the_call = wait_s, held_for_the_call

    @contextlib.contextmanager
    def _slot(self) -> Iterator[None]:
        if self._slots is None:
            yield
            return
        with self._lock:
            self._slots.take(self._caller)  # Overloaded when full
        try:
            yield
        finally:
            with self._lock:
                self._slots.give_back(self._caller)

    def for_the_call(self) -> contextlib.AbstractContextManager[None]:
        return self._slot() if self._held_for_the_call else contextlib.nullcontext()

    def argument(self, handler: grpc.RpcMethodHandler, requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
        """What the inner behaviour takes: its one request, or the requests again from the first."""
        with contextlib.nullcontext() if self._held_for_the_call else self._slot():
            first = self._first(requests, context)
        if handler.request_streaming:
            return requests if first is None else itertools.chain((first,), requests)
        if first is None:
            raise InvalidRequest("the call ended without its request message")
        return first

    def _first(self, requests: Iterator[Any], context: grpc.ServicerContext) -> Any | None:
        """The call's first message, or None when the caller half-closed without one; Cancelled when
        none came within the wait (the call is then cancelled) or the caller went away."""
        silent = threading.Event()

        def cancel() -> None:
            silent.set()
            context.cancel()

        timer = threading.Timer(self._wait_s, cancel)
        timer.daemon = True
        timer.start()
        try:
            first = next(requests, None)
        except grpc.RpcError:  # the call was cancelled while waiting
            first = None
        finally:
            timer.cancel()
        if silent.is_set():
            log.info("call cancelled: no request message within %.0f s", self._wait_s)
            raise Cancelled(f"no request message within {self._wait_s:.0f} s")
        if first is None and not context.is_active():
            raise Cancelled("the caller went away")
        return first


def _request_streaming(handler: grpc.RpcMethodHandler, admit: _Admit, pool: ThreadPoolExecutor | None) -> grpc.RpcMethodHandler:
    """The same method served request-streaming, its first message awaited under `admit`."""
    serializers = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
    if not handler.response_streaming:
        inner = handler.unary_unary or handler.stream_unary

        @functools.wraps(inner)
        def unary_response(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
            with admit.for_the_call():
                return inner(admit.argument(handler, requests, context), context)

        return grpc.stream_unary_rpc_method_handler(_on(pool, unary_response), **serializers)
    inner = handler.unary_stream or handler.stream_stream
    if getattr(inner, "experimental_non_blocking", False):  # a health Watch: answers by callback, holds no thread

        @functools.wraps(inner)
        def non_blocking(requests: Iterator[Any], context: grpc.ServicerContext, send_response_callback: Any) -> None:
            with admit.for_the_call():
                inner(admit.argument(handler, requests, context), context, send_response_callback)

        non_blocking.experimental_non_blocking = True  # gRPC then passes the callback, and holds no thread
        return grpc.stream_stream_rpc_method_handler(_on(pool, non_blocking), **serializers)

    @functools.wraps(inner)
    def streaming_response(requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
        with admit.for_the_call():
            yield from inner(admit.argument(handler, requests, context), context)

    return grpc.stream_stream_rpc_method_handler(_on(pool, streaming_response), **serializers)


def _on(pool: ThreadPoolExecutor | None, behaviour: Callable[..., Any]) -> Callable[..., Any]:
    if pool is not None:
        behaviour.experimental_thread_pool = pool  # gRPC runs the call on this pool, not the server's
    return behaviour
