"""The `acroscreen preprocess` verb body: images, folders and videos in; PNG crops and JSON lines out."""

from __future__ import annotations

import json
from pathlib import Path

import av
import cv2
import pytest
from acroscreen.server.runtime.preprocess_cli import run_preprocess

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason=f"shared test data not found at {DATA} (CI provides it)")
KEYS = {
    "source",
    "frame",
    "box",
    "face_count",
    "keyframe",
    "landmarks",
    "pose",
    "quality",
    "rejected",
    "detail",
    "crop",
}


def records(output: str) -> list[dict]:
    return [json.loads(line) for line in output.splitlines() if line.strip()]


def test_image_with_68_points(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_preprocess(DATA / "faces" / "identities" / "Barack_Obama" / "1.jpg", tmp_path, 68, True) == 0
    captured = capsys.readouterr()
    (record,) = records(captured.out)
    assert set(record) == KEYS and record["rejected"] is None
    assert len(record["landmarks"]) == 68 and set(record["pose"]) == {"yaw", "pitch", "roll"}
    assert 0.0 <= record["quality"]["score"] <= 1.0
    crop = cv2.imread(record["crop"])
    assert crop is not None and crop.shape == (160, 160, 3)
    assert "non-commercial" in captured.err


def test_folder_keeps_layout_and_reports_rejections(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "source"
    for group in ("none", "multi"):
        (source / group).mkdir(parents=True)
        for path in sorted((DATA / "faces" / group).glob("*.jpg"))[:2]:
            (source / group / path.name).write_bytes(path.read_bytes())
    out = tmp_path / "out"
    assert run_preprocess(source, out, 5, True) == 0
    lines = records(capsys.readouterr().out)
    assert [r["source"] for r in lines] == ["multi/group_t1", "multi/kit_with_rose", "none/cat_chelsea", "none/coffee"]
    for record in lines:
        if record["source"].startswith("none/"):
            assert record["rejected"] == "no_face" and record["crop"] is None and record["box"] is None
    assert (out / "multi" / "kit_with_rose.png").is_file()


def test_video_is_tracked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    video = tmp_path / "short.mp4"
    with av.open(str(DATA / "videos" / "retalking_face5.mp4")) as source, av.open(str(video), "w") as sink:
        stream = sink.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = 524, 524, "yuv420p"
        for index, frame in enumerate(source.decode(video=0)):
            if index == 12:
                break
            sink.mux(stream.encode(av.VideoFrame.from_ndarray(frame.to_ndarray(format="rgb24"), format="rgb24")))
        sink.mux(stream.encode())
    assert run_preprocess(video, tmp_path / "out", 5, True) == 0
    lines = records(capsys.readouterr().out)
    assert [r["frame"] for r in lines] == list(range(12))
    assert sum(r["keyframe"] for r in lines) < 12
    assert all(r["crop"] and Path(r["crop"]).name == f"short_{r['frame']:06d}.png" for r in lines)


def test_bad_sources(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_preprocess(tmp_path / "missing.jpg", tmp_path, 5, False) == 2
    assert run_preprocess(DATA / "faces" / "none" / "coffee.jpg", tmp_path, 7, False) == 2
    garbage = tmp_path / "clip.mp4"
    garbage.write_bytes(b"not a video")
    assert run_preprocess(garbage, tmp_path, 5, False) == 1
    assert "error" in capsys.readouterr().err
