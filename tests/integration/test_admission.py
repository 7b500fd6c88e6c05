"""Calls before their first message (transport.admission), against a real server on a loopback port:
calls that never send their request, and health watches, cannot take the threads every other call
needs. Each test here failed before admission: the health check timed out."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import grpc
import pytest
from acroscreen.server.transport import admission
from acroscreen.v1 import screening_pb2 as pb
from acroscreen.v1 import screening_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from .conftest import start_server

SERVING = health_pb2.HealthCheckResponse.SERVING


def _never_sends(release: threading.Event) -> Iterator[bytes]:
    """A call's requests: none, until released (then it half-closes)."""
    release.wait(30)
    return
    yield


def _silent_unary(channel: grpc.Channel, method: str, release: threading.Event) -> grpc.Future:
    """A unary call (the same on the wire) whose request never comes."""
    call = channel.stream_unary(method, request_serializer=lambda raw: raw, response_deserializer=lambda raw: raw)
    return call.future(_never_sends(release), timeout=30)


def _code(future: grpc.Future) -> grpc.StatusCode:
    error = future.exception(timeout=30)
    assert isinstance(error, grpc.Call), future
    return error.code()


def test_unary_calls_that_never_send_their_request_cannot_take_every_server_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """40 ScreenImages and 40 GetModelInfo calls without their request, on a server of 18 handler
    threads: every later call waited forever (gRPC reads a unary request on a handler thread before
    any of our code). Now at most --max-streams of each method wait, the rest are refused at once,
    and the waiting ones are cancelled after FIRST_MESSAGE_WAIT_S (LARGE_REQUEST_WAIT_S for photos)."""
    monkeypatch.setattr(admission, "FIRST_MESSAGE_WAIT_S", 2.0)
    monkeypatch.setattr(admission, "LARGE_REQUEST_WAIT_S", 3.0)
    running = start_server(metrics_port=-1, max_streams=2)
    release = threading.Event()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            silent = {method: [_silent_unary(channel, f"/acroscreen.v1.Screening/{method}", release) for _ in range(40)]
                      for method in ("ScreenImages", "GetModelInfo")}
            time.sleep(0.5)
            health = health_pb2_grpc.HealthStub(channel)
            assert health.Check(health_pb2.HealthCheckRequest(), timeout=2).status == SERVING
            started = time.monotonic()
            for method, calls in silent.items():
                codes = [_code(call) for call in calls]
                assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 38, (method, codes)
                assert codes.count(grpc.StatusCode.CANCELLED) == 2, (method, codes)
            assert time.monotonic() - started < 10
            # Once they are gone, model info is answered again.
            assert pb_grpc.ScreeningStub(channel).GetModelInfo(pb.GetModelInfoRequest(), timeout=5).model.name
    finally:
        release.set()
        running.stop(grace_s=1.0)


def test_open_health_watches_hold_no_server_thread() -> None:
    """Clients using gRPC's client-side health checking keep a Watch open each: 40 of them took every
    thread of an 18-thread server (the error interceptor had turned gRPC's non-blocking Watch into a
    blocking one) and Check timed out. Watches hold no thread now, and each still hears a change."""
    running = start_server(metrics_port=-1, max_streams=2)
    channels = [grpc.insecure_channel(f"127.0.0.1:{running.port}", options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(40)]
    try:
        watches = [health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=30) for channel in channels]
        assert all(next(watch).status == SERVING for watch in watches)
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            assert health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2).status == SERVING
            assert pb_grpc.ScreeningStub(channel).GetModelInfo(pb.GetModelInfoRequest(), timeout=5).model.name
        running.grpc_server.drain()  # a drain reaches every watcher
        assert all(next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING for watch in watches)
    finally:
        for channel in channels:
            channel.close()
        running.stop(grace_s=1.0)


def test_silent_health_checks_and_open_reflection_streams_leave_screening_its_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Health and reflection run on threads of their own: 40 health checks that never send their
    request (each cancelled after SIDE_MESSAGE_WAIT_S) do not delay model info, and reflection streams
    held open are capped at REFLECTION_STREAMS, so they cannot hold every health thread either."""
    monkeypatch.setattr(admission, "SIDE_MESSAGE_WAIT_S", 1.0)
    running = start_server(metrics_port=-1, max_streams=2)
    release = threading.Event()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            silent = [_silent_unary(channel, "/grpc.health.v1.Health/Check", release) for _ in range(40)]
            time.sleep(0.3)
            started = time.monotonic()
            assert pb_grpc.ScreeningStub(channel).GetModelInfo(pb.GetModelInfoRequest(), timeout=2).model.name
            assert time.monotonic() - started < 0.5
            assert [_code(call) for call in silent] == [grpc.StatusCode.CANCELLED] * 40

            reflection = channel.stream_stream("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
                                               request_serializer=lambda raw: raw, response_deserializer=lambda raw: raw)
            list_services = bytes.fromhex("3a00")  # ServerReflectionRequest{list_services: ""}

            def held_open() -> Iterator[bytes]:
                yield list_services
                release.wait(30)

            streams = [reflection(held_open(), timeout=30) for _ in range(admission.REFLECTION_STREAMS + 2)]
            answered, refused = 0, 0
            for stream in streams:
                try:
                    next(stream)
                    answered += 1
                except grpc.RpcError as error:
                    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
                    refused += 1
            assert (answered, refused) == (admission.REFLECTION_STREAMS, 2)
            health = health_pb2_grpc.HealthStub(channel)
            assert health.Check(health_pb2.HealthCheckRequest(), timeout=2).status == SERVING
    finally:
        release.set()
        running.stop(grace_s=1.0)
