"""What the caller's frames do to a stream, through the sync and the async client against a real
server: a frame source that fails is raised as itself with the call cancelled, and a frame over the
message limit is rejected by the server alone, not ended with the whole call by the client's send limit."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import numpy as np
import pytest
from acroscreen.client import FrameData, FrameResult, ImageKind, ScreeningClient, ScreenOptions, SubjectResult
from acroscreen.client.aio import AsyncScreeningClient
from acroscreen.client.types import StreamEvent
from acroscreen.server.main import RunningServer

from tests.helpers import jpeg_bytes


def _screen(mode: str, port: int, frames: Iterator[FrameData], events: list[StreamEvent]) -> SubjectResult:
    """One stream through the sync or the async client, with its default limits; every event kept."""
    target = f"127.0.0.1:{port}"
    options = ScreenOptions(analyze_every_frame=True)
    if mode == "sync":
        with ScreeningClient(target, timeout_s=60) as client:
            return client.screen(frames, options, on_event=events.append)

    async def run() -> SubjectResult:
        async with AsyncScreeningClient(target, timeout_s=60) as client:
            return await client.screen(frames, options, on_event=events.append)

    return asyncio.run(run())


def _subjects_completed(server: RunningServer) -> float:
    """The FINAL subject results the server has made, of every stream and request."""
    return sum(
        sample.value
        for metric in server.metrics.registry.collect()
        for sample in metric.samples
        if sample.name == "acroscreen_subjects_completed_total"
    )


class _Unreadable(Exception):
    pass


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_frame_source_that_fails_is_raised_as_itself_and_its_call_cancelled(
    mode: str, server: RunningServer, portrait_bgr: np.ndarray
) -> None:
    """The source (a webcam that will not open, a video corrupt halfway) raises after two frames:
    the caller gets that very exception (the sync client raised ServerError "Exception iterating
    requests!", the async one asyncio.CancelledError), the stream is not retried, and it was
    cancelled, not half-closed: the server made no FINAL result of the two frames it got."""
    broken = _Unreadable("frame 2 is unreadable")
    taken: list[int] = []

    def source() -> Iterator[FrameData]:
        for index in range(2):
            taken.append(index)
            yield FrameData(jpeg_bytes(portrait_bgr), ImageKind.JPEG, index=index)
        raise broken

    completed = _subjects_completed(server)
    events: list[StreamEvent] = []
    with pytest.raises(_Unreadable) as raised:
        _screen(mode, server.port, source(), events)
    assert raised.value is broken
    assert taken == [0, 1]
    assert not any(isinstance(event, SubjectResult) and event.status == "final" for event in events)
    deadline = time.monotonic() + 30
    while server.service.active_streams and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.service.active_streams == 0
    assert _subjects_completed(server) == completed


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_frame_over_the_message_limit_is_rejected_by_the_server_and_the_stream_goes_on(
    mode: str, server: RunningServer, portrait_bgr: np.ndarray
) -> None:
    """A 9 MiB frame (the limit is 8 MiB, the clients' default too) reaches the server, which reads
    up to 4× the limit and answers it too_large; the client's own 8 MiB send limit ended the whole
    call with RESOURCE_EXHAUSTED, raised as ServerBusyError (which invites a pointless retry)."""
    frames = [
        FrameData(b"\xff\xd8" + bytes(9 * 1024 * 1024), ImageKind.JPEG, index=0),
        FrameData(jpeg_bytes(portrait_bgr), ImageKind.JPEG, index=1),
    ]
    events: list[StreamEvent] = []
    result = _screen(mode, server.port, iter(frames), events)
    by_index = {event.index: event for event in events if isinstance(event, FrameResult)}
    assert by_index[0].status == "rejected" and by_index[0].reject_reason == "too_large"
    assert by_index[1].status == "analyzed"
    assert result.frames_received == 2 and result.rejected == {"too_large": 1}


def test_the_cli_says_which_webcam_it_cannot_open(server: RunningServer, capsys: pytest.CaptureFixture[str]) -> None:
    """`acroscreen screen 97` with no such webcam (in process): the camera's own error, not a
    ServerError "UNKNOWN: Exception iterating requests!" nor a traceback."""
    from acroscreen.client.cli import main

    assert main(["screen", "97", "--server", f"127.0.0.1:{server.port}", "--timeout", "60"]) == 2
    err = capsys.readouterr().err
    assert "acroscreen: cannot open webcam 97" in err
    assert "UNKNOWN" not in err and "Traceback" not in err
    assert "Ctrl-C" not in err  # how to end a capture is said only once there is one
