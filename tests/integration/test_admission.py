"""Calls before their first message (transport.admission), against a real server on a loopback port:
calls that never send their request, and health watches, cannot take the threads every other call
needs, and calls that do send theirs are never refused for each other."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from acroscreen.client import Credentials, FrameData, ImageKind, ScreeningClient, ScreenOptions
from acroscreen.server.main import RunningServer
from acroscreen.server.transport import admission
from acroscreen.v1 import screening_pb2 as pb
from acroscreen.v1 import screening_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.helpers import jpeg_bytes

from .conftest import start_server

SERVING = health_pb2.HealthCheckResponse.SERVING
CANCELLED, REFUSED = grpc.StatusCode.CANCELLED, grpc.StatusCode.RESOURCE_EXHAUSTED


def _never_sends(release: threading.Event) -> Iterator[bytes]:
    """A call's requests: none, until released (then it half-closes)."""
    release.wait(30)
    return
    yield


def _silent_unary(channel: grpc.Channel, method: str, release: threading.Event, **kwargs: object) -> grpc.Future:
    """A unary call (the same on the wire) whose request never comes."""
    call = channel.stream_unary(method, request_serializer=lambda raw: raw, response_deserializer=lambda raw: raw)
    return call.future(_never_sends(release), timeout=30, **kwargs)


def _silent_stream(channel: grpc.Channel, release: threading.Event, **kwargs: object) -> grpc.Future:
    call = channel.stream_stream("/acroscreen.v1.Screening/ScreenStream", request_serializer=lambda raw: raw,
                                 response_deserializer=lambda raw: raw)
    return call(_never_sends(release), timeout=30, **kwargs)


@contextlib.contextmanager
def _serving(**overrides: object) -> Iterator[tuple[RunningServer, grpc.Channel, threading.Event]]:
    """A server, a channel to it, and the event that releases the test's silent calls at the end."""
    running = start_server(**overrides)
    release = threading.Event()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            yield running, channel, release
    finally:
        release.set()
        running.stop(grace_s=1.0)


class _Ended:
    """When each call ended, taken as it ends (gRPC runs the callback at once for a call already over)."""

    def __init__(self) -> None:
        self.opened = time.monotonic()
        self._calls: list[grpc.Future] = []
        self._at: dict[int, float] = {}

    def track(self, call: grpc.Future) -> grpc.Future:
        index = len(self._calls)
        self._calls.append(call)
        call.add_done_callback(lambda _call: self._at.setdefault(index, time.monotonic()))
        return call

    def endings(self) -> list[tuple[grpc.StatusCode, float]]:
        """Each failed call's status and how long after the first was opened it ended."""
        codes = []
        for call in self._calls:
            error = call.exception(timeout=30)
            assert isinstance(error, grpc.Call), call
            codes.append(error.code())
        deadline = time.monotonic() + 5
        while len(self._at) < len(self._calls) and time.monotonic() < deadline:  # callbacks run on gRPC's thread
            time.sleep(0.01)
        return [(code, self._at[index] - self.opened) for index, code in enumerate(codes)]


def _turned_away(endings: list[tuple[grpc.StatusCode, float]], wait_s: float) -> int:
    """Calls refused at once or cancelled when they went silent with no place free."""
    return sum(1 for code, after in endings if code in (REFUSED, CANCELLED) and after < wait_s - 0.3)


def _waited(endings: list[tuple[grpc.StatusCode, float]], wait_s: float) -> int:
    """Calls cancelled after waiting out the time limit for their message."""
    return sum(1 for code, after in endings if code == CANCELLED and after >= wait_s - 0.1)


def test_streams_that_never_send_their_options_cannot_take_every_server_thread(
    monkeypatch: pytest.MonkeyPatch, portrait_bgr: np.ndarray
) -> None:
    """A stream call holds a server thread before its options admit it: 80 calls that sent nothing
    took every thread of a 32-stream server, and health checks and model info timed out. Now at most
    --max-streams silent calls wait for their options (the others are turned away within a second),
    each cancelled after FIRST_MESSAGE_WAIT_S."""
    monkeypatch.setattr(admission, "FIRST_MESSAGE_WAIT_S", 2.0)
    with _serving(metrics_port=-1, max_streams=2) as (running, channel, release):
        ended = _Ended()
        for _ in range(20):
            ended.track(_silent_stream(channel, release))
        health, stub = health_pb2_grpc.HealthStub(channel), pb_grpc.ScreeningStub(channel)
        for _ in range(5):
            assert health.Check(health_pb2.HealthCheckRequest(), timeout=2).status == SERVING
            assert stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=2).model.name
        endings = ended.endings()
        assert (_turned_away(endings, 2.0), _waited(endings, 2.0)) == (18, 2), endings
        release.set()
        frames = [FrameData(jpeg_bytes(np.roll(portrait_bgr, 6 * i, axis=1)), ImageKind.JPEG, index=i) for i in range(3)]
        with ScreeningClient(f"127.0.0.1:{running.port}", timeout_s=60) as client:  # and streams go on
            assert client.screen(frames, ScreenOptions(analyze_every_frame=True)).frames_analyzed == 3


def test_one_callers_silent_streams_do_not_take_another_callers_turn(
    monkeypatch: pytest.MonkeyPatch, portrait_bgr: np.ndarray
) -> None:
    """With a per-token quota, one token's streams that never sent options took every waiting place
    (--max-streams) and another token, holding no stream, was refused."""
    monkeypatch.setattr(admission, "FIRST_MESSAGE_WAIT_S", 2.0)
    first, second = "silent-caller-token-0123456789", "other-caller-token-0123456789a"
    quota = {"max_streams": 4, "auth_tokens": f"{first},{second}", "max_streams_per_token": 1}
    with _serving(metrics_port=-1, **quota) as (running, channel, release):
        ended = _Ended()
        for _ in range(4):
            ended.track(_silent_stream(channel, release, metadata=(("authorization", f"Bearer {first}"),)))
        time.sleep(0.5)  # they went silent: one placed, three turned away
        frames = [FrameData(jpeg_bytes(portrait_bgr), ImageKind.JPEG, index=i) for i in range(3)]
        with ScreeningClient(f"127.0.0.1:{running.port}", timeout_s=60, credentials=Credentials(token=second)) as other:
            assert other.screen(frames, ScreenOptions(analyze_every_frame=True)).frames_analyzed == 3
        endings = ended.endings()
        assert (_turned_away(endings, 2.0), _waited(endings, 2.0)) == (3, 1), endings


def test_unary_calls_that_never_send_their_request_cannot_take_every_server_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """40 ScreenImages and 40 GetModelInfo calls without their request, on a server of 18 handler
    threads: every later call waited forever (gRPC reads a unary request on a handler thread before
    any of our code). Now at most --max-streams of each method stay waiting, the rest are turned away
    at once, and the waiting ones are cancelled after FIRST_MESSAGE_WAIT_S (LARGE_REQUEST_WAIT_S for photos)."""
    monkeypatch.setattr(admission, "FIRST_MESSAGE_WAIT_S", 2.0)
    monkeypatch.setattr(admission, "LARGE_REQUEST_WAIT_S", 3.0)
    with _serving(metrics_port=-1, max_streams=2) as (_running, channel, release):
        ended = {method: _Ended() for method in ("ScreenImages", "GetModelInfo")}
        for method, calls in ended.items():
            for _ in range(40):
                calls.track(_silent_unary(channel, f"/acroscreen.v1.Screening/{method}", release))
        time.sleep(0.5)
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=2).status == SERVING
        for method, wait_s in (("ScreenImages", 3.0), ("GetModelInfo", 2.0)):
            endings = ended[method].endings()
            assert (_turned_away(endings, wait_s), _waited(endings, wait_s)) == (38, 2), (method, endings)
        # Once they are gone, model info is answered again.
        assert pb_grpc.ScreeningStub(channel).GetModelInfo(pb.GetModelInfoRequest(), timeout=5).model.name


def test_calls_that_send_their_request_at_once_are_never_refused_for_each_other() -> None:
    """Every call counted as waiting while its (already sent) request was read: 15 of 20 simultaneous
    GetModelInfo calls were refused RESOURCE_EXHAUSTED on a --max-streams 1 server. Only calls still
    silent after GRACE_S take a place now."""
    with _serving(metrics_port=-1, max_streams=1) as (_running, channel, _release):
        stub = pb_grpc.ScreeningStub(channel)
        for _ in range(3):
            calls = [stub.GetModelInfo.future(pb.GetModelInfoRequest(), timeout=10) for _ in range(20)]
            assert all(call.result().model.name for call in calls)


def test_open_health_watches_hold_no_server_thread_and_a_drain_reaches_them() -> None:
    """Clients using gRPC's client-side health checking keep a Watch open each: 40 of them took every
    thread of an 18-thread server (the error interceptor had turned gRPC's non-blocking Watch into a
    blocking one) and Check timed out. Watches hold no thread now and each still hears a drain."""
    running = start_server(metrics_port=-1, max_streams=2)
    channels = [grpc.insecure_channel(f"127.0.0.1:{running.port}", options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(40)]
    try:
        watches = [health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=30) for channel in channels]
        assert all(next(watch).status == SERVING for watch in watches)
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            assert health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2).status == SERVING
            assert pb_grpc.ScreeningStub(channel).GetModelInfo(pb.GetModelInfoRequest(), timeout=5).model.name
        running.grpc_server.drain()
        assert all(next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING for watch in watches)
    finally:
        for channel in channels:
            channel.close()
        running.stop(grace_s=1.0)


def test_a_drain_while_watchers_leave_does_not_freeze_the_server() -> None:
    """grpc_health sends a status change to every watcher under its lock, and a watch that closes
    takes that lock on gRPC's only serving thread: with the sends made there, watchers leaving as
    the server drained froze it for good (the review's reproduction: at the first of 10 attempts).
    Watch answers are sent by a thread of their own now."""
    with _serving(metrics_port=-1, max_streams=2) as (running, channel, _release):
        health = health_pb2_grpc.HealthStub(channel)
        for _ in range(5):
            watches = [health.Watch(health_pb2.HealthCheckRequest(), timeout=30) for _ in range(8)]
            assert {next(watch).status for watch in watches} == {SERVING}
            for watch in watches:
                watch.cancel()
            drained = threading.Thread(target=running.grpc_server.drain, daemon=True)
            drained.start()
            drained.join(10)
            assert not drained.is_alive(), "the drain froze"
            running.grpc_server.attach(running.service)  # SERVING again for the next attempt
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=2).status == SERVING


def test_silent_health_checks_and_open_reflection_streams_leave_screening_its_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Health and reflection run on threads of their own: 40 health checks that never send their
    request do not delay model info, and reflection streams held open are capped, per address too,
    so they cannot hold every health thread either."""
    monkeypatch.setattr(admission, "SIDE_MESSAGE_WAIT_S", 1.0)
    with _serving(metrics_port=-1, max_streams=2) as (_running, channel, release):
        ended = _Ended()
        for _ in range(40):
            ended.track(_silent_unary(channel, "/grpc.health.v1.Health/Check", release))
        time.sleep(0.3)
        started = time.monotonic()
        assert pb_grpc.ScreeningStub(channel).GetModelInfo(pb.GetModelInfoRequest(), timeout=2).model.name
        assert time.monotonic() - started < 0.5
        endings = ended.endings()
        assert _waited(endings, 1.0) == admission.SIDE_CALLS_PER_PEER, endings
        assert _turned_away(endings, 1.0) == 40 - admission.SIDE_CALLS_PER_PEER, endings

        reflection = channel.stream_stream("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
                                           request_serializer=lambda raw: raw, response_deserializer=lambda raw: raw)
        list_services = bytes.fromhex("3a00")  # ServerReflectionRequest{list_services: ""}

        def held_open() -> Iterator[bytes]:
            yield list_services
            release.wait(30)

        answered, refused = 0, 0
        for stream in [reflection(held_open(), timeout=30) for _ in range(admission.REFLECTION_STREAMS_PER_PEER + 2)]:
            try:
                next(stream)
                answered += 1
            except grpc.RpcError as error:
                assert error.code() == REFUSED, error
                refused += 1
        assert (answered, refused) == (admission.REFLECTION_STREAMS_PER_PEER, 2)
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=2).status == SERVING


def test_one_addresss_silent_health_checks_do_not_take_the_probes_turn(monkeypatch: pytest.MonkeyPatch) -> None:
    """Silent health checks from [::1] are turned away past SIDE_CALLS_PER_PEER, while a probe from
    127.0.0.1 (the kubelet's, say) is answered at once."""
    monkeypatch.setattr(admission, "SIDE_MESSAGE_WAIT_S", 1.0)
    if not socket.has_ipv6:
        pytest.skip("needs IPv6 beside IPv4 on the loopback")
    try:
        running = start_server(metrics_port=-1, max_streams=2, host="[::]", insecure=True)
    except Exception as error:  # noqa: BLE001 — a machine without IPv6 on the loopback
        pytest.skip(f"cannot listen on [::]: {error}")
    release = threading.Event()
    try:
        with grpc.insecure_channel(f"[::1]:{running.port}") as flooding, grpc.insecure_channel(f"127.0.0.1:{running.port}") as probe:
            ended = _Ended()
            for _ in range(40):
                ended.track(_silent_unary(flooding, "/grpc.health.v1.Health/Check", release))
            time.sleep(0.3)
            started = time.monotonic()
            assert health_pb2_grpc.HealthStub(probe).Check(health_pb2.HealthCheckRequest(), timeout=2).status == SERVING
            assert time.monotonic() - started < 0.5
            assert all(code in (REFUSED, CANCELLED) for code, _ in ended.endings())
    finally:
        release.set()
        running.stop(grace_s=1.0)
