"""The integration examples run as a user runs them (a separate Python process) against a real
server: a recorded clip streamed, a folder of photographs screened (plain and as FHIR), and the
webcam example's error path on a machine without a camera. `async_to_fhir.py` runs in
test_aio_client.py."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from acroscreen.client.sources import image_frames, video_frames
from acroscreen.server.main import RunningServer

from tests.helpers import write_camera_photos

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
CLIP = "retalking_face5.mp4"
PERSON = "Alec_Baldwin"


def _run_example(name: str, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args], capture_output=True, text=True, timeout=timeout, cwd=REPO
    )


def test_stream_video_example_prints_every_frame_and_the_final_result(server: RunningServer, shared_data: Path) -> None:
    clip = shared_data / "videos" / CLIP
    frame_count = sum(1 for _ in video_frames(clip))
    done = _run_example("stream_video.py", str(clip), "--server", f"127.0.0.1:{server.port}", "--subject-id", "S-17")
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    (frames_line,) = [line for line in lines if line.startswith("frames: ")]
    statuses = json.loads(frames_line.removeprefix("frames: ").replace("'", '"'))
    assert sum(statuses.values()) == frame_count, "one result per frame of the clip"
    assert set(statuses) <= {"analyzed", "rejected"}, "a recorded video is never skipped"
    assert statuses.get("analyzed", 0) > frame_count // 2
    assert re.search(r"^subject S-17: final, predicted score [123]$", done.stdout, re.MULTILINE), done.stdout
    (probabilities,) = [line for line in lines if line.startswith("probabilities ")]
    values = [float(v) for v in re.findall(r"\d\.\d+|\b[01]\b", probabilities.split(")")[0])]
    assert len(values) == 3 and abs(sum(values) - 1) < 0.01
    assert "model " in probabilities
    provisional = [line for line in lines if line.strip().startswith("provisional:")]
    assert provisional, "no provisional update during a whole clip"


def test_screen_photos_example_on_a_folder_of_one_person(server: RunningServer, shared_data: Path) -> None:
    folder = shared_data / "faces" / "identities" / PERSON
    photo_count = sum(1 for _ in image_frames(folder))
    target = f"127.0.0.1:{server.port}"
    done = _run_example("screen_photos.py", str(folder), "--server", target, "--subject-id", "S-17")
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert result["subject_id"] == "S-17" and result["status"] == "final"
    assert result["frames_received"] == photo_count and result["frames_analyzed"] >= 1
    assert result["predicted_score"] in (1, 2, 3)

    as_fhir = _run_example("screen_photos.py", str(folder), "--server", target, "--fhir", "Patient/17")
    assert as_fhir.returncode == 0, as_fhir.stderr[-3000:]
    observation = json.loads(as_fhir.stdout)
    assert observation["resourceType"] == "Observation" and observation["subject"]["reference"] == "Patient/17"
    models = pytest.importorskip("fhir.resources.R4B.observation")
    models.Observation.model_validate(observation)


def test_screen_photos_example_streams_photos_too_large_for_one_request(
    server: RunningServer, portrait_bgr, tmp_path: Path
) -> None:
    """Three phone-sized photos (~7 MB each): over the 8 MiB limit together, so a stream of still images."""
    write_camera_photos(tmp_path, portrait_bgr, 3)
    done = _run_example("screen_photos.py", str(tmp_path), "--server", f"127.0.0.1:{server.port}")
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert result["status"] == "final" and result["frames_received"] == 3 and result["frames_analyzed"] == 3


def test_stream_webcam_example_without_a_camera_fails_cleanly(server: RunningServer) -> None:
    """No webcam on these machines: the example says so and exits 1, without a traceback."""
    done = _run_example("stream_webcam.py", "97", "--server", f"127.0.0.1:{server.port}", "--seconds", "1", timeout=60)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "error: cannot open webcam 97" in done.stderr
    assert "Traceback" not in done.stderr
