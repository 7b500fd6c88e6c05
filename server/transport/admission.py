"""Calls before their first request message: a time limit for it, a cap on the calls that stay
silent, and the health and reflection services on threads of their own.

gRPC's sync server gives a call a handler thread as soon as it opens and, for a unary call,
reads the request on that thread before any code of ours runs, with no time limit; a server-
streaming call the interceptors wrap (a health Watch) then holds its thread while it watches.
So calls that open and never send their message, or health watches, took every thread
(measured: 25 of either on a 20-thread server, and a health Check timed out). Here:

- every method is served request-streaming (the same on the wire: one message, then the
  client's half-close), and its first message is awaited for FIRST_MESSAGE_WAIT_S
  (LARGE_REQUEST_WAIT_S for methods whose request may hold megabytes of photographs); a call
  silent for longer is cancelled;
- a call whose message has not come within GRACE_S is silent, and needs one of its method's
  `max_waiting` places (`max_waiting_per_caller` of them per caller, its token): with none free
  it is cancelled, and while they are all taken new calls of the method are refused at once
  (RESOURCE_EXHAUSTED). A message that comes at once takes no place, so calls at any
  concurrency are never refused for each other's reads;
- the other services (health, reflection) run on SIDE_THREADS threads of their own, so neither
  side can starve the other: a liveness probe is answered while screening calls fill the server,
  and probes cannot take a screening call's thread. Their requests are a few bytes sent with the
  call: silent after SIDE_GRACE_S, at most SILENT_SIDE_CALLS at once (SIDE_CALLS_PER_PEER from
  one address), each cancelled after SIDE_MESSAGE_WAIT_S. A health Watch keeps gRPC's
  non-blocking mode (no thread is held while it watches), its answers sent by one thread of
  their own (grpc_health sends under its lock, which a closing watch needs on gRPC's serving
  thread: sending there deadlocked a drain); at most REFLECTION_STREAMS reflection streams
  are open at once (REFLECTION_STREAMS_PER_PEER from one address).

Every time limit is kept by one watchdog thread, not a timer thread a call.
"""

from __future__ import annotations

import contextlib
import functools
import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc

from ..errors import Cancelled, InvalidRequest, Overloaded
from ..service.screening import CallSlots
from .auth import principal_of
from .handlers import HandlerInterceptor, behaviour_of, with_behaviour

log = logging.getLogger(__name__)

GRACE_S = 0.2
FIRST_MESSAGE_WAIT_S = 10.0
# A ScreenImages request holds up to 64 photographs (tens of MiB): 32 MiB in 60 s is ~4.5 Mbit/s.
LARGE_REQUEST_WAIT_S = 60.0
SIDE_THREADS = 16
SIDE_GRACE_S = 0.05
SIDE_MESSAGE_WAIT_S = 2.0
SILENT_SIDE_CALLS = 8
SIDE_CALLS_PER_PEER = 4
REFLECTION_STREAMS = 4
REFLECTION_STREAMS_PER_PEER = 2


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
        self._silent = {
            name: CallSlots(noun=f"{name} calls", state="waiting for their first message", limit=max_waiting,
                            per_caller=max_waiting_per_caller, retry_after_s=1.0, caller_retry_after_s=1.0)
            for name in main_methods
        }
        self._silent_side = CallSlots(noun="health or reflection calls", state="waiting for their first message",
                                      limit=SILENT_SIDE_CALLS, per_caller=SIDE_CALLS_PER_PEER, retry_after_s=1.0,
                                      caller_retry_after_s=1.0)
        self._reflection_streams = CallSlots(noun="reflection streams", state="open", limit=REFLECTION_STREAMS,
                                             per_caller=REFLECTION_STREAMS_PER_PEER, retry_after_s=1.0,
                                             caller_retry_after_s=1.0)
        self._side_threads = ThreadPoolExecutor(SIDE_THREADS, thread_name_prefix="acroscreen-side")
        self._watch_sender = ThreadPoolExecutor(1, thread_name_prefix="acroscreen-health-watch")
        self._watchdog = _Watchdog()

    def stop(self) -> None:
        self._watchdog.stop()
        self._side_threads.shutdown(wait=False, cancel_futures=True)
        self._watch_sender.shutdown(wait=False, cancel_futures=True)

    def handler_for(self, handler: grpc.RpcMethodHandler, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        method = details.method
        if method.startswith(self._main_prefix):
            principal = principal_of(details.invocation_metadata)
            wait_s = LARGE_REQUEST_WAIT_S if method in self._large_requests else FIRST_MESSAGE_WAIT_S
            slots = self._silent[method.removeprefix(self._main_prefix)]
            admit = _Admit(self._lock, self._watchdog, slots, lambda _context: principal, GRACE_S, wait_s)
            return _request_streaming(handler, admit, pool=None, sender=None)
        held = self._reflection_streams if handler.request_streaming else None  # reflection: a stream one may hold open
        admit = _Admit(self._lock, self._watchdog, self._silent_side, _peer_host, SIDE_GRACE_S, SIDE_MESSAGE_WAIT_S,
                       held_for_the_call=held)
        return _request_streaming(handler, admit, pool=self._side_threads, sender=self._watch_sender)


def _peer_host(context: grpc.ServicerContext) -> str:
    """The caller's address without its port ("ipv4:10.0.0.7:53122" → "ipv4:10.0.0.7")."""
    return context.peer().rsplit(":", 1)[0]


class _Admit:
    """How one method's calls are admitted: `silent` places for calls whose first message has not
    come within `grace_s`, a wait of `wait_s` at most for it, and `held_for_the_call` places, if
    any, taken for the whole call."""

    def __init__(
        self, lock: threading.Lock, watchdog: _Watchdog, silent: CallSlots,
        caller_of: Callable[[grpc.ServicerContext], str], grace_s: float, wait_s: float, *,
        held_for_the_call: CallSlots | None = None,
    ) -> None:
        self._lock, self.watchdog = lock, watchdog
        self._silent, self._held = silent, held_for_the_call
        self._caller_of, self.grace_s, self.wait_s = caller_of, grace_s, wait_s

    def place_silent(self, caller: str) -> None:
        self._take(self._silent, caller)

    def release_silent(self, caller: str) -> None:
        self._give_back(self._silent, caller)

    def _take(self, slots: CallSlots, caller: str) -> None:
        with self._lock:
            slots.take(caller)  # Overloaded when every place is taken

    def _give_back(self, slots: CallSlots, caller: str) -> None:
        with self._lock:
            slots.give_back(caller)

    @contextlib.contextmanager
    def for_the_call(self, context: grpc.ServicerContext) -> Iterator[None]:
        if self._held is None:
            yield
            return
        caller = self._caller_of(context)
        self._take(self._held, caller)
        try:
            yield
        finally:
            self._give_back(self._held, caller)

    def argument(self, handler: grpc.RpcMethodHandler, requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
        """What the inner behaviour takes: its one request, or the requests again from the first."""
        first = self._first(requests, context)
        if handler.request_streaming:
            return requests if first is None else itertools.chain((first,), requests)
        if first is None:
            raise InvalidRequest("the call ended without its request message")
        return first

    def _first(self, requests: Iterator[Any], context: grpc.ServicerContext) -> Any | None:
        """The call's first message, or None when the caller half-closed without one. Overloaded when
        the method's silent calls are all placed already; Cancelled when none came within the wait
        (the call is then cancelled), the call went silent with no place free, or the caller went away."""
        caller = self._caller_of(context)
        with self._lock:
            self._silent.check(caller)  # refused at once while every place is taken
        waiting = _Waiting(self, caller, context)
        waiting.timers.append(self.watchdog.after(self.grace_s, waiting.went_silent))
        try:
            first = next(requests, None)
        except grpc.RpcError:  # the call was cancelled while waiting
            first = None
        finally:
            waiting.finish()
        if waiting.refusal is not None:
            log.info("call cancelled: %s", waiting.refusal)
            raise Cancelled(str(waiting.refusal))
        if waiting.timed_out:
            log.info("call cancelled: no request message within %.0f s", self.wait_s)
            raise Cancelled(f"no request message within {self.wait_s:.0f} s")
        if first is None and not context.is_active():
            raise Cancelled("the caller went away")
        return first


class _Waiting:
    """One call's wait for its first message, ended by `finish()` or by the watchdog's actions."""

    def __init__(self, admit: _Admit, caller: str, context: grpc.ServicerContext) -> None:
        self._admit, self._caller, self._context = admit, caller, context
        self._lock = threading.Lock()
        self._done = False
        self._placed = False
        self.timers: list[_Timer] = []
        self.refusal: Overloaded | None = None
        self.timed_out = False

    def went_silent(self) -> None:
        with self._lock:
            if self._done:
                return
            try:
                self._admit.place_silent(self._caller)
                self._placed = True
            except Overloaded as refusal:
                self.refusal = refusal
            else:
                remaining = self._admit.wait_s - self._admit.grace_s
                self.timers.append(self._admit.watchdog.after(remaining, self.too_long))
                return
        self._context.cancel()

    def too_long(self) -> None:
        with self._lock:
            if self._done:
                return
            self.timed_out = True
        self._context.cancel()

    def finish(self) -> None:
        with self._lock:
            self._done = True
            placed, self._placed = self._placed, False
        for timer in self.timers:
            timer.cancel()
        if placed:
            self._admit.release_silent(self._caller)


class _Timer:
    __slots__ = ("due", "action")

    def __init__(self, due: float, action: Callable[[], None]) -> None:
        self.due, self.action = due, action

    def cancel(self) -> None:
        self.action = None  # skipped when its time comes


class _Watchdog:
    """One thread that runs each scheduled action when its time comes, unless cancelled first."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._due: list[tuple[float, int, _Timer]] = []
        self._order = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopped = False

    def after(self, delay_s: float, action: Callable[[], None]) -> _Timer:
        timer = _Timer(time.monotonic() + delay_s, action)
        with self._condition:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="acroscreen-watchdog", daemon=True)
                self._thread.start()
            heapq.heappush(self._due, (timer.due, next(self._order), timer))
            self._condition.notify()
        return timer

    def stop(self) -> None:
        with self._condition:
            self._stopped = True
            self._condition.notify()

    def _run(self) -> None:
        while True:
            with self._condition:
                while not self._stopped and (not self._due or self._due[0][0] > time.monotonic()):
                    self._condition.wait(self._due[0][0] - time.monotonic() if self._due else None)
                if self._stopped:
                    return
                _, _, timer = heapq.heappop(self._due)
            action = timer.action
            if action is not None:
                try:
                    action()
                except Exception:  # noqa: BLE001 — one call's failure must not stop every call's time limits
                    log.exception("a call's time limit could not be applied")


def _request_streaming(
    handler: grpc.RpcMethodHandler, admit: _Admit, pool: ThreadPoolExecutor | None, sender: ThreadPoolExecutor | None
) -> grpc.RpcMethodHandler:
    """The same method served request-streaming, its first message awaited under `admit`."""
    inner = behaviour_of(handler)
    if not handler.response_streaming:

        @functools.wraps(inner)
        def behaviour(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
            with admit.for_the_call(context):
                return inner(admit.argument(handler, requests, context), context)

    elif sender is not None and getattr(inner, "experimental_non_blocking", False):  # a health Watch

        @functools.wraps(inner)
        def behaviour(requests: Iterator[Any], context: grpc.ServicerContext, send_response_callback: Any) -> None:
            def send_later(response: Any) -> None:  # called under grpc_health's lock: never wait there
                with contextlib.suppress(RuntimeError):  # the sender is shut down: the server stopped, the call with it
                    sender.submit(send_response_callback, response)

            with admit.for_the_call(context):
                inner(admit.argument(handler, requests, context), context, send_later)

        behaviour.experimental_non_blocking = True  # gRPC then passes the callback, and holds no thread
    else:

        @functools.wraps(inner)
        def behaviour(requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
            with admit.for_the_call(context):
                yield from inner(admit.argument(handler, requests, context), context)

    return with_behaviour(handler, _on(pool, behaviour), request_deserializer=handler.request_deserializer,
                          request_streaming=True)


def _on(pool: ThreadPoolExecutor | None, behaviour: Callable[..., Any]) -> Callable[..., Any]:
    if pool is not None:
        behaviour.experimental_thread_pool = pool  # gRPC runs the call on this pool, not the server's
    return behaviour
