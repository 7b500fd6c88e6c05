"""The sync and async clients' stream retries against real servers that come up late or go away:
UNAVAILABLE before the server accepted the stream is retried without losing a frame; a failure
after that is raised, never retried into a result that misses frames."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable, Iterator

import numpy as np
import pytest
from acroscreen.client import (
    FrameData,
    FrameResult,
    ImageKind,
    RetryPolicy,
    ScreeningClient,
    ScreenOptions,
    SubjectResult,
)
from acroscreen.client.aio import AsyncScreeningClient
from acroscreen.client.client import ACCEPTANCE_WAIT_S
from acroscreen.client.errors import UnavailableError
from acroscreen.client.workers import TURN_HOLD_S
from acroscreen.client.types import StreamEvent
from acroscreen.server.main import RunningServer
from acroscreen.server.transport import servicer

from tests.helpers import jpeg_bytes

from .conftest import start_server

# Retry for two minutes, not a count tuned to a fast machine: a server's start (model load and warm-up,
# ~5 s here) takes far longer on a loaded CI VM, and gRPC's own reconnect backoff eats into the span.
# RetryPolicy has no deadline, so the attempts are counted to span RETRY_SPAN_S even when every
# jittered backoff is at its shortest (half of MAX_BACKOFF_S); a server that is up ends the retries at once.
RETRY_SPAN_S = 120.0
MAX_BACKOFF_S = 0.5
PATIENT = RetryPolicy(
    attempts=int(RETRY_SPAN_S / (MAX_BACKOFF_S / 2)) + 1, initial_backoff_s=0.2, max_backoff_s=MAX_BACKOFF_S
)


def _screen(mode: str, port: int, frames: Iterator[FrameData], events: list[StreamEvent]) -> SubjectResult:
    """One stream through the sync or the async client, every event kept; every frame is analysed
    (no frame skipped for a busy backlog on a slow machine), so the result is final."""
    target = f"127.0.0.1:{port}"
    options = ScreenOptions(analyze_every_frame=True)
    if mode == "sync":
        with ScreeningClient(target, timeout_s=120, retry=PATIENT) as client:
            return client.screen(frames, options, on_event=events.append)

    async def run() -> SubjectResult:
        async with AsyncScreeningClient(target, timeout_s=120, retry=PATIENT) as client:
            return await client.screen(frames, options, on_event=events.append)

    return asyncio.run(run())


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _frames(portrait: np.ndarray, count: int) -> list[FrameData]:
    return [FrameData(jpeg_bytes(np.roll(portrait, 3 * i, axis=1)), ImageKind.JPEG, index=i) for i in range(count)]


def _in_background(start: Callable[[], RunningServer], started: list[RunningServer]) -> threading.Thread:
    thread = threading.Thread(target=lambda: started.append(start()), name="late-server")
    thread.start()
    return thread


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_stream_begun_before_the_server_is_up_gets_every_frame(mode: str, portrait_bgr: np.ndarray) -> None:
    """The call starts with nothing listening, then meets a server still loading its model
    (UNAVAILABLE either way): retried until served, with all five frames answered once each."""
    port = _free_port()
    started: list[RunningServer] = []
    timer = threading.Timer(1.0, lambda: started.append(start_server(port=port, metrics_port=-1)))
    timer.start()
    events: list[StreamEvent] = []
    try:
        result = _screen(mode, port, iter(_frames(portrait_bgr, 5)), events)
    finally:
        timer.join()
        for running in started:
            running.stop(grace_s=1.0)
    assert result.status == "final" and result.frames_received == 5
    assert sorted(event.index for event in events if isinstance(event, FrameResult)) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_stream_that_fails_after_it_started_is_raised_not_retried(mode: str, portrait_bgr: np.ndarray) -> None:
    """The server dies after two frames were sent and a new one takes its port at once: a retry
    would reach it and return a result without those frames, so the client must raise instead."""
    first = start_server(metrics_port=-1)
    port = first.port
    frames = _frames(portrait_bgr, 6)
    replacement: list[RunningServer] = []
    restarting: list[threading.Thread] = []
    taken: list[int] = []
    restart_begun = threading.Event()

    def source() -> Iterator[FrameData]:
        for frame in frames:
            if frame.index == 2:  # frames 0 and 1 are with the server
                first.stop(grace_s=0.0)
                restarting.append(_in_background(lambda: start_server(port=port, metrics_port=-1), replacement))
                restart_begun.set()
            taken.append(frame.index)
            yield frame

    events: list[StreamEvent] = []
    try:
        with pytest.raises(UnavailableError) as failure:
            _screen(mode, port, source(), events)
    finally:
        # The source runs on gRPC's request thread: the stop's UNAVAILABLE can reach the client
        # before stop() returns there and the restart begins.
        restart_begun.wait(30)
        for thread in restarting:
            thread.join()
        for running in replacement:
            running.stop(grace_s=1.0)
    # No result is made up: at most the stopped server's own FINAL for the two frames it had
    # (a stopping server ends open streams with their result, if gRPC's stop lets it out).
    final = failure.value.final_result
    assert final is None or final.frames_received <= 2
    assert restarting, "the server was never stopped mid-stream"
    assert all(event.index in (0, 1) for event in events if isinstance(event, FrameResult))
    assert len(taken) <= 3  # the stream was not resumed against the new server


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_server_that_sends_no_early_metadata_still_gets_the_frames(
    mode: str, portrait_bgr: np.ndarray, server: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server older than the acceptance signal answers a stream's first frame before it sends
    any metadata: the client waits ACCEPTANCE_WAIT_S for the signal, then sends its frames anyway
    (before, the two sides waited on each other until the deadline, or forever without one)."""
    monkeypatch.setattr(servicer.ScreeningServicer, "_send_initial_metadata", lambda self, context: None)
    events: list[StreamEvent] = []
    started = time.monotonic()
    result = _screen(mode, server.port, iter(_frames(portrait_bgr, 3)), events)
    took = time.monotonic() - started
    assert result.status == "final" and result.frames_received == 3
    assert sorted(event.index for event in events if isinstance(event, FrameResult)) == [0, 1, 2]
    assert ACCEPTANCE_WAIT_S <= took < ACCEPTANCE_WAIT_S + 60  # the gate waited, once, then let the frames go


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_stream_its_server_does_not_answer_holds_up_the_clients_next_stream_a_few_seconds_at_most(
    mode: str, portrait_bgr: np.ndarray, server: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A spreading client places its streams one at a time, each once the one before was accepted.
    A stream whose server sends nothing (here: no early metadata, and no frame to answer) gives
    the turn back after TURN_HOLD_S, so the client's next stream still goes (after its own
    acceptance wait against such a server), not after the first stream ends."""
    monkeypatch.setattr(servicer.ScreeningServicer, "_send_initial_metadata", lambda self, context: None)
    target = f"127.0.0.1:{server.port}"
    release = threading.Event()
    frames = _frames(portrait_bgr, 3)

    def stuck() -> Iterator[FrameData]:
        release.wait(120)
        yield from frames

    def second_stream_took(first: Callable[[], object], second: Callable[[], SubjectResult]) -> float:
        holder = threading.Thread(target=first, name="stuck-stream")
        holder.start()
        time.sleep(0.5)  # the first stream holds the turn
        started = time.monotonic()
        try:
            assert second().frames_received == 3
            return time.monotonic() - started
        finally:
            release.set()
            holder.join(120)

    if mode == "sync":
        with ScreeningClient(target, timeout_s=120, spread_over_workers=True) as client:
            took = second_stream_took(lambda: client.screen(stuck(), ScreenOptions(analyze_every_frame=True)),
                                      lambda: client.screen(iter(frames), ScreenOptions(analyze_every_frame=True)))
    else:
        async def run() -> float:
            async with AsyncScreeningClient(target, timeout_s=120, spread_over_workers=True) as client:
                loop = asyncio.get_running_loop()
                first = loop.create_task(client.screen(stuck(), ScreenOptions(analyze_every_frame=True)))
                await asyncio.sleep(0.5)
                started = time.monotonic()
                try:
                    assert (await client.screen(iter(frames), ScreenOptions(analyze_every_frame=True))).frames_received == 3
                    return time.monotonic() - started
                finally:
                    release.set()
                    await first

        took = asyncio.run(run())
    # Held until the first stream ended, it would wait for the server's 60 s idle timeout.
    assert TURN_HOLD_S - 0.5 <= took < TURN_HOLD_S + ACCEPTANCE_WAIT_S + 30
