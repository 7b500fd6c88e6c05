"""The crop cache is used only for exactly the samples it was built from (no dlib: the crop is faked)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from acroscreen.server.training import crops as crops_module
from acroscreen.server.training.crops import CropSet, Sample, load_or_build_crops, training_preprocessing


@pytest.fixture
def built(monkeypatch: pytest.MonkeyPatch) -> list[list[Sample]]:
    """Stand-in for the dlib crop: each image's first byte fills its crop; records every build."""
    calls: list[list[Sample]] = []

    def fake_build(samples: list[Sample], workers: int | None = None,
                   preprocessing: dict[str, object] | None = None) -> CropSet:
        calls.append(list(samples))
        return CropSet(
            pixels=np.stack([np.full((4, 4, 3), s.path.read_bytes()[0], np.uint8) for s in samples]),
            scores=np.array([s.score for s in samples], np.int8),
            subjects=np.array([s.subject_id for s in samples]),
            paths=np.array([str(s.path) for s in samples]),
            preprocessing=preprocessing or training_preprocessing(),
        )

    monkeypatch.setattr(crops_module, "build_crops", fake_build)
    return calls


def _manifest(folder: Path, rows: list[tuple[str, int, str]]) -> Path:
    path = folder / "manifest.csv"
    path.write_text("path,score,subject_id\n" + "".join(f"{p},{s},{u}\n" for p, s, u in rows))
    return path


def test_a_changed_label_subject_or_file_rebuilds_the_cache(tmp_path: Path, built: list[list[Sample]]) -> None:
    for name, byte in (("a.png", 10), ("b.png", 20), ("c.png", 30)):
        (tmp_path / name).write_bytes(bytes([byte]))
    rows = [("a.png", 1, "x-L1"), ("b.png", 2, "y-L2"), ("c.png", 3, "z-L3")]
    manifest, cache = _manifest(tmp_path, rows), tmp_path / "cache.npz"
    load_or_build_crops(manifest, cache)
    assert len(built) == 1 and cache.is_file()
    assert load_or_build_crops(manifest, cache).scores.tolist() == [1, 2, 3] and len(built) == 1  # reused

    relabelled = _manifest(tmp_path, [rows[0], ("b.png", 3, "w-L3"), rows[2]])
    crops = load_or_build_crops(relabelled, cache)
    assert len(built) == 2 and crops.scores.tolist() == [1, 3, 3] and crops.subjects[1] == "w-L3"

    (tmp_path / "b.png").write_bytes(bytes([99, 0]))  # replaced by another image
    assert load_or_build_crops(relabelled, cache).pixels[1, 0, 0, 0] == 99 and len(built) == 3

    stat = (tmp_path / "c.png").stat()  # same size, rewritten later (phantoms regenerated in place)
    (tmp_path / "c.png").write_bytes(bytes([31]))
    os.utime(tmp_path / "c.png", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert load_or_build_crops(relabelled, cache).pixels[2, 0, 0, 0] == 31 and len(built) == 4
    assert len(load_or_build_crops(relabelled, cache)) == 3 and len(built) == 4


def test_a_cache_with_other_images_or_no_record_of_its_sources_is_rebuilt(
        tmp_path: Path, built: list[list[Sample]], capsys: pytest.CaptureFixture[str]) -> None:
    from acroscreen.server.training.crops import save_crops

    for name in ("a.png", "b.png", "new.png"):
        (tmp_path / name).write_bytes(b"\x05")
    cache = tmp_path / "cache.npz"
    # An older cache (no sources recorded) of a.png and b.png, one more image rejected: counts add up.
    save_crops(CropSet(np.zeros((2, 4, 4, 3), np.uint8), np.array([1, 2], np.int8), np.array(["x-L1", "y-L2"]),
                       np.array([str(tmp_path / "a.png"), str(tmp_path / "b.png")]), training_preprocessing(), 1),
               cache)
    manifest = _manifest(tmp_path, [("a.png", 1, "x-L1"), ("b.png", 2, "y-L2"), ("new.png", 3, "n-L3")])
    crops = load_or_build_crops(manifest, cache)
    assert len(built) == 1 and [Path(p).name for p in crops.paths] == ["a.png", "b.png", "new.png"]
    assert "is stale" in capsys.readouterr().err
    _manifest(tmp_path, [("a.png", 1, "x-L1"), ("b.png", 2, "y-L2")])
    assert len(load_or_build_crops(manifest, cache)) == 2 and len(built) == 2  # a subset is not a match
