"""`acroscreen screen` with a webcam: captured until Ctrl-C or until --max-frames frames were
analysed (it stopped silently after 300 frames, ~10 s, whatever --max-frames said)."""

from __future__ import annotations

import signal

import pytest
from acroscreen.client.cli import _WebcamCapture
from acroscreen.client.types import FrameResult


def _answer(index: int, status: str) -> FrameResult:
    return FrameResult(
        index=index, timestamp_us=0, status=status, reject_reason="no_face" if status == "rejected" else None,
        detail="", face_count=0, box=None, quality=None, pose=None, probabilities=None, predicted_score=None,
        expected_score=None, latency_ms=1.0,
    )


def test_the_capture_ends_once_max_frames_frames_were_answered_analysed_or_rejected() -> None:
    """The server's analysis cap counts every frame it admitted, a rejected one (no face) too; frames
    it skipped (busy, or not the sharpest of their interval) do not count."""
    capture = _WebcamCapture(max_frames=3)
    shown: list[object] = []
    seen = capture.counting(shown.append)
    for index, status in enumerate(["analyzed", "skipped", "rejected", "skipped"]):
        seen(_answer(index, status))
    assert not capture.stop.is_set()
    seen(_answer(4, "analyzed"))
    assert capture.stop.is_set() and len(shown) == 5  # every event still reaches the progress line

    unlimited = _WebcamCapture(max_frames=0)
    for index in range(500):
        unlimited.counting(lambda event: None)(_answer(index, "analyzed"))
    assert not unlimited.stop.is_set()


def test_ctrl_c_ends_the_capture_and_a_second_one_interrupts() -> None:
    capture = _WebcamCapture(max_frames=0)
    before = signal.getsignal(signal.SIGINT)
    with capture.ended_by_ctrl_c():
        signal.raise_signal(signal.SIGINT)
        assert capture.stop.is_set()  # the stream then half-closes and gets its FINAL result
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before



def test_a_server_named_without_a_port_is_reached_on_the_servers_default_port() -> None:
    """gRPC takes 443 for a target without a port: `--server 127.0.0.1` reached nothing."""
    from acroscreen.client.cli import with_port

    assert with_port("127.0.0.1") == "127.0.0.1:50051" and with_port("scanner.local") == "scanner.local:50051"
    assert with_port("::1") == "[::1]:50051" and with_port("[::1]") == "[::1]:50051"
    for named in ("127.0.0.1:6000", "[::1]:6000", "dns:///scanner.example:6000", "ipv4:10.0.0.1:1,10.0.0.2:1"):
        assert with_port(named) == named


def test_jpeg_quality_outside_1_to_100_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    from acroscreen.client.cli import main

    with pytest.raises(SystemExit) as usage:
        main(["screen", "clip.mp4", "--jpeg-quality", "500"])
    assert usage.value.code == 2 and "1 to 100" in capsys.readouterr().err
