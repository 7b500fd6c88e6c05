"""A small typed client for the screening service (sync, gRPC)."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from acroscreen.v1 import screening_pb2 as pb
from acroscreen.v1 import screening_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from . import types
from .errors import AcroscreenClientError, InvalidRequestError, ServerError, UnavailableError, from_rpc_error
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

DEFAULT_MAX_MESSAGE_BYTES = 8 * 1024 * 1024
# What a request's framing (its options, each image's fields) may add to its images' bytes.
REQUEST_FRAMING_BYTES = 64 * 1024
# A few photos go in one ScreenImages request; more, or larger ones (a handful of phone photos of
# 3-7 MB each exceed the 8 MiB message limit), go as a stream of still images, a message a photo.
IMAGES_PER_REQUEST = 32


@dataclass(frozen=True, slots=True, kw_only=True)
class ScreenOptions:
    """Per-subject options; zeros mean the server's defaults (see the .proto)."""

    subject_id: str = ""
    max_analyzed_frames: int = 0
    min_analysis_interval_ms: int = 0
    analyze_every_frame: bool = False
    update_every_frames: int = 0
    acknowledge_frames: bool = False
    still_images: bool = False  # each frame a separate photograph: all analysed, whatever the rate settings

    def message(self) -> pb.SessionOptions:
        return pb.SessionOptions(
            subject_id=self.subject_id,
            max_analyzed_frames=self.max_analyzed_frames,
            min_analysis_interval_ms=self.min_analysis_interval_ms,
            analyze_every_frame=self.analyze_every_frame,
            update_every_frames=self.update_every_frames,
            acknowledge_frames=self.acknowledge_frames,
            still_images=self.still_images,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Credentials:
    """TLS and token settings. With `tls_ca` (or `tls=True` for the system roots) the
    channel is encrypted; `tls_cert`/`tls_key` add a client certificate (mutual TLS)."""

    tls: bool = False
    tls_ca: bytes | None = None
    tls_cert: bytes | None = None
    tls_key: bytes | None = None
    token: str | None = None

    @classmethod
    def from_files(
        cls,
        *,
        tls_ca: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        token_file: str | None = None,
    ) -> Credentials:
        def read(path: str | None) -> bytes | None:
            return Path(path).read_bytes() if path else None

        token = Path(token_file).read_text().strip() if token_file else None
        return cls(
            tls=tls_ca is not None or tls_cert is not None,
            tls_ca=read(tls_ca),
            tls_cert=read(tls_cert),
            tls_key=read(tls_key),
            token=token or None,
        )

    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        """TLS credentials for the channel, or None for plaintext."""
        if not self.tls:
            return None
        return grpc.ssl_channel_credentials(
            root_certificates=self.tls_ca, private_key=self.tls_key, certificate_chain=self.tls_cert
        )

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """Per-call metadata: the bearer token, if any."""
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()


# Keepalive, matching the server's defaults (server/config.py: keepalive_time_s, keepalive_timeout_s).
# The server takes a ping without data at most every keepalive_time_s / 2
# (server/transport/server.py: min_client_ping_interval_ms) and answers more frequent ones with
# GOAWAY "too_many_pings", which ends every call on the connection: never ping more often.
KEEPALIVE_TIME_S = 30.0
KEEPALIVE_TIMEOUT_S = 10.0

# The server reads messages up to this many times its message limit (server/transport/server.py:
# OVERSIZE_READ_FACTOR), so that it rejects a frame over the limit by itself. ScreenImages requests
# are still refused over 1× before sending (`images_request`).
OVERSIZE_SEND_FACTOR = 4


def channel_options(
    max_message_bytes: int,
    keepalive_time_s: float = KEEPALIVE_TIME_S,
    extra: Sequence[tuple[str, Any]] = (),
    keepalive_timeout_s: float = KEEPALIVE_TIMEOUT_S,
) -> list[tuple[str, Any]]:
    """Message limits and a keepalive policy that match the server's, plus caller options
    (e.g. ("grpc.lb_policy_name", "round_robin") with a dns:/// target). Messages up to
    OVERSIZE_SEND_FACTOR × the limit are sent: the server reads them and answers a frame over the
    limit REJECTED (too_large), its stream going on, where gRPC's send limit ended the whole call."""
    return [
        ("grpc.max_send_message_length", max_message_bytes * OVERSIZE_SEND_FACTOR),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", int(keepalive_time_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(keepalive_timeout_s * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        *extra,
    ]


def images_request(images: Iterable[FrameData], options: ScreenOptions, max_message_bytes: int) -> pb.ScreenImagesRequest:
    """One ScreenImages request, refused before sending when it exceeds the message limit (which
    gRPC would report as RESOURCE_EXHAUSTED, as if the server were busy): a few phone photos of
    3-7 MB each already do; `screen_photos` sends such sets as a stream, a message a photo."""
    request = pb.ScreenImagesRequest(options=options.message(), images=[types.frame_message(image) for image in images])
    size = request.ByteSize()
    if size > max_message_bytes:
        raise InvalidRequestError(
            f"the images come to {size} bytes in one request, over the {max_message_bytes}-byte message limit: "
            "send them as a stream (screen) instead, or in smaller groups"
        )
    return request


class OneRequestPhotos:
    """Photos taken one by one while they fit one ScreenImages request (at most
    IMAGES_PER_REQUEST, within the message limit): the choice between that request and a
    stream, made by both clients' `screen_photos` while reading at most one photo too many."""

    def __init__(self, max_message_bytes: int) -> None:
        self.photos: list[FrameData] = []
        self._room = max_message_bytes - REQUEST_FRAMING_BYTES

    def add(self, photo: FrameData) -> bool:
        """Takes the photo; False once the photos taken no longer fit one request."""
        self.photos.append(photo)
        self._room -= len(photo.data)
        return len(self.photos) <= IMAGES_PER_REQUEST and self._room >= 0


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """Retries of UNAVAILABLE before anything was sent, with exponential backoff."""

    attempts: int = 4
    initial_backoff_s: float = 0.2
    max_backoff_s: float = 3.0


# How long a stream's frames wait for the server to accept it (its initial metadata), counted from
# when the options were written. A server older than that signal sends no metadata before its first
# answer, which needs a frame: after this wait the frames go anyway, as they did before the signal,
# and a failure from then on is raised, never retried. A current server accepts or refuses at once.
ACCEPTANCE_WAIT_S = 3.0


class _AcceptanceDecision:
    """Whether a stream's gate opened (frames may go) or closed (none will), decided once by
    whichever comes first: the server's acceptance (`accept`), the caller giving the call up
    (`close`), or the acceptance wait running out. `wake` wakes the waiting request iterator;
    the sync and async gates differ only in what they wait on."""

    def __init__(self, wake: Callable[[], None]) -> None:
        self._lock = threading.Lock()
        self._wake = wake
        self._opened: bool | None = None

    def accept(self) -> None:
        self._decide(opened=True)

    def close(self) -> bool:
        """No frame is taken from now on; True if the gate had already opened (frames may have gone)."""
        return self._decide(opened=False)

    def _decide(self, *, opened: bool) -> bool:
        with self._lock:
            if self._opened is None:
                self._opened = opened
            self._wake()
            return self._opened


class _AcceptanceGate(_AcceptanceDecision):
    """Holds a stream's frames back until the server has accepted it, or ACCEPTANCE_WAIT_S passed.

    gRPC pulls requests on a thread of its own, the next one only once the last was written; this
    request iterator sends the options, then waits until the decision (the lock makes it certain
    for `close()`'s caller whether a frame may have been taken), and only if the gate opened takes
    frames from the source.
    """

    def __init__(self) -> None:
        self._decided = threading.Event()
        super().__init__(self._decided.set)
        self.source_error: Exception | None = None
        self._call: grpc.Call | None = None
        self._started = threading.Event()

    def start(self, call: grpc.Call) -> None:
        """The call the requests go to: one the source's failure cancels."""
        self._call = call
        self._started.set()

    def requests(self, options: ScreenOptions, source: Iterator[FrameData]) -> Iterator[pb.ScreenRequest]:
        yield pb.ScreenRequest(options=options.message())
        self._decided.wait(ACCEPTANCE_WAIT_S)
        if not self._decide(opened=True):  # still undecided after the wait: an older server, open
            return
        while True:
            try:
                request = pb.ScreenRequest(frame=types.frame_message(next(source)))
            except StopIteration:
                return
            except Exception as error:  # noqa: BLE001 — the caller's, raised to the caller by screen_stream
                # The source failed (a camera that will not open, a corrupt video): the call is
                # cancelled, not half-closed, which would get a FINAL result for the frames sent so
                # far. Raised here, gRPC would log it and end the call UNKNOWN in its place.
                self.source_error = error
                self._started.wait()
                self._call.cancel()  # type: ignore[union-attr]
                return
            yield request


def stream_failure(
    error: AcroscreenClientError, frames_may_have_gone: bool, attempts_left: bool, last_subject: SubjectResult | None
) -> AcroscreenClientError | None:
    """What a failed stream attempt raises; None when it is retried (UNAVAILABLE before any frame went).
    The error carries the last non-provisional subject result the server sent, so none is lost."""
    if error.code == grpc.StatusCode.UNAVAILABLE and not frames_may_have_gone and attempts_left:
        return None
    error.final_result = last_subject if last_subject and last_subject.status != "provisional" else None
    return error


class ScreeningClient:
    """Use as a context manager. Failed calls raise `acroscreen.client.errors` exceptions.

    `spread_over_workers=True` (for servers run with `--workers N`): the client opens a
    connection to each worker process and places every call on the one with the fewest streams
    open, every client's, as the server reports them (`acroscreen.client.workers`); otherwise
    all its calls share one connection, which the server's kernel hands to a single worker. With
    a target that names several servers (`dns:///name:port`, looked up every 30 s, e.g. the pods
    of a headless Kubernetes Service; `ipv4:a:p,b:p`) that is over every worker of every server.
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

        def open_channel(*more: tuple[str, Any], to: str = target) -> grpc.Channel:
            if secure is not None:
                return grpc.secure_channel(to, secure, options=[*all_options, *more])
            return grpc.insecure_channel(to, options=[*all_options, *more])

        self._target = target
        self._open_channel = open_channel
        self._channel = open_channel(OWN_CONNECTION) if spread_over_workers else open_channel()
        self._metadata = credentials.metadata()
        self._stub = pb_grpc.ScreeningStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._spread = spread_over_workers
        self._servers = ServerSet(self._channel, several=several_servers)
        self._search_lock = threading.Lock()
        self._stream_turn = threading.Lock()

    def __enter__(self) -> ScreeningClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        for channel in self._servers.all():
            channel.close()

    @contextlib.contextmanager
    def _placed(self, *, fresh_report: bool = False) -> Iterator[tuple[pb_grpc.ScreeningStub, Placement[grpc.Channel] | None]]:
        """The stub for one call and, when spreading, its placement on the least busy worker of
        every server the target names.

        ``fresh_report``: first ask each server for the streams open on each of its workers. A
        stream stays for minutes, and this client's last report is as old as its last call: other
        clients have placed streams since, and placed on it alone, streams piled up on some workers.
        """
        pools = self._pools(fresh_report) if self._spread else []
        if not pools:  # no server answers: the call goes to the target as given, and fails or retries there
            yield self._stub, None
            return
        with self._servers.placed(pools) as placement:
            yield pb_grpc.ScreeningStub(placement.connection), placement

    @contextlib.contextmanager
    def _stream_placed(self) -> Iterator[tuple[pb_grpc.ScreeningStub, StreamAcceptance[grpc.Channel]]]:
        """A stream's stub (placed by a fresh report when spreading), and what to call with the
        stream's initial metadata. A spreading client places its streams one at a time, each once
        the server accepted the one before (or it failed, or TURN_HOLD_S passed): a report asked for
        meanwhile may or may not count the stream being accepted, and streams placed on it crowd
        some workers."""
        turn = self._stream_turn.release if self._spread and self._stream_turn.acquire() else None
        acceptance = StreamAcceptance(self._servers, turn)
        hold = None
        if turn is not None:
            hold = threading.Timer(TURN_HOLD_S, acceptance.release)
            hold.daemon = True
            hold.start()
        try:
            with self._placed(fresh_report=True) as (stub, placement):
                acceptance.placement = placement
                yield stub, acceptance
        finally:
            if hold is not None:
                hold.cancel()
            acceptance.release()

    def _pools(self, fresh_report: bool) -> list[WorkerPool[grpc.Channel]]:
        """The worker pool of each server that answers, its streams freshly reported if asked.
        A call searches one server not searched yet (more only while none answers), so the first
        stream to a large cluster does not wait for a search of every pod."""
        if self._servers.lookup_due:
            self._look_up()
        pools: list[WorkerPool[grpc.Channel]] = []
        searched = False
        for server in self._servers.usable():
            unsearched = server.pool is None
            if unsearched:
                if searched and pools:
                    continue
                searched = True
            pool = self._workers(server)
            if pool is not None and fresh_report and not unsearched:  # a search reports as it goes
                try:
                    server.seen(self._worker_behind(server.first))
                except grpc.RpcError:  # one of several: the others take the call; the only one: its last report
                    if self._servers.failed(server):
                        continue
                pool = self._workers(server)  # searched again if that reached another server run
            if pool is not None:
                pools.append(pool)
            else:
                self._servers.failed(server)
        return pools

    def _look_up(self) -> None:
        """The servers a `dns:` name has now (a headless Service's pods), once per RESOLVE_INTERVAL_S."""
        with self._search_lock:
            if self._servers.lookup_due:
                for channel in self._servers.looked_up(servers_named(self._target) or [], self._connect):
                    channel.close()

    def _connect(self, address: ServerAddress | None) -> grpc.Channel:
        """A connection of its own to one server of several, or to the target as given (None)."""
        if address is None:
            return self._open_channel(OWN_CONNECTION)
        return self._open_channel(OWN_CONNECTION, *address.channel_options(), to=address.target)

    def _workers(self, server: WorkerConnections[grpc.Channel]) -> WorkerPool[grpc.Channel] | None:
        """A server's connections to its workers, searched for at its first call (again after a
        restart); None while it does not answer."""
        with self._search_lock:
            if (pool := server.pool) is not None:
                return pool
            try:
                search = WorkerSearch(server.first, self._worker_behind(server.first))
            except grpc.RpcError:
                return None
            while not search.done:
                channel = self._connect(server.address)
                try:
                    kept = search.offer(channel, self._worker_behind(channel))
                except grpc.RpcError:
                    kept = search.offer(channel, None)
                if not kept:
                    channel.close()
            return server.found(search.pool())

    def _worker_behind(self, channel: grpc.Channel) -> WorkerId | None:
        _, call = pb_grpc.ScreeningStub(channel).GetModelInfo.with_call(
            pb.GetModelInfoRequest(), timeout=self._timeout_s or 5.0, metadata=self._metadata
        )
        return worker_of(call.initial_metadata())

    def screen_stream(self, frames: Iterable[FrameData], options: ScreenOptions = ScreenOptions()) -> Iterator[StreamEvent]:
        """Stream frames; yields each frame's result and subject updates, the FINAL result last.

        No frame is taken from `frames` before the server has accepted the stream (its initial
        metadata), so UNAVAILABLE before that (no server yet, model still loading, draining) is
        retried with backoff without losing or repeating a frame. A failure after that is raised,
        never retried: the caller knows exactly which frames it got results for. A server that
        sends no early metadata (older than this client) gets the frames after ACCEPTANCE_WAIT_S.
        An exception raised by `frames` cancels the call and is raised as it is, not retried.
        """
        source = iter(frames)
        last_subject: SubjectResult | None = None
        for attempt in range(self._retry.attempts):
            gate = _AcceptanceGate()
            with self._stream_placed() as (stub, acceptance):
                call = stub.ScreenStream(gate.requests(options, source), timeout=self._timeout_s, metadata=self._metadata)
                gate.start(call)
                try:
                    accepted = call.initial_metadata()  # empty when the call ended without being accepted
                    acceptance(accepted)
                    if accepted:
                        gate.accept()
                    for response in call:
                        event = types.stream_event(response)
                        if isinstance(event, SubjectResult):
                            last_subject = event
                        yield event
                    return
                except grpc.RpcError as error:
                    if gate.source_error is None:
                        failure = stream_failure(
                            from_rpc_error(error), gate.close(), attempt + 1 < self._retry.attempts, last_subject
                        )
                        if failure is not None:
                            raise failure from error
                finally:
                    call.cancel()  # a no-op once the call has ended
                    gate.close()
            if gate.source_error is not None:
                raise gate.source_error
            self._backoff(attempt)

    def screen(
        self,
        frames: Iterable[FrameData],
        options: ScreenOptions = ScreenOptions(),
        on_event: Callable[[StreamEvent], None] | None = None,
    ) -> SubjectResult:
        """Stream frames and return the final subject result."""
        final: SubjectResult | None = None
        for event in self.screen_stream(frames, options):
            if on_event is not None:
                on_event(event)
            if isinstance(event, SubjectResult):
                final = event
        if final is None or final.status not in ("final", "insufficient_evidence"):
            raise ServerError("the stream ended without a final subject result")
        return final

    def screen_photos(
        self,
        photos: Iterable[FrameData],
        options: ScreenOptions = ScreenOptions(),
        on_event: Callable[[StreamEvent], None] | None = None,
    ) -> SubjectResult:
        """Photographs of one subject, each analysed whatever the server's analysis rate
        (`still_images`); the final subject result. In one ScreenImages request when they fit one
        (at most IMAGES_PER_REQUEST photos within the message limit), else as a stream, a message
        a photo, read from `photos` as they are sent; `on_event` sees that stream's events."""
        options = dataclasses.replace(options, still_images=True)
        batch = OneRequestPhotos(self._max_message_bytes)
        source = iter(photos)
        if all(batch.add(photo) for photo in source):  # stops at the first photo that does not fit
            return self.screen_images(batch.photos, options)
        return self.screen(itertools.chain(batch.photos, source), options, on_event)

    def screen_images(self, images: Iterable[FrameData], options: ScreenOptions = ScreenOptions()) -> SubjectResult:
        """A few photographs of one subject in one request (at most the message limit in all:
        InvalidRequestError before sending otherwise); the final subject result."""
        request = images_request(images, options, self._max_message_bytes)
        return types.subject_result(self._unary(lambda stub: stub.ScreenImages, request))

    def model_info(self) -> ModelInfo:
        return types.model_info(self._unary(lambda stub: stub.GetModelInfo, pb.GetModelInfoRequest()))

    def health(self, service: str = "") -> str:
        """SERVING, NOT_SERVING, … as the server's health service reports it."""
        try:
            response = self._health.Check(
                health_pb2.HealthCheckRequest(service=service), timeout=self._timeout_s or 5.0, metadata=self._metadata
            )
        except grpc.RpcError as error:
            raise from_rpc_error(error) from error
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    def _unary(self, method: Callable[[pb_grpc.ScreeningStub], Callable[..., object]], request: object) -> object:
        """Unary calls are idempotent here: UNAVAILABLE is retried with backoff."""
        for attempt in range(self._retry.attempts):
            try:
                with self._placed() as (stub, _):
                    return method(stub)(request, timeout=self._timeout_s, metadata=self._metadata)
            except grpc.RpcError as error:
                if error.code() == grpc.StatusCode.UNAVAILABLE and attempt + 1 < self._retry.attempts:
                    self._backoff(attempt)
                    continue
                raise from_rpc_error(error) from error
        raise AssertionError("unreachable")

    def _backoff(self, attempt: int) -> None:
        delay = min(self._retry.max_backoff_s, self._retry.initial_backoff_s * 2**attempt)
        time.sleep(delay * (0.5 + random.random() / 2))

    def wait_until_serving(self, timeout_s: float = 30.0) -> None:
        """Block until health says SERVING (the model is loaded and warmed up)."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if self.health() == "SERVING":
                    return
            except AcroscreenClientError:
                pass
            if time.monotonic() >= deadline:
                raise UnavailableError(f"server not SERVING after {timeout_s:.0f} s")
            time.sleep(0.2)
