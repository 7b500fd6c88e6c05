"""Phantoms: the warp moves the intended landmarks by the intended amounts and leaves the eyes alone."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from acroscreen.server.training import phantom as ph

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
FACE = DATA / "faces" / "identities" / "Eileen_Collins" / "1.jpg"
needs_data = pytest.mark.skipif(not FACE.is_file(), reason=f"shared test data not found at {DATA}")
NO_JITTER = ph.JitterSettings(group_shift=0.0, group_scale=0.0, point=0.0)


@pytest.fixture(scope="module")
def face() -> tuple[np.ndarray, np.ndarray]:
    if not FACE.is_file():
        pytest.skip(f"shared test data not found at {DATA}")
    image = cv2.imread(str(FACE))
    return image, ph.FaceLandmarks()(image)


def _sample(map_x: np.ndarray, map_y: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Where the warp reads each output point from (bilinear on the maps)."""
    px, py = points[:, :1].astype(np.float32), points[:, 1:].astype(np.float32)
    return np.stack([cv2.remap(map_x, px, py, cv2.INTER_LINEAR).ravel(),
                     cv2.remap(map_y, px, py, cv2.INTER_LINEAR).ravel()], -1)


def _maps(image: np.ndarray, before: np.ndarray, after: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    anchors = ph._anchor_points(before, image.shape[:2])
    step = max(1, int(ph.interocular(before) // 16))  # as warp_image does
    return ph.warp_maps(image.shape[:2], np.concatenate([before, anchors]), np.concatenate([after, anchors]), step)


@needs_data
def test_morph_targets_match_requested_magnitudes(face: tuple[np.ndarray, np.ndarray]) -> None:
    _, before = face
    magnitudes = ph.Magnitudes(nose=1.4, jaw=1.15, chin=0.25, lips=1.6, brow=0.1)
    after = ph.morph_landmarks(before, magnitudes, np.random.default_rng(0), NO_JITTER)
    iod = ph.interocular(before)
    # The face is nearly upright, so image x/y are the face's axes to within a few per cent.
    def width(pts: np.ndarray, left: int, right: int) -> float:
        return float(pts[right, 0] - pts[left, 0])

    assert width(after, 31, 35) / width(before, 31, 35) == pytest.approx(1.4, rel=0.02)  # alar width
    assert width(after, 4, 12) / width(before, 4, 12) == pytest.approx(1.15, rel=0.02)  # mandible
    assert (after[8, 1] - before[8, 1]) / iod == pytest.approx(0.25, abs=0.01)
    assert ((after[17:27, 1] - before[17:27, 1]) / iod) == pytest.approx(np.full(10, 0.1), abs=0.01)
    # Lip thickness alone (the chin also drags the lower lip down, so leave it out here).
    lips_only = ph.morph_landmarks(before, ph.Magnitudes(1.0, 1.0, 0.0, 1.6, 0.0), np.random.default_rng(0),
                                   NO_JITTER)
    lower_lip = [pts[57, 1] - pts[65:68, 1].mean() for pts in (lips_only, before)]
    assert lower_lip[0] / lower_lip[1] == pytest.approx(1.6, rel=0.05)
    np.testing.assert_array_equal(after[36:48], before[36:48])


@needs_data
def test_warp_moves_pixels_to_targets_and_keeps_eyes(face: tuple[np.ndarray, np.ndarray]) -> None:
    image, before = face
    rng = np.random.default_rng(1)
    after = ph.morph_landmarks(before, ph.draw_magnitudes(3, rng), rng)
    map_x, map_y = _maps(image, before, after)
    # Output pixel at each target landmark is read from the original landmark position (up to
    # the spline being evaluated on a coarse grid).
    moved = np.setdiff1d(np.arange(68), ph.EYES)
    assert np.abs(_sample(map_x, map_y, after[moved]) - before[moved]).max() < 0.05 * ph.interocular(before)
    # Eyes: no displacement anywhere on the eye landmarks.
    assert np.abs(_sample(map_x, map_y, before[ph.EYES]) - before[ph.EYES]).max() < 1.5
    # And the alar width in the warped image really grew: the nose corners sit further apart.
    assert (after[35, 0] - after[31, 0]) > 1.2 * (before[35, 0] - before[31, 0])


@needs_data
def test_level_one_changes_little(face: tuple[np.ndarray, np.ndarray]) -> None:
    image, landmarks = face
    iod = ph.interocular(landmarks)
    shifts, diffs = {}, {}
    for level in (1, 3):
        phantom = ph.make_phantom(image, level, np.random.default_rng(level), landmarks)
        assert phantom.pixels.shape == image.shape and phantom.level == level
        shifts[level] = np.linalg.norm(phantom.landmarks_after - phantom.landmarks_before, axis=1).max() / iod
        diffs[level] = np.abs(phantom.pixels.astype(int) - image).mean()
    assert shifts[1] < 0.1 < shifts[3]
    assert diffs[1] < 0.5 * diffs[3]


def test_level_ranges_grow_and_are_drawn_within_bounds() -> None:
    rng = np.random.default_rng(0)
    for level in ph.LEVELS:
        for _ in range(20):
            m = ph.draw_magnitudes(level, rng)
            for name in ph.Magnitudes.__dataclass_fields__:
                low, high = getattr(ph.LEVEL_RANGES[level], name)
                assert low <= getattr(m, name) <= high
    for name in ph.Magnitudes.__dataclass_fields__:
        mids = [sum(getattr(ph.LEVEL_RANGES[level], name)) / 2 for level in ph.LEVELS]
        assert mids == sorted(mids)
    with pytest.raises(ValueError):
        ph.draw_magnitudes(4, rng)


@needs_data
def test_video_phantom_decodes_with_requested_frames(face: tuple[np.ndarray, np.ndarray], tmp_path: Path) -> None:
    av = pytest.importorskip("av")
    image, landmarks = face
    video = ph.make_phantom_video(image, 2, tmp_path / "clip.mp4", np.random.default_rng(0), frames=10, fps=10.0,
                                  size=(192, 160), landmarks=landmarks)
    with av.open(str(video.path)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == video.frames == 10
    assert frames[0].shape == (160, 192, 3)


@needs_data
def test_video_phantom_is_reproducible(face: tuple[np.ndarray, np.ndarray], tmp_path: Path) -> None:
    """The demo and the e2e clip test rely on it: x264's threads and macroblock tree made each run's bytes differ."""
    image, landmarks = face
    digests = set()
    for run in range(3):
        clutter = [np.random.default_rng(run).integers(0, 255, 50_000 * (run + 1), dtype=np.uint8)]  # other heap contents
        video = ph.make_phantom_video(image, 3, tmp_path / f"clip{run}.mp4", np.random.default_rng(5), frames=12,
                                      landmarks=landmarks)
        digests.add(hashlib.sha256(video.path.read_bytes()).hexdigest())
        del clutter
    assert len(digests) == 1


@needs_data
def test_run_phantom_writes_tree_and_manifest(tmp_path: Path) -> None:
    """With video, each phantom's PNG is kept (and listed) and its clip written beside it."""
    identities = tmp_path / "identities"
    (identities / "Eileen_Collins").mkdir(parents=True)
    (identities / "Eileen_Collins" / "1.jpg").write_bytes(FACE.read_bytes())
    manifest = ph.run_phantom(identities, tmp_path / "out", levels=(1, 3), per_image=2, split="all", video=True,
                              video_frames=2)
    with manifest.open() as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["score"], r["subject_id"]) for r in rows] == [
        ("1", "Eileen_Collins-L1")] * 2 + [("3", "Eileen_Collins-L3")] * 2
    for row in rows:
        assert row["path"].endswith(".png") and cv2.imread(str(tmp_path / "out" / row["path"])) is not None
        assert (tmp_path / "out" / row["path"]).with_suffix(".mp4").stat().st_size > 0
    assert (tmp_path / "out" / "3" / "Eileen_Collins-L3" / "1-1.png").is_file()


@needs_data
def test_split_file_lists_the_holdout() -> None:
    holdout = ph.holdout_identities(DATA / "faces" / "SPLIT.md")
    assert len(holdout) == 41 and "Yasser_Arafat" in holdout and "Eileen_Collins" not in holdout


@needs_data
def test_holdout_clips_come_from_the_first_photograph_or_from_each(tmp_path: Path) -> None:
    first = [(source, clip.level) for source, clip in ph.holdout_clips(DATA / "faces", tmp_path, people=1, frames=4)]
    assert first == [("Alastair_Campbell", level) for level in ph.LEVELS]
    each = [(source, clip.level) for source, clip in ph.holdout_clips(
        DATA / "faces", tmp_path, people=1, photos=None, frames=4)]
    photos = sorted(p.stem for p in (DATA / "faces" / "identities" / "Alastair_Campbell").glob("*.jpg"))
    assert len(photos) > 1
    assert each == [(f"Alastair_Campbell.{photo}", level) for photo in photos for level in ph.LEVELS]
