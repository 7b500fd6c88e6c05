"""An asyncio client for the screening service (`grpc.aio`), beside the sync `ScreeningClient`.

Same options, results and errors as the sync client: `ScreenOptions`, the dataclasses of
`acroscreen.client.types`, and the exceptions of `acroscreen.client.errors` (the gRPC error is
the `__cause__`).

    async with AsyncScreeningClient("127.0.0.1:50051") as client:
        await client.wait_until_serving()
        async for event in client.screen_stream(frames, ScreenOptions(subject_id="S-17")):
            ...

`frames` may be an async iterable or a plain iterable. A plain iterable is advanced in a worker
thread, so a blocking source (decoding a video with PyAV, reading a webcam) never stalls the
event loop.

Known grpc.aio limitation (grpc/grpc#36066, open): when the server ends a stream with an error
while the client is still writing frames (a stream limit, a malformed frame), grpc.aio may report
INTERNAL "Internal error from Core" instead of the server's status. This client then raises
`ServerError` saying so, or `DeadlineExceededError` when the call's own `timeout_s` had run out
(the same loss strikes a deadline met while writing). A stream's refusals (a refused token, too many streams, bad options, the
model still loading, a draining server) come before the server accepts the stream, when no frame
is being written, so they keep the server's status, as do all unary calls; the sync client is not
affected.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Sequence
from typing import Any

import grpc
import grpc.aio
from acroscreen.v1 import screening_pb2 as pb
from acroscreen.v1 import screening_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from . import types
from .client import (
    ACCEPTANCE_WAIT_S,
    DEFAULT_MAX_MESSAGE_BYTES,
    KEEPALIVE_TIME_S,
    KEEPALIVE_TIMEOUT_S,
    Credentials,
    OneRequestPhotos,
    RetryPolicy,
    ScreenOptions,
    _AcceptanceDecision,
    channel_options,
    images_request,
    stream_failure,
)
from .errors import (
    AcroscreenClientError,
    DeadlineExceededError,
    ServerError,
    UnavailableError,
    from_rpc_error,
    request_id_of,
)
from .types import FrameData, ModelInfo, StreamEvent, SubjectResult
from .workers import (
    OWN_CONNECTION,
    TURN_HOLD_S,
    Placement,
    ServerAddress,
    ServerSet,
    StreamAcceptance,
    WorkerConnections,
    WorkerId,
    WorkerPool,
    WorkerSearch,
    check_spread_options,
    names_several_servers,
    servers_named,
    worker_of,
)

__all__ = ["AsyncScreeningClient"]

_END = object()


class AsyncScreeningClient:
    """Use as an async context manager. Failed calls raise `acroscreen.client.errors` exceptions.

    Takes what the sync `ScreeningClient` takes: `credentials` (TLS, mutual TLS, bearer token),
    `retry` (UNAVAILABLE retried with backoff only while nothing was sent, so a retry never drops
    or repeats a frame), the message limit and the keepalive settings. `options` are extra channel
    arguments, e.g. `[("grpc.lb_policy_name", "round_robin")]` with a `dns:///` target for
    client-side load balancing across the pods of a headless Kubernetes Service, and
    `spread_over_workers=True` spreads the calls over the worker processes of the server, or of
    every server a `dns:`/`ipv4:`/`ipv6:` target names, as the sync client does.
    """

    def __init__(
        self,
        target: str,
        *,
        timeout_s: float | None = None,
        credentials: Credentials = Credentials(),
        retry: RetryPolicy = RetryPolicy(),
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        keepalive_time_s: float = KEEPALIVE_TIME_S,
        keepalive_timeout_s: float = KEEPALIVE_TIMEOUT_S,
        options: Sequence[tuple[str, Any]] = (),
        spread_over_workers: bool = False,
    ) -> None:
        if spread_over_workers:
            check_spread_options(options)
        several_servers = spread_over_workers and names_several_servers(target)  # refuses a target it cannot look up
        self._timeout_s = timeout_s
        self._retry = retry
        self._max_message_bytes = max_message_bytes
        all_options = channel_options(max_message_bytes, keepalive_time_s, options, keepalive_timeout_s)
        secure = credentials.channel_credentials()

        def open_channel(*more: tuple[str, Any], to: str = target) -> grpc.aio.Channel:
            if secure is not None:
                return grpc.aio.secure_channel(to, secure, options=[*all_options, *more])
            return grpc.aio.insecure_channel(to, options=[*all_options, *more])

        self._target = target
        self._open_channel = open_channel
        self._channel = open_channel(OWN_CONNECTION) if spread_over_workers else open_channel()
        self._metadata = credentials.metadata()
        self._stub = pb_grpc.ScreeningStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._spread = spread_over_workers
        self._servers = ServerSet(self._channel, several=several_servers)
        self._search_lock = asyncio.Lock()
        self._stream_turn = asyncio.Lock()

    async def __aenter__(self) -> AsyncScreeningClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        for channel in self._servers.all():
            await channel.close()

    @contextlib.asynccontextmanager
    async def _placed(
        self, *, fresh_report: bool = False
    ) -> AsyncIterator[tuple[pb_grpc.ScreeningStub, Placement[grpc.aio.Channel] | None]]:
        """As the sync client's: on the least busy worker of every server when spreading, by a
        fresh report of the streams open on each worker with ``fresh_report``."""
        pools = await self._pools(fresh_report) if self._spread else []
        if not pools:
            yield self._stub, None
            return
        with self._servers.placed(pools) as placement:
            yield pb_grpc.ScreeningStub(placement.connection), placement

    @contextlib.asynccontextmanager
    async def _stream_placed(self) -> AsyncIterator[tuple[pb_grpc.ScreeningStub, StreamAcceptance[grpc.aio.Channel]]]:
        """As the sync client's: streams placed one at a time, each until its acceptance is called."""
        turn = None
        if self._spread:
            await self._stream_turn.acquire()
            turn = self._stream_turn.release
        acceptance = StreamAcceptance(self._servers, turn)
        hold = asyncio.get_running_loop().call_later(TURN_HOLD_S, acceptance.release) if turn is not None else None
        try:
            async with self._placed(fresh_report=True) as (stub, placement):
                acceptance.placement = placement
                yield stub, acceptance
        finally:
            if hold is not None:
                hold.cancel()
            acceptance.release()

    async def _pools(self, fresh_report: bool) -> list[WorkerPool[grpc.aio.Channel]]:
        """As the sync client's (one server not searched yet a call), asking the servers already
        searched for fresh reports all at once."""
        if self._servers.lookup_due:
            await self._look_up()
        servers = self._servers.usable()
        searched = [server for server in servers if server.pool is not None]
        found = await asyncio.gather(*(self._pool(server, fresh_report) for server in searched))
        pools = [pool for pool in found if pool is not None]
        for server in [server for server in servers if server not in searched]:
            if (pool := await self._pool(server, False)) is not None:  # a search reports as it goes
                pools.append(pool)
            if pools:
                break
        return pools

    async def _pool(self, server: WorkerConnections[grpc.aio.Channel], fresh_report: bool) -> WorkerPool[grpc.aio.Channel] | None:
        pool = await self._workers(server)
        if pool is not None and fresh_report:
            try:
                server.seen(await self._worker_behind(server.first))
            except grpc.aio.AioRpcError:
                if self._servers.failed(server):
                    return None
            pool = await self._workers(server)
        if pool is None:
            self._servers.failed(server)
        return pool

    async def _look_up(self) -> None:
        async with self._search_lock:
            if self._servers.lookup_due:
                addresses = await asyncio.to_thread(servers_named, self._target)
                for channel in self._servers.looked_up(addresses or [], self._connect):
                    await channel.close()

    def _connect(self, address: ServerAddress | None) -> grpc.aio.Channel:
        if address is None:
            return self._open_channel(OWN_CONNECTION)
        return self._open_channel(OWN_CONNECTION, *address.channel_options(), to=address.target)

    async def _workers(self, server: WorkerConnections[grpc.aio.Channel]) -> WorkerPool[grpc.aio.Channel] | None:
        """As the sync client's: a server's worker connections, searched for at its first call."""
        async with self._search_lock:
            if (pool := server.pool) is not None:
                return pool
            try:
                search = WorkerSearch(server.first, await self._worker_behind(server.first))
            except grpc.aio.AioRpcError:
                return None
            while not search.done:
                channel = self._connect(server.address)
                try:
                    kept = search.offer(channel, await self._worker_behind(channel))
                except grpc.aio.AioRpcError:
                    kept = search.offer(channel, None)
                if not kept:
                    await channel.close()
            return server.found(search.pool())

    async def _worker_behind(self, channel: grpc.aio.Channel) -> WorkerId | None:
        call = pb_grpc.ScreeningStub(channel).GetModelInfo(
            pb.GetModelInfoRequest(), timeout=self._timeout_s or 5.0, metadata=self._metadata
        )
        await call
        return worker_of(await call.initial_metadata())

    async def screen_stream(
        self, frames: Iterable[FrameData] | AsyncIterable[FrameData], options: ScreenOptions = ScreenOptions()
    ) -> AsyncIterator[StreamEvent]:
        """Stream frames; yields frame acks (when asked for), each frame's result and subject
        updates, the FINAL result last. Leaving the `async for` early cancels the call.

        As in the sync client, no frame is taken from `frames` before the server has accepted the
        stream (its initial metadata): UNAVAILABLE before that is retried with backoff, a failure
        after it is raised, so no frame is ever lost or sent twice. A server that sends no early
        metadata (older than this client) gets the frames after `ACCEPTANCE_WAIT_S`. An exception
        raised by `frames` cancels the call and is raised as it is, not retried."""
        source = _aiter(frames)
        last_subject: SubjectResult | None = None
        for attempt in range(self._retry.attempts):
            gate = _AcceptanceGate()
            async with self._stream_placed() as (stub, acceptance):
                deadline = time.monotonic() + self._timeout_s if self._timeout_s else None
                call = stub.ScreenStream(gate.requests(options, source), timeout=self._timeout_s, metadata=self._metadata)
                try:
                    accepted = await call.initial_metadata()  # empty when the call ended without being accepted
                    acceptance(accepted)
                    if accepted:
                        gate.accept()
                    async for response in call:
                        event = types.stream_event(response)
                        if isinstance(event, SubjectResult):
                            last_subject = event
                        yield event
                    return
                except grpc.aio.AioRpcError as error:
                    if gate.source_error is None:
                        failure = stream_failure(
                            _client_error(error, deadline), gate.close(), attempt + 1 < self._retry.attempts, last_subject
                        )
                        if failure is not None:
                            raise failure from error
                except asyncio.CancelledError:  # what a read raises once the source's failure cancelled the call
                    if gate.source_error is None or _cancelled_by_its_owner():
                        raise
                finally:
                    call.cancel()  # a no-op once the call has ended
                    gate.close()
            if gate.source_error is not None:
                raise gate.source_error
            await self._backoff(attempt)

    async def screen(
        self,
        frames: Iterable[FrameData] | AsyncIterable[FrameData],
        options: ScreenOptions = ScreenOptions(),
        on_event: Callable[[StreamEvent], None] | None = None,
    ) -> SubjectResult:
        """Stream frames and return the final subject result."""
        final: SubjectResult | None = None
        async for event in self.screen_stream(frames, options):
            if on_event is not None:
                on_event(event)
            if isinstance(event, SubjectResult):
                final = event
        if final is None or final.status not in ("final", "insufficient_evidence"):
            raise ServerError("the stream ended without a final subject result")
        return final

    async def screen_photos(
        self,
        photos: Iterable[FrameData] | AsyncIterable[FrameData],
        options: ScreenOptions = ScreenOptions(),
        on_event: Callable[[StreamEvent], None] | None = None,
    ) -> SubjectResult:
        """As the sync client's: one ScreenImages request when the photos fit one, else a stream of
        still images, read from `photos` as they are sent."""
        options = dataclasses.replace(options, still_images=True)
        batch = OneRequestPhotos(self._max_message_bytes)
        source = _aiter(photos)
        async for photo in source:
            if not batch.add(photo):
                return await self.screen(_then(batch.photos, source), options, on_event)
        return await self.screen_images(batch.photos, options)

    async def screen_images(
        self, images: Iterable[FrameData] | AsyncIterable[FrameData], options: ScreenOptions = ScreenOptions()
    ) -> SubjectResult:
        """A few photographs of one subject in one request (at most the message limit in all:
        InvalidRequestError before sending otherwise); the final subject result."""
        request = images_request([image async for image in _aiter(images)], options, self._max_message_bytes)
        return types.subject_result(await self._unary(lambda stub: stub.ScreenImages, request))

    async def model_info(self) -> ModelInfo:
        return types.model_info(await self._unary(lambda stub: stub.GetModelInfo, pb.GetModelInfoRequest()))

    async def _unary(self, method: Callable[[pb_grpc.ScreeningStub], Callable[..., Any]], request: object) -> Any:
        """Unary calls are idempotent here: UNAVAILABLE is retried with backoff."""
        for attempt in range(self._retry.attempts):
            try:
                async with self._placed() as (stub, _):
                    return await method(stub)(request, timeout=self._timeout_s, metadata=self._metadata)
            except grpc.aio.AioRpcError as error:
                if error.code() == grpc.StatusCode.UNAVAILABLE and attempt + 1 < self._retry.attempts:
                    await self._backoff(attempt)
                    continue
                raise _client_error(error) from error
        raise AssertionError("unreachable")

    async def _backoff(self, attempt: int) -> None:
        delay = min(self._retry.max_backoff_s, self._retry.initial_backoff_s * 2**attempt)
        await asyncio.sleep(delay * (0.5 + random.random() / 2))

    async def health(self, service: str = "") -> str:
        """SERVING, NOT_SERVING, … as the server's health service reports it."""
        try:
            response = await self._health.Check(
                health_pb2.HealthCheckRequest(service=service),
                timeout=self._timeout_s or 5.0,
                metadata=self._metadata,
            )
        except grpc.aio.AioRpcError as error:
            raise _client_error(error) from error
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    async def wait_until_serving(self, timeout_s: float = 30.0) -> None:
        """Wait until health says SERVING (the model is loaded and warmed up)."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if await self.health() == "SERVING":
                    return
            except AcroscreenClientError:
                pass
            if time.monotonic() >= deadline:
                raise UnavailableError(f"server not SERVING after {timeout_s:.0f} s")
            await asyncio.sleep(0.2)


class _AcceptanceGate(_AcceptanceDecision):
    """Holds a stream's frames back until the server has accepted it, or ACCEPTANCE_WAIT_S passed
    (a server older than the acceptance signal): the request iterator sends the options, then
    waits, after they were written, for the decision, and only if the gate opened takes frames
    from the source."""

    def __init__(self) -> None:
        self._decided = asyncio.Event()
        super().__init__(self._decided.set)
        self.source_error: Exception | None = None

    async def requests(self, options: ScreenOptions, source: AsyncIterator[FrameData]) -> AsyncIterator[pb.ScreenRequest]:
        yield pb.ScreenRequest(options=options.message())
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._decided.wait(), ACCEPTANCE_WAIT_S)
        if not self._decide(opened=True):  # still undecided after the wait: an older server, open
            return
        while True:
            try:
                request = pb.ScreenRequest(frame=types.frame_message(await anext(source)))
            except StopAsyncIteration:
                return
            except Exception as error:
                # The source failed (a camera that will not open, a corrupt video): kept for
                # screen_stream to raise, and raised on to grpc.aio, which cancels the call (a
                # half-close would get a FINAL result for the frames sent so far).
                self.source_error = error
                raise
            yield request


def _cancelled_by_its_owner() -> bool:
    """Whether the current task itself is being cancelled (Python 3.11+; on 3.10 it cannot tell, and
    a source that failed at that very moment is raised in the cancellation's place)."""
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)
    return bool(cancelling and cancelling())


async def _then(first: list[FrameData], rest: AsyncIterator[FrameData]) -> AsyncIterator[FrameData]:
    for frame in first:
        yield frame
    async for frame in rest:
        yield frame


async def _aiter(frames: Iterable[FrameData] | AsyncIterable[FrameData]) -> AsyncIterator[FrameData]:
    """An async view of frames; a blocking iterable is advanced in a worker thread."""
    if isinstance(frames, AsyncIterable):
        async for frame in frames:
            yield frame
        return
    if isinstance(frames, (list, tuple)):
        for frame in frames:
            yield frame
        return
    iterator = iter(frames)
    while True:
        frame = await asyncio.to_thread(next, iterator, _END)
        if frame is _END:
            return
        yield frame


class _CallView(grpc.RpcError, grpc.Call):
    """An `AioRpcError` seen as a sync `grpc.Call`, so the sync client's code→exception mapping
    (and its retry-pushback reading) applies unchanged."""

    def __init__(self, error: grpc.aio.AioRpcError) -> None:
        super().__init__()
        self._error = error

    def code(self) -> grpc.StatusCode:
        return self._error.code()

    def details(self) -> str | None:
        return self._error.details()

    def initial_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        return tuple(self._error.initial_metadata() or ())

    def trailing_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        return tuple(self._error.trailing_metadata() or ())

    def is_active(self) -> bool:
        return False

    def time_remaining(self) -> float | None:
        return None

    def cancel(self) -> bool:
        return False

    def add_callback(self, callback: Callable[[], None]) -> bool:
        return False


# grpc.aio (grpc/grpc#36066): when the server ends a stream while a frame is being written, the
# failed write may replace the server's status with this one.
_LOST_STATUS_DETAILS = "Internal error from Core"


def _client_error(error: grpc.aio.AioRpcError, deadline: float | None = None) -> AcroscreenClientError:
    """``deadline``: when the call's own timeout ran out (monotonic), for a stream whose status grpc.aio lost."""
    if error.code() == grpc.StatusCode.INTERNAL and error.details() == _LOST_STATUS_DETAILS:
        request_id = request_id_of(_CallView(error))
        named = f" (request id {request_id})" if request_id else ""
        failure: AcroscreenClientError
        if deadline is not None and time.monotonic() >= deadline:  # the client's own deadline, not the server
            failure = DeadlineExceededError(
                "DEADLINE_EXCEEDED: the stream ran past the client's timeout_s (grpc.aio reported it as INTERNAL,"
                f" grpc/grpc#36066){named}",
                grpc.StatusCode.DEADLINE_EXCEEDED,
            )
        else:
            failure = ServerError(
                "INTERNAL: the server ended the stream while a frame was being sent, and grpc.aio lost its status"
                f" (grpc/grpc#36066); the server's logs say why (often a limit: retry after a pause){named}",
                grpc.StatusCode.INTERNAL,
            )
        failure.request_id = request_id
        return failure
    return from_rpc_error(_CallView(error))
