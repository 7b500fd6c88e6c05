"""Streams: keyframes and tracking, a stable subject, and steadier eyes in frontalized crops."""

from __future__ import annotations

import dataclasses
import itertools
import threading
import time
from concurrent.futures import Future
from pathlib import Path

import av
import cv2
import numpy as np
import pytest
from acroscreen.server.runtime.detect import HaarFaceDetector
from acroscreen.server.runtime.frontalize import CropGeometry, eye_centres, warp_face
from acroscreen.server.runtime.landmarks import LandmarkFitter
from acroscreen.server.runtime.preprocess import FacePreprocessor, PreprocessSettings
from acroscreen.server.runtime.tracking import FaceTracker, TrackedSubject, centre_jump
from acroscreen.server.runtime.types import Box, RejectReason

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason=f"shared test data not found at {DATA} (CI provides it)")
FRAMES_PER_CLIP = 10
CLIP_START = {"hamilton_short_clip.mp4": 84}  # the performer faces the camera from here


@pytest.fixture(scope="module")
def preprocessor() -> FacePreprocessor:
    return FacePreprocessor(PreprocessSettings())


def clip(path: Path, count: int | None = FRAMES_PER_CLIP, start: int | None = None) -> list[np.ndarray]:
    """`count` frames (None: all) from `start` (None: where the clip shows a usable face)."""
    start = CLIP_START.get(path.name, 0) if start is None else start
    frames = []
    with av.open(str(path)) as container:
        for index, frame in enumerate(container.decode(video=0)):
            if index >= start:
                frames.append(frame.to_ndarray(format="bgr24"))
            if len(frames) == count:
                break
    return frames


def eyes_in_crop(crop_bgr: np.ndarray, fitter: LandmarkFitter, geometry: CropGeometry) -> np.ndarray:
    """Eye centres re-fitted on the crop (4× upscaled for sub-pixel precision), as a 2×2 array."""
    big = cv2.resize(crop_bgr, None, fx=4, fy=4, interpolation=cv2.INTER_CUBIC)
    (lx, ly), (rx, _ry) = geometry.eye_positions
    width = (rx - lx) / 0.35
    box = Box((lx + rx) / 2 - width / 2, ly - 0.4 * width, width, width).scaled(4)
    return (np.stack(eye_centres(fitter.fit(big, box))) + 0.5) / 4 - 0.5


def mean_step(positions: list[np.ndarray | None]) -> list[float]:
    return [
        float(np.linalg.norm(b - a, axis=1).mean())
        for a, b in itertools.pairwise(positions)
        if a is not None and b is not None
    ]


def eye_steps(preprocessor: FacePreprocessor, frames: list[np.ndarray]) -> tuple[list[float], list[float]]:
    """Frame-to-frame eye movement (px, mean of both eyes) in raw and in frontalized crops.

    Raw crop = the detector box heightened (the paper without alignment), detected every frame.
    A frame counts only when both find the same face.
    """
    fitter = LandmarkFitter(5)
    raw_geometry = CropGeometry(alignment="box")
    detector = HaarFaceDetector()
    tracker = preprocessor.settings.new_tracker()
    raw: list[np.ndarray | None] = []
    aligned: list[np.ndarray | None] = []
    for frame in frames:
        analysis = preprocessor.analyze(frame, tracker)
        detection = detector.detect(frame)
        if analysis.affine is None or analysis.detection is None or detection is None or (
            centre_jump(analysis.detection.box, detection.box) > 0.5  # Haar's pick is another face
        ):
            raw.append(None)
            aligned.append(None)
            continue
        aligned_crop = warp_face(frame, analysis.affine, 160)  # what crop() returns, in BGR
        raw_crop = warp_face(frame, raw_geometry.affine_from_box(detection.box), 160)
        aligned.append(eyes_in_crop(aligned_crop, fitter, preprocessor.geometry))
        raw.append(eyes_in_crop(raw_crop, fitter, preprocessor.geometry))
    return mean_step(raw), mean_step(aligned)


def jitter_ratios(preprocessor: FacePreprocessor, count: int | None, start: int | None) -> tuple[float, int, list[float]]:
    """Overall ratio of mean eye steps, frontalized / raw, its number of frame pairs, and each clip's ratio."""
    raw_steps: list[float] = []
    aligned_steps: list[float] = []
    per_clip = []
    for path in sorted((DATA / "videos").glob("*.mp4")):
        clip_raw, clip_aligned = eye_steps(preprocessor, clip(path, count, start))
        raw_mean, aligned_mean = np.mean(clip_raw or [np.nan]), np.mean(clip_aligned or [np.nan])
        per_clip.append(float(aligned_mean / raw_mean))
        print(
            f"{path.name}: {len(clip_raw)} pairs, eye step raw {raw_mean:.2f} px, "
            f"frontalized {aligned_mean:.2f} px, ratio {per_clip[-1]:.3f}"
        )
        raw_steps += clip_raw
        aligned_steps += clip_aligned
    ratio = float(np.mean(aligned_steps) / np.mean(raw_steps))
    print(f"jitter ratio frontalized/raw = {ratio:.3f} over {len(raw_steps)} frame pairs")
    return ratio, len(raw_steps), per_clip


def test_frontalized_eyes_jitter_far_less_than_raw_crops(preprocessor: FacePreprocessor) -> None:
    """10 frames a clip keep this fast; the slow test below measures every frame (docs/preprocessing.md)."""
    ratio, pairs, _ = jitter_ratios(preprocessor, FRAMES_PER_CLIP, None)
    assert pairs >= 40
    assert ratio < 0.4


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_frontalized_eyes_jitter_over_every_frame(preprocessor: FacePreprocessor) -> None:
    """Every frame of every clip (~2,100; a few minutes): the figures in docs/preprocessing.md."""
    ratio, pairs, per_clip = jitter_ratios(preprocessor, None, 0)
    assert pairs >= 1500
    assert ratio < 0.4
    assert max(per_clip) < 0.5


@pytest.mark.parametrize("lag", [0, 3], ids=["in-line", "beside"])
def test_keyframes_and_tracking(lag: int) -> None:
    """One face all along: each scheduled keyframe finds it again, so the gap doubles up to the maximum.

    In line (lag 0) a keyframe's frame waits for the detection; beside (lag 3) that frame is
    tracked, the detection runs on a check thread, and its verdict lands 3 frames later: the
    detector runs as often, on the same frames, and the gap doubles 3 frames later.
    """
    frames = clip(DATA / "videos" / "retalking_face3.mp4", count=None)
    detector = CountingDetector()
    preprocessor = FacePreprocessor(PreprocessSettings(keyframe_check_lag=lag), detector)
    settings = preprocessor.settings
    tracker = settings.new_tracker()
    analyses, gaps, searches = [], [], []
    for frame in frames:
        analyses.append(preprocessor.analyze(frame, tracker))
        gaps.append(tracker.keyframe_gap)
        searches.append(detector.searches)
    expected, gap = [0], settings.keyframe_interval
    while expected[-1] + gap < len(frames):
        expected.append(expected[-1] + gap)
        gap = min(2 * gap, settings.max_keyframe_interval)
    assert len(frames) > 100 and expected[:4] == [0, 10, 30, 70]
    assert [i for i, a in enumerate(analyses) if a.keyframe] == (expected if lag == 0 else [0])
    doubled = [i for i in range(1, len(gaps)) if gaps[i] > gaps[i - 1]]
    assert doubled == [k + lag for k in expected[1:3]]  # 10 → 20 → 40, then it stays at the maximum
    assert searches[expected[2] + lag] == 3  # a verdict applied is a detection run, once
    assert all(a.accepted for a in analyses), [a.detail for a in analyses]
    first, last = analyses[0].detection, analyses[-1].detection
    assert first is not None and last is not None
    assert np.hypot(*np.subtract(first.box.center, last.box.center)) < 0.3 * first.box.width


def test_a_large_followed_face_is_analysed_on_a_smaller_decode_in_frame_coordinates(
    preprocessor: FacePreprocessor,
) -> None:
    """An HD frame whose followed face stays large at half size is analysed there: the stream's
    tracker, the box and landmarks stay in frame coordinates, quality judges frame pixels, and
    the crop is the one a full-size analysis makes, give or take resampling."""
    frames = [cv2.resize(f, None, fx=2, fy=2, interpolation=cv2.INTER_CUBIC) for f in clip(DATA / "videos" / "retalking_face3.mp4")]
    settings = preprocessor.settings
    full_tracker, reduced_tracker = settings.new_tracker(), settings.new_tracker()
    assert settings.decode_reduction(reduced_tracker) == 1  # nothing followed yet: a search, in full
    reductions = []
    for frame in frames:
        full = preprocessor.analyze(frame, full_tracker)
        reduction = settings.decode_reduction(reduced_tracker)
        reductions.append(reduction)
        small = cv2.resize(frame, None, fx=1 / reduction, fy=1 / reduction, interpolation=cv2.INTER_AREA)
        reduced = preprocessor.analyze(small, reduced_tracker, scale=float(reduction))
        assert full.accepted and reduced.accepted, reduced.detail
        assert full.detection is not None and reduced.detection is not None
        assert abs(reduced.detection.box.width - full.detection.box.width) < 0.04 * full.detection.box.width
        assert centre_jump(full.detection.box, reduced.detection.box) < 0.04
        assert np.abs(reduced.landmarks - full.landmarks).max() < 0.05 * full.detection.box.width
        assert reduced.quality is not None and full.quality is not None
        assert reduced.quality.face_size == full.quality.face_size == 1.0
        crop_full = preprocessor.crop(frame, full).pixels.astype(int)
        crop_reduced = preprocessor.crop(small, reduced).pixels.astype(int)
        assert np.abs(crop_full - crop_reduced).mean() < 6
        subject_full, subject_reduced = full_tracker.subject, reduced_tracker.subject
        assert subject_full is not None and subject_reduced is not None
        assert abs(subject_reduced.box.width - subject_full.box.width) < 0.04 * subject_full.box.width
    # Keyframes decode in full; in between, this ~300-pixel face is followed at half size.
    assert reductions == [1 if i % settings.keyframe_interval == 0 else 2 for i in range(len(frames))]
    assert PreprocessSettings(reduced_decode_face_px=0).decode_reduction(full_tracker) == 1


def paste(canvas: np.ndarray, face: np.ndarray, x: int, y: int) -> np.ndarray:
    out = canvas.copy()
    out[y : y + face.shape[0], x : x + face.shape[1]] = face
    return out


def test_the_keyframe_gap_starts_again_when_the_face_count_changes_or_tracking_is_lost() -> None:
    tracker = FaceTracker(keyframe_interval=10, max_keyframe_interval=40)
    one = TrackedSubject(Box(100, 100, 80, 80), confidence=0.9, face_count=1, roll_deg=0.0)
    tracker.keyframe(one)  # a search found the face: not a confirmation
    assert tracker.keyframe_gap == 10
    gaps = []
    for _ in range(4):
        tracker.keyframe(one, same_subject=True)
        gaps.append(tracker.keyframe_gap)
    assert gaps == [20, 40, 40, 40]
    tracker.keyframe(dataclasses.replace(one, face_count=2), same_subject=True)  # someone else came into view
    assert tracker.keyframe_gap == 10
    tracker.keyframe(dataclasses.replace(one, face_count=2), same_subject=True)
    assert tracker.keyframe_gap == 20
    tracker.lost()
    tracker.keyframe(dataclasses.replace(one, face_count=2), same_subject=True)  # found again by a search
    assert tracker.keyframe_gap == 10
    with pytest.raises(ValueError, match="max_keyframe_interval"):
        PreprocessSettings(keyframe_interval=10, max_keyframe_interval=5)


def test_second_face_does_not_take_over_and_a_new_face_is_flagged(preprocessor: FacePreprocessor) -> None:
    person_a = cv2.imread(str(DATA / "faces" / "identities" / "John_Rosa" / "2.jpg"))
    person_b = cv2.imread(str(DATA / "faces" / "identities" / "Joe_Biden" / "2.jpg"))
    person_b = cv2.resize(person_b, (400, 400), interpolation=cv2.INTER_AREA)  # face ≈ 180 px, A's ≈ 115 px
    empty = cv2.resize(cv2.imread(str(DATA / "faces" / "none" / "coffee.jpg")), (1000, 560))
    alone = paste(empty, person_a, 40, 150)
    together = paste(alone, person_b, 560, 80)
    b_alone = paste(empty, person_b, 560, 80)

    tracker = preprocessor.settings.new_tracker()
    both = preprocessor.settings.keyframe_interval + 2  # long enough to hold a keyframe
    stream = [alone] * 3 + [together] * both + [b_alone] * (both - 1)
    analyses = [preprocessor.analyze(frame, tracker) for frame in stream]
    reasons = [a.rejection for a in analyses]
    print([(r.value if r else "ok", a.detection and a.detection.face_count) for r, a in zip(reasons, analyses)])
    with_b = analyses[3 : 3 + both]
    for analysis in with_b:  # A stays the subject although B is larger
        assert analysis.detection is not None and analysis.detection.box.center[0] < 400
        assert analysis.rejection is None
    assert any(a.keyframe and a.detection is not None and a.detection.face_count == 2 for a in with_b)
    assert reasons[3 + both :].count(RejectReason.FACE_CHANGED) == 1
    changed = reasons.index(RejectReason.FACE_CHANGED)
    assert "different face" in analyses[changed].detail
    for analysis in analyses[changed + 1 :]:  # then B is followed
        assert analysis.accepted and analysis.detection is not None and analysis.detection.box.center[0] > 500


class CountingDetector(HaarFaceDetector):
    """The real cascade, counting its searches and recording the smallest face size each looked for."""

    def __init__(self) -> None:
        super().__init__()
        self.min_sizes: list[float] = []

    @property
    def searches(self) -> int:
        return len(self.min_sizes)

    def detect_all(self, image_bgr: np.ndarray, min_face_px: float = 0.0) -> list[tuple[Box, float]]:
        self.min_sizes.append(min_face_px)
        return super().detect_all(image_bgr, min_face_px)


def test_a_still_empty_scene_waits_for_its_searches_until_someone_steps_in() -> None:
    """A fixed camera on an empty room: the detector would see the same pixels, so it looks again
    only every still_search_gap frames; the first frame with someone in it is searched at once."""
    detector = CountingDetector()
    preprocessor = FacePreprocessor(PreprocessSettings(roll_search_deg=()), detector)
    empty = cv2.resize(cv2.imread(str(DATA / "faces" / "none" / "coffee.jpg")), (1000, 560))
    tracker = preprocessor.settings.new_tracker()
    rng = np.random.default_rng(0)  # sensor noise: the scene is the same, the pixels are not
    noisy = [np.clip(empty + rng.normal(0, 3, empty.shape), 0, 255).astype(np.uint8) for _ in range(4)]
    analyses = [preprocessor.analyze(noisy[i % 4], tracker) for i in range(155)]
    assert all(a.rejection is RejectReason.NO_FACE for a in analyses)
    assert [i for i, a in enumerate(analyses) if a.keyframe] == [0, 150]  # still_search_gap
    assert detector.searches == 2
    assert all("the picture is the one searched" in a.detail for a in analyses if not a.keyframe)

    person = cv2.imread(str(DATA / "faces" / "identities" / "John_Rosa" / "2.jpg"))
    stepped_in = [preprocessor.analyze(paste(empty, person, 40, 150), tracker) for _ in range(5)]
    assert [a.accepted for a in stepped_in] == [True] * 5, [a.detail for a in stepped_in]
    assert stepped_in[0].keyframe and detector.searches == 3


def test_a_changing_empty_scene_is_searched_less_and_less_often() -> None:
    """Something moving in the room, no cut: the n-th miss in a row waits min(n, max_search_gap) frames."""
    detector = CountingDetector()
    preprocessor = FacePreprocessor(PreprocessSettings(roll_search_deg=()), detector)
    empty = cv2.resize(cv2.imread(str(DATA / "faces" / "none" / "coffee.jpg")), (1000, 560))
    tracker = preprocessor.settings.new_tracker()
    frames = []
    for i in range(30):  # a grey card crossing the room, 25 px a frame
        frame = empty.copy()
        frame[250:310, 100 + 25 * i : 160 + 25 * i] = 200
        frames.append(frame)
    analyses = [preprocessor.analyze(frame, tracker) for frame in frames]
    assert all(a.rejection is RejectReason.NO_FACE for a in analyses)
    assert [i for i, a in enumerate(analyses) if a.keyframe] == [0, 1, 3, 6, 10, 15, 21, 28]
    assert detector.searches == 8
    assert all("the scene is unchanged, with no cut" in a.detail for a in analyses if not a.keyframe)


def test_a_moving_empty_scene_is_searched_on_the_back_off_schedule() -> None:
    """A pan drifts far from the searched frame but never cuts: it waits for its searches like a still scene."""
    detector = CountingDetector()
    preprocessor = FacePreprocessor(PreprocessSettings(roll_search_deg=()), detector)
    wide = cv2.resize(cv2.imread(str(DATA / "faces" / "none" / "coffee.jpg")), (1600, 560))
    frames = [wide[:, 12 * i : 12 * i + 1000] for i in range(50)]  # 12 px a frame: 0.4 s to cross a face
    tracker = preprocessor.settings.new_tracker()
    analyses = [preprocessor.analyze(frame, tracker) for frame in frames]
    assert all(a.rejection is RejectReason.NO_FACE for a in analyses)
    # At most one search every max_search_gap (10) frames once the back-off has grown.
    assert [i for i, a in enumerate(analyses) if a.keyframe] == [0, 1, 3, 6, 10, 15, 21, 28, 36, 45]
    assert detector.searches == 10


def test_a_stream_of_different_photographs_is_searched_every_frame() -> None:
    """Photo sets sent as a stream: each photograph is a new scene, so none waits for a search."""
    detector = CountingDetector()
    preprocessor = FacePreprocessor(PreprocessSettings(roll_search_deg=()), detector)
    photos = [cv2.imread(str(p)) for p in sorted((DATA / "faces" / "none").glob("*.jpg"))[:5]]
    photos.append(cv2.imread(str(DATA / "faces" / "identities" / "John_Rosa" / "2.jpg")))
    tracker = preprocessor.settings.new_tracker()
    analyses = [preprocessor.analyze(photo, tracker) for photo in photos]
    assert detector.searches == len(photos)
    assert all(a.keyframe for a in analyses)
    assert analyses[-1].accepted, analyses[-1].detail


class CheckThreadDetector(HaarFaceDetector):
    """The real cascade; on a keyframe-check thread it first sleeps, or fails, as told."""

    def __init__(self, *, sleep_s: float = 0.0, fail: bool = False) -> None:
        super().__init__()
        self.sleep_s, self.fail = sleep_s, fail

    def detect_all(self, image_bgr: np.ndarray, min_face_px: float = 0.0) -> list[tuple[Box, float]]:
        if threading.current_thread().name.startswith("keyframe-check"):
            if self.fail:
                raise RuntimeError("a bug in a keyframe check")
            time.sleep(self.sleep_s)
        return super().detect_all(image_bgr, min_face_px)


def test_a_stream_gets_the_same_answers_however_long_its_keyframe_checks_take() -> None:
    """A check's verdict is applied on a fixed frame, waiting for it there: a slow check thread
    changes when the answers come, never what they are."""
    frames = clip(DATA / "videos" / "liveportrait_d9.mp4", count=45)

    def run(detector: HaarFaceDetector) -> list[tuple[float, ...]]:
        preprocessor = FacePreprocessor(PreprocessSettings(), detector)
        tracker = preprocessor.settings.new_tracker()
        out = []
        for frame in frames:
            analysis = preprocessor.analyze(frame, tracker)
            assert analysis.detection is not None and analysis.landmarks is not None, analysis.detail
            out.append((*analysis.detection.box.center, *analysis.landmarks.ravel(), tracker.keyframe_gap))
        return out

    assert run(CheckThreadDetector()) == run(CheckThreadDetector(sleep_s=0.15))


def test_a_failing_keyframe_check_costs_an_in_line_keyframe_not_the_stream(caplog: pytest.LogCaptureFixture) -> None:
    frames = clip(DATA / "videos" / "retalking_face3.mp4", count=20)
    preprocessor = FacePreprocessor(PreprocessSettings(), CheckThreadDetector(fail=True))
    tracker = preprocessor.settings.new_tracker()
    analyses = [preprocessor.analyze(frame, tracker) for frame in frames]
    assert all(a.accepted for a in analyses), [a.detail for a in analyses]
    assert [i for i, a in enumerate(analyses) if a.keyframe] == [0, 13]  # the check of frame 10 failed
    assert "keyframe check failed" in caplog.text and "a bug in a keyframe check" in caplog.text


def test_a_keyframe_check_is_settled_on_the_lag_th_frame_and_dropped_when_tracking_is_lost() -> None:
    tracker = FaceTracker(keyframe_interval=2, max_keyframe_interval=8)
    one = TrackedSubject(Box(100, 100, 80, 80), confidence=0.9, face_count=1, roll_deg=0.0)
    tracker.keyframe(one)
    tracker.tracked(Box(102, 100, 80, 80), 0.0)
    assert tracker.keyframe_due and tracker.check_may_run_beside
    check: Future[None] = Future()
    tracker.check_started(check, 3, appearance=np.ones((32, 32), np.float32))
    assert not tracker.keyframe_due and not tracker.verdict_due
    for _ in range(2):
        tracker.tracked(Box(104, 100, 80, 80), 0.0)
    assert tracker.verdict_due and tracker.take_check() is check
    tracker.confirmed(dataclasses.replace(one, confidence=0.5, box=Box(0, 0, 10, 10)), frames_since=3)
    assert tracker.keyframe_gap == 4 and not tracker.keyframe_due
    assert tracker.subject is not None and tracker.subject.box.x > 100 and tracker.subject.confidence == 0.5

    tracker.tracked(Box(104, 100, 80, 80), 0.0)  # 4 frames since the checked one: the next check is due
    pending: Future[None] = Future()
    tracker.check_started(pending, 3, appearance=np.ones((32, 32), np.float32))
    tracker.lost()
    assert pending.cancelled() and tracker.keyframe_due and not tracker.verdict_due

    tracker.keyframe(one)
    tracker.tracked(Box(102, 100, 80, 80), 0.0)
    tracker.check_started(Future(), 1, appearance=np.ones((32, 32), np.float32))
    assert tracker.verdict_due
    tracker.take_check()
    tracker.recheck()  # the check did not confirm: an in-line keyframe now, not another check
    assert tracker.keyframe_due and not tracker.check_may_run_beside
    with pytest.raises(ValueError, match="lag"):
        tracker.check_started(Future(), 0, appearance=np.ones((32, 32), np.float32))


def test_a_followed_face_that_only_changed_its_look_is_redetected_at_its_size_not_searched_for() -> None:
    """In this clip the face's look drifts from its keyframe's within 8 frames (the appearance check
    refuses the fit) while the fit stays where the face is: the keyframe that follows looks only for
    faces of about its size, as a scheduled one does, instead of searching every size."""
    frames = clip(DATA / "videos" / "liveportrait_d3.mp4", count=20)
    detector = CountingDetector()
    preprocessor = FacePreprocessor(PreprocessSettings(keyframe_check_lag=0), detector)
    tracker = preprocessor.settings.new_tracker()
    analyses = [preprocessor.analyze(frame, tracker) for frame in frames]
    assert all(a.accepted for a in analyses), [a.detail for a in analyses]
    unscheduled = [i for i, a in enumerate(analyses) if a.keyframe and i not in (0, 10)]
    assert unscheduled, "the clip no longer drifts: pick another"
    assert detector.min_sizes[0] == 0.0 and all(size > 0.0 for size in detector.min_sizes[1:]), detector.min_sizes


def test_a_look_change_redetects_in_line_and_starts_the_keyframe_gap_again() -> None:
    tracker = FaceTracker(keyframe_interval=2, max_keyframe_interval=8)
    one = TrackedSubject(Box(100, 100, 80, 80), confidence=0.9, face_count=1, roll_deg=0.0)
    tracker.keyframe(one)
    tracker.keyframe(one, same_subject=True)
    assert tracker.keyframe_gap == 4
    tracker.look_changed()
    assert tracker.keyframe_due and tracker.following and not tracker.check_may_run_beside
    tracker.keyframe(one, same_subject=True)  # found again where it was: no confirmation
    assert tracker.keyframe_gap == 2
    tracker.keyframe(one, same_subject=True)
    assert tracker.keyframe_gap == 4
