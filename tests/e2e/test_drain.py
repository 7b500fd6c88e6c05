"""SIGTERM drain of a server subprocess with a stream in flight, and no patient data left behind."""

from __future__ import annotations

import hashlib
import signal
import threading
import time
from pathlib import Path

import pytest
from acroscreen.client import (
    FrameData,
    ImageKind,
    RetryPolicy,
    ScreeningClient,
    ScreenOptions,
    SubjectResult,
)
from acroscreen.client.errors import UnavailableError

from tests.helpers import jpeg_bytes

from .serving import serving

SUBJECT = "patient-1234-do-not-log"


def _files(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*")}


def test_sigterm_drains_streams_and_leaves_no_files(tmp_path: Path, portrait_bgr) -> None:
    work, tmp = tmp_path / "work", tmp_path / "tmp"
    work.mkdir()
    tmp.mkdir()
    good = jpeg_bytes(portrait_bgr)
    sent_first = threading.Event()

    def slow_frames():
        for index in range(6):
            yield FrameData(good, ImageKind.JPEG, index=index)
            sent_first.set()
            time.sleep(0.4)

    results: list[SubjectResult] = []
    with serving(
        "--metrics-port", "-1", "--grace-period-s", "20",
        env={"ACROSCREEN_ALLOW_UNTRAINED": "1", "TMPDIR": str(tmp)},
        cwd=work,
    ) as (process, port, _):
        before = _files(work) | _files(tmp)
        target = f"127.0.0.1:{port}"
        # A crash must not write the server's memory, frames included, to a core file.
        core_limit = next(line for line in Path(f"/proc/{process.pid}/limits").read_text().splitlines() if "core" in line)
        assert core_limit.split()[-3:-1] == ["0", "0"], core_limit
        with ScreeningClient(target, timeout_s=60) as client:
            options = ScreenOptions(subject_id=SUBJECT, analyze_every_frame=True)
            stream = threading.Thread(target=lambda: results.append(client.screen(slow_frames(), options)))
            stream.start()
            assert sent_first.wait(30)
            time.sleep(0.3)
            process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 10
            while client.health() != "NOT_SERVING" and time.monotonic() < deadline:
                time.sleep(0.05)
            assert client.health() == "NOT_SERVING"
            with ScreeningClient(target, timeout_s=10, retry=RetryPolicy(attempts=1)) as late:
                with pytest.raises(UnavailableError):
                    late.screen([FrameData(good, ImageKind.JPEG)])
            stream.join(60)
        assert process.wait(timeout=30) == 0
        log = process.stdout.read()
    assert results and results[0].status == "final" and results[0].frames_received == 6
    assert _files(work) | _files(tmp) == before, "the server left files behind"
    assert SUBJECT not in log
    assert hashlib.sha256(SUBJECT.encode()).hexdigest()[:12] in log
