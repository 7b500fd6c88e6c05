"""One preprocessing path for serving, training and the CLI: detect or track, landmarks,
pose, quality gate, frontalized crop.

``FacePreprocessor(PreprocessSettings()).crop_image(img)`` is what training calls for
stills; the server calls ``analyze`` per frame (with the stream's ``FaceTracker``) and
``crop`` for each accepted face. The crop's geometry depends only on ``CropGeometry``
(input size, box height expansion, alignment name), which the model card carries.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import cv2
import numpy as np

from .detect import DetectorSettings, HaarFaceDetector, HogFaceDetector, hog_confidence, subject_preference
from .frontal3d import frontal_warp
from .frontalize import (
    BOX_ALIGNMENT,
    CANONICAL_EYE_DISTANCE,
    FRONTAL_3D_V1,
    SIMILARITY_EYES_V1,
    CropGeometry,
    eye_centres,
    nose_base,
    transform_points,
    warp_face,
)
from .landmarks import LandmarkFitter
from .pose import estimate_pose, roll_deg
from .quality import QualityInputs, QualitySettings, assess
from .tracking import FaceTracker, SearchMiss, TrackedSubject, box_from_landmarks, centre_jump, iou
from .types import (
    Box,
    Detection,
    FaceCrop,
    FrameRejected,
    HeadPose,
    Quality,
    RejectReason,
)


class CardPreprocessing(Protocol):
    """The geometry fields of weights.Preprocessing (read duck-typed)."""

    input_size: int
    box_height_expand: float
    alignment: str
    landmark_points: int


@dataclass(frozen=True, slots=True, kw_only=True)
class PreprocessSettings:
    """Every knob of the stage. The first four fix the crop geometry and go into the model card."""

    landmark_points: int = 5  # 5 (commercial use allowed) or 68 (research/non-commercial)
    input_size: int = 160
    box_height_expand: float = 0.4
    alignment: str = SIMILARITY_EYES_V1
    keyframe_interval: int = 10  # streams: detect every N analysed frames, track in between
    # … and up to every this many while scheduled keyframes keep finding the same face among as
    # many faces (the gap doubles each time): a keyframe cost a worker as much as its ~10 tracked
    # frames together (Haar over the frame, then every candidate's fit and HOG check).
    max_keyframe_interval: int = 40
    max_subject_jump: float = 1.0  # face widths a keyframe detection may be from the subject to be the same person
    max_candidates: int = 4  # detections verified per keyframe, most likely subject first
    min_face_evidence: float = -0.5  # HOG score on the aligned crop below which a detection is not a face
    min_track_similarity: float = 0.5  # correlation with the keyframe's aligned face below which tracking is lost
    roll_search_deg: tuple[float, ...] = (-20.0, 20.0)  # Haar misses faces tilted > ~15°: retry rotated
    # A scheduled keyframe of a followed face looks for faces at least this fraction of its width:
    # the cascade's small scales cost the most, and a much smaller face is not a new subject.
    keyframe_min_face_ratio: float = 0.7
    # A scheduled keyframe of a followed face runs beside the stream: its frame is tracked like any
    # other, the detection (Haar over the frame, each candidate's fit and HOG check: 20-50 ms here,
    # ten tracked frames' worth) runs on one of ``keyframe_check_threads`` threads, and its verdict
    # is applied before the ``keyframe_check_lag``-th analysed frame after it (waiting there if it
    # is late), so every run of a stream gives the same answers. Streams then pay no frame's
    # latency for keyframes. 0 = the keyframe is detected in line, on its own frame.
    keyframe_check_lag: int = 3
    keyframe_check_threads: int = 2
    # While no face is found, the n-th miss in a row defers the next search by min(n, this) frames,
    # unless the frame is a different picture from the frame before it: a 4×4-cell block of the
    # frames' 24×24 brightness-normalised grey thumbnails differs by ``scene_change`` grey levels
    # or more (two different photographs: ≥ 80 in our data, so a photo set streamed as frames is
    # searched photo by photo; consecutive frames of a moving camera: mostly < 50; a face stepping
    # into a still room: ~40, found at the next scheduled search). Frame to frame, not against the
    # searched frame: a pan drifts past the threshold within a few frames, and searching on that
    # drift cost the face-less Hamilton clip a search every ~4 frames. So a face-less stream
    # without cuts is searched at most once every ``max_search_gap`` frames (a third of a second
    # at 30 fps) once the back-off has grown. 1 = search every frame.
    max_search_gap: int = 10
    scene_change: float = 60.0
    # A frame whose thumbnail is within ``still_scene`` grey levels (largest block difference) of
    # the frame the last search missed on is the same picture: a fixed camera's noise and codec
    # changes are ≤ 0.4 in our clips, a talking head moves 4–27 in a third of a second (medians).
    # The detector would see the same pixels, so such a picture waits up to ``still_search_gap``
    # frames (5 s at 30 fps) for its next search: an empty room costs a decode and a thumbnail a
    # frame instead of a search every 10 frames. Anyone stepping in moves a block more: a head
    # whose face box is 64 px (the smallest the quality gate takes) appearing alone in a still
    # 1080p scene moved its block by 4.5 (the scene's noise: 0.3).
    still_scene: float = 2.0
    still_search_gap: int = 150
    fit_min_box_px: float = 200.0  # smaller faces are fitted on an upscaled patch (dlib returns whole pixels)
    # A JPEG frame whose followed face would still be at least this wide at 1/2 (or 1/4) of the
    # frame's size is decoded at that size (libjpeg scales in the DCT: a 720p frame 4.7 → 1.2 ms
    # here) and analysed there: the crop still shrinks the face, and quality is judged in frame
    # pixels. 0 = always decode in full.
    reduced_decode_face_px: float = 160.0
    detector: DetectorSettings = field(default_factory=DetectorSettings)
    quality: QualitySettings = field(default_factory=QualitySettings)

    def __post_init__(self) -> None:
        if self.keyframe_check_lag < 0 or self.keyframe_check_threads < 1:
            raise ValueError(f"keyframe_check_lag must be >= 0 and keyframe_check_threads >= 1, got "
                             f"{self.keyframe_check_lag} and {self.keyframe_check_threads}")
        if self.landmark_points not in (5, 68):
            raise ValueError(f"landmark_points must be 5 or 68, got {self.landmark_points}")
        if self.alignment == FRONTAL_3D_V1 and self.landmark_points != 68:
            raise ValueError(f"alignment {FRONTAL_3D_V1} needs 68 landmark points, got {self.landmark_points}")
        _ = self.geometry  # validates alignment, size and expansion
        _ = self.new_tracker()  # validates the keyframe and search intervals

    @property
    def geometry(self) -> CropGeometry:
        return CropGeometry(
            input_size=self.input_size, box_height_expand=self.box_height_expand, alignment=self.alignment
        )

    @classmethod
    def from_card_preprocessing(cls, preprocessing: CardPreprocessing, **overrides: Any) -> PreprocessSettings:
        """Settings that reproduce the crops a model was trained on (from its card's Preprocessing)."""
        points = int(preprocessing.landmark_points) or 5  # "box" alignment needs none; 5 still give pose
        values: dict[str, Any] = {
            "input_size": int(preprocessing.input_size),
            "box_height_expand": float(preprocessing.box_height_expand),
            "alignment": str(preprocessing.alignment),
            "landmark_points": points,
        }
        values.update(overrides)
        return cls(**values)

    def card_fields(self) -> Mapping[str, Any]:
        """The geometry fields to store in the model card's Preprocessing."""
        return {
            "input_size": self.input_size,
            "box_height_expand": self.box_height_expand,
            "alignment": self.alignment,
            "landmark_points": 0 if self.alignment == BOX_ALIGNMENT else self.landmark_points,
        }

    def new_tracker(self) -> FaceTracker:
        return FaceTracker(
            self.keyframe_interval, self.max_search_gap, self.still_search_gap, self.max_keyframe_interval
        )

    def decode_reduction(self, tracker: FaceTracker | None) -> int:
        """1, 2 or 4: how much smaller the next frame may be decoded, from the face the stream follows."""
        if not self.reduced_decode_face_px or tracker is None or not tracker.following or tracker.keyframe_due:
            return 1
        assert tracker.subject is not None
        width = tracker.subject.box.width
        return next((f for f in (4, 2) if width / f >= self.reduced_decode_face_px), 1)


@dataclass(frozen=True, slots=True, eq=False)
class FaceAnalysis:
    """One frame's outcome, rejections included, so a client learns the box, quality and why."""

    detection: Detection | None
    landmarks: np.ndarray | None  # points × 2, frame coordinates
    pose: HeadPose | None
    quality: Quality | None
    rejection: RejectReason | None
    detail: str
    affine: np.ndarray | None  # 2×3 frame → crop; present when the landmarks form a face (always if accepted)
    keyframe: bool = True  # False when the face was tracked rather than detected
    stage_seconds: tuple[tuple[str, float], ...] = ()  # detect / landmarks / warp / quality time, for metrics
    aligned: np.ndarray | None = field(default=None, repr=False, compare=False)  # the BGR crop quality was judged on
    upside_down: bool = False  # rejected as a face on its head: explains a search better than "no face"

    @property
    def accepted(self) -> bool:
        return self.rejection is None and self.affine is not None

    def in_frame(self, scale: float) -> FaceAnalysis:
        """This analysis of a copy of the frame at 1/``scale`` of its size, in the frame's coordinates."""
        if scale == 1.0:
            return self
        shrink = np.diag([1.0 / scale, 1.0 / scale, 1.0])
        return dataclasses.replace(
            self,
            detection=dataclasses.replace(self.detection, box=self.detection.box.scaled(scale)) if self.detection else None,
            landmarks=self.landmarks * np.float32(scale) if self.landmarks is not None else None,
            affine=self.affine @ shrink if self.affine is not None else None,
        )


@functools.lru_cache(maxsize=2)
def shared_fitter(points: int) -> LandmarkFitter:
    """dlib predictors are read-only once loaded; loading the 68-point one takes ~1 s, so share it.

    Processes forked after the first call share it too (see main._supervise).
    """
    return LandmarkFitter(points)


class FacePreprocessor:
    """Thread-safe and cheap to create: Haar classifiers are per thread; the HOG detector and the landmark model are shared.

    Per-stream state lives in the ``FaceTracker`` the caller passes, never here.
    """

    def __init__(self, settings: PreprocessSettings, detector: HaarFaceDetector | None = None) -> None:
        self.settings = settings
        self.geometry = settings.geometry
        self._detector = detector or HaarFaceDetector(settings.detector)
        self._fitter = shared_fitter(settings.landmark_points)
        self._hog = HogFaceDetector(settings.detector)
        # Threads start on the first check, so stills and training never start one.
        self._checks = ThreadPoolExecutor(settings.keyframe_check_threads, thread_name_prefix="keyframe-check")

    def analyze(
        self, image_bgr: np.ndarray, tracker: FaceTracker | None = None, scale: float = 1.0,
        scene: Callable[[], np.ndarray] | None = None,
    ) -> FaceAnalysis:
        """Find (or follow) the primary face and judge it; never raises for a bad frame.

        ``scale``: frame pixels per pixel of ``image_bgr`` (a frame decoded at reduced size); the
        analysis, and what the tracker keeps, are in the frame's coordinates all the same. Its
        ``aligned`` crop is what ``crop`` returns: re-warping would need the full frame.
        ``scene``: the frame's scene thumbnail, made when first asked for (see ``deferred_search``);
        by default from ``image_bgr``. A stream must make every thumbnail the same way.
        """
        clock = _thread_state.clock = _StageClock()
        view = tracker if tracker is None or scale == 1.0 else _ScaledTracker(tracker, scale)
        scene = scene or functools.cache(lambda: scene_thumbnail(image_bgr))
        analysis = self._analyze(image_bgr, view, scale, scene).in_frame(scale)  # type: ignore[arg-type]
        return dataclasses.replace(analysis, stage_seconds=tuple(clock.seconds.items()))

    def deferred_search(self, tracker: FaceTracker, scene: Callable[[], np.ndarray]) -> FaceAnalysis | None:
        """While a stream finds no face: this frame's rejection if its search can wait (the tracker
        counts it), else None. Needs only the frame's thumbnail, so a caller can ask before decoding
        the frame in full; ``analyze`` asks again with the same thumbnail and gets the same answer."""
        miss, last_scene, searched = tracker.last_miss, tracker.last_scene, tracker.searched_scene
        if miss is None:
            return None
        assert last_scene is not None and searched is not None
        thumbnail = scene()
        still = scene_difference(thumbnail, searched) < self.settings.still_scene
        if not tracker.search_can_wait(still) or scene_difference(thumbnail, last_scene) >= self.settings.scene_change:
            return None
        tracker.defer_search(thumbnail)
        unchanged = "the picture is the one searched" if still else "the scene is unchanged, with no cut"
        return dataclasses.replace(
            _rejected(miss.reason, f"{miss.detail} ({unchanged} since that search, "
                                   f"{tracker.frames_since_search} frame(s) ago; searching every "
                                   f"{tracker.search_gap(still)} frames until a face is found)"),
            keyframe=False,
        )

    def _analyze(
        self, image_bgr: np.ndarray, tracker: FaceTracker | None, scale: float, scene: Callable[[], np.ndarray],
    ) -> FaceAnalysis:
        if tracker is not None:
            if tracker.verdict_due:
                self._apply_verdict(tracker)
            subject = tracker.subject
            beside = self.settings.keyframe_check_lag > 0 and tracker.check_may_run_beside
            if subject is not None and (beside or not tracker.keyframe_due):
                tracked, in_place = self._track(image_bgr, subject, scale)
                if tracked is not None and tracked.landmarks is not None and tracked.affine is not None:
                    tracker.tracked(box_from_landmarks(tracked.landmarks), roll_deg(tracked.landmarks))
                    if beside:
                        check = self._checks.submit(self._check_keyframe, image_bgr, subject, scale)
                        # Until the verdict, later frames are compared with this one, as after a keyframe.
                        appearance = _appearance(image_bgr, tracked.affine, self.settings.input_size)
                        tracker.check_started(check, self.settings.keyframe_check_lag, appearance)
                    return tracked
                # A check's frame that cannot be followed runs its keyframe in line, as scheduled. Else a
                # fit refused only for its look is re-detected at its size (~3x cheaper than a search).
                if not beside:
                    if in_place:
                        tracker.look_changed()
                    else:
                        tracker.lost()
            if (deferred := self.deferred_search(tracker, scene)) is not None:
                return deferred
        return self._detect(image_bgr, tracker, scale, scene)

    def _check_keyframe(self, image: np.ndarray, subject: TrackedSubject, scale: float) -> _Verdict:
        """A scheduled keyframe, on a check thread: the subject as this frame shows it, if it is
        still there, verified, among as many faces as before; else None."""
        clock = _thread_state.clock = _StageClock()
        found = self._candidates(
            image, subject, min_face_px=self.settings.keyframe_min_face_ratio * subject.box.width,
            search_rotations=False, scale=scale,
        )
        confirmed = None
        if found.subject_verified and found.face_count == subject.face_count:
            confirmed = self._subject(image, found)
        return _Verdict(confirmed, tuple(clock.seconds.items()))

    def _apply_verdict(self, tracker: FaceTracker) -> None:
        """Settle the stream's running check (waiting for it if need be) before this frame."""
        try:
            verdict = tracker.take_check().result()
        except Exception:  # noqa: BLE001 — a bug in a check costs an in-line keyframe, never the stream
            log.exception("keyframe check failed")
            tracker.recheck()
            return
        clock = getattr(_thread_state, "clock", None)
        if clock is not None:  # the check's time is this stream's, reported with this frame
            for name, seconds in verdict.stage_seconds:
                clock.seconds[name] = clock.seconds.get(name, 0.0) + seconds
        if verdict.subject is None:
            tracker.recheck()
        else:
            tracker.confirmed(verdict.subject, self.settings.keyframe_check_lag)

    def crop(self, image_bgr: np.ndarray, analysis: FaceAnalysis) -> FaceCrop:
        """The model-ready uint8 RGB crop of an accepted analysis; FrameRejected for a rejected one."""
        if analysis.rejection is not None:
            raise FrameRejected(analysis.rejection, analysis.detail)
        if analysis.affine is None or analysis.detection is None or analysis.quality is None:
            raise ValueError("analysis has no face to crop")
        # Quality was judged on this very warp; re-warp only an analysis made without it.
        bgr = analysis.aligned if analysis.aligned is not None else self._warp(
            image_bgr, analysis.landmarks, analysis.affine
        )
        return FaceCrop(
            pixels=cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB),  # ~30x cheaper than numpy's reversed-stride copy
            detection=analysis.detection,
            quality=analysis.quality,
            pose=analysis.pose,
            landmarks=analysis.landmarks,
        )

    def crop_image(self, image_bgr: np.ndarray) -> tuple[FaceAnalysis, FaceCrop | None]:
        """Stills and training: analyse without a tracker, crop when accepted."""
        analysis = self.analyze(image_bgr)
        return analysis, (self.crop(image_bgr, analysis) if analysis.accepted else None)

    # --- internals -------------------------------------------------------------------------

    def _detect(
        self, image: np.ndarray, tracker: FaceTracker | None, scale: float, scene: Callable[[], np.ndarray],
    ) -> FaceAnalysis:
        """Keyframe: detect, verify candidates on their aligned crops, keep (or change) the subject."""
        subject = tracker.subject if tracker is not None else None
        min_face_px = 0.0
        if tracker is not None and tracker.following and subject is not None:
            min_face_px = self.settings.keyframe_min_face_ratio * subject.box.width
        found = self._candidates(
            image, subject, min_face_px=min_face_px, search_rotations=tracker is None or tracker.rotation_search_due,
            scale=scale,
        )
        faces, near, checked, results, verified = found.faces, found.near, found.checked, found.results, found.verified
        face_count = found.face_count
        if near and not found.subject_verified:
            # The subject is still there but does not pass as a face now: keep following it.
            analysis = results[0][0]
            if tracker is not None:
                tracker.lost()
            return dataclasses.replace(
                analysis,
                detection=Detection(checked[0][0], checked[0][1], face_count),
                rejection=analysis.rejection or RejectReason.LOW_CONFIDENCE,
                detail=analysis.detail or "the followed face does not pass as a frontal face now",
            )
        if not verified:
            # Too few pixels to verify and to use, or a face on its head: say so rather than "no face".
            explained = [a for a, _ in results if a.rejection is RejectReason.FACE_TOO_SMALL or a.upside_down]
            detail = "no face found" if not faces else f"{len(faces)} detector hit(s), none is a face when aligned"
            missed = explained[0] if explained else _rejected(RejectReason.NO_FACE, detail)
            if tracker is not None:
                assert missed.rejection is not None
                tracker.missed(SearchMiss(missed.rejection, missed.detail), scene())
            return missed
        (box, confidence), analysis, _evidence = verified[0]
        analysis = dataclasses.replace(analysis, detection=Detection(box, confidence, face_count))
        if tracker is not None:
            tracker.keyframe(self._subject(image, found), same_subject=found.subject_verified)
        if subject is not None and not near:
            cx, cy = subject.box.center
            return dataclasses.replace(
                analysis,
                rejection=RejectReason.FACE_CHANGED,
                detail=(
                    f"the followed face (last near x={cx:.0f}, y={cy:.0f}) is gone; a different face is "
                    f"the subject from now on ({face_count} face(s) in view)"
                ),
            )
        return analysis

    def _candidates(
        self, image: np.ndarray, subject: TrackedSubject | None, *, min_face_px: float, search_rotations: bool,
        scale: float,
    ) -> _Candidates:
        """Detect, and verify the likeliest candidates (the followed subject's first) on their aligned crops."""
        with _stage("detect"):
            faces, angle = self._find_faces(image, search_rotations=search_rotations, min_face_px=min_face_px)
        height, width = image.shape[:2]
        near = []
        if subject is not None:
            near = [f for f in faces if centre_jump(subject.box, f[0]) <= self.settings.max_subject_jump]
            near.sort(key=lambda f: iou(subject.box, f[0]), reverse=True)
        others = sorted(
            (f for f in faces if f not in near), key=lambda f: subject_preference(f, width, height), reverse=True
        )
        checked = (near + others)[: self.settings.max_candidates]
        results = [
            self._analyse_face(image, Detection(box, confidence, len(faces)), angle, scale, keyframe=True)
            for box, confidence in checked
        ]
        verified = [
            (face, analysis, evidence)
            for face, (analysis, evidence) in zip(checked, results)
            if evidence >= self.settings.min_face_evidence
        ]
        return _Candidates(faces, near, checked, results, verified)

    def _subject(self, image: np.ndarray, found: _Candidates) -> TrackedSubject:
        """The best verified candidate as the subject to follow."""
        (_box, confidence), analysis, evidence = found.verified[0]
        landmarks = analysis.landmarks
        assert landmarks is not None and analysis.affine is not None
        return TrackedSubject(
            box_from_landmarks(landmarks), confidence, found.face_count, roll_deg(landmarks), evidence,
            appearance=_appearance(image, analysis.affine, self.settings.input_size),
        )

    def _track(self, image: np.ndarray, subject: TrackedSubject, scale: float) -> tuple[FaceAnalysis | None, bool]:
        """Re-fit on the previous box: the analysis, or None when the fit no longer looks like the same
        face; and whether a refused fit is still in place (where the face was, as large: only its
        look changed, as a face turning or talking does, so a size-bounded keyframe will find it)."""
        detection = Detection(box=subject.box, confidence=subject.confidence, face_count=subject.face_count)
        # The face was verified at the keyframe; between keyframes the costly
        # HOG check is replaced by comparing the aligned face with the keyframe's.
        analysis, _ = self._analyse_face(image, detection, subject.roll_deg, scale, keyframe=False, evidence=subject.evidence)
        if analysis.affine is None or analysis.landmarks is None:
            return None, False
        moved = box_from_landmarks(analysis.landmarks)
        if centre_jump(subject.box, moved) > 0.5 or not 0.67 < moved.width / subject.box.width < 1.5:
            return None, False
        if subject.appearance is not None:
            now = _appearance(image, analysis.affine, self.settings.input_size)
            if float(np.mean(now * subject.appearance)) < self.settings.min_track_similarity:
                return None, True
        return dataclasses.replace(analysis, detection=Detection(moved, subject.confidence, subject.face_count)), False

    def _find_faces(
        self, image: np.ndarray, *, search_rotations: bool, min_face_px: float = 0.0
    ) -> tuple[list[tuple[Box, float]], float]:
        """Faces in frame coordinates and the image rotation (degrees) at which they were found."""
        faces = self._detector.detect_all(image, min_face_px)
        if not faces:  # a large frame: faces the quality gate takes may be too small for detect_all's copy
            faces = self._detector.detect_small(image, max(min_face_px, self.settings.quality.min_face_px))
        if not faces and self.settings.detector.fallback_max_side > 0:
            faces = self._hog.detect_all(image, min_face_px)
        if faces or not search_rotations:
            return faces, 0.0
        height, width = image.shape[:2]
        centre = (width / 2.0, height / 2.0)
        for angle in self.settings.roll_search_deg:
            rotation = cv2.getRotationMatrix2D(centre, angle, 1.0)
            rotated = cv2.warpAffine(image, rotation, (width, height), borderMode=cv2.BORDER_REPLICATE)
            found = self._detector.detect_all(rotated, min_face_px)
            if found:
                back = cv2.invertAffineTransform(rotation)
                return [(_moved_box(box, back), confidence) for box, confidence in found], angle
        return [], 0.0

    def _fit(self, image: np.ndarray, box: Box, angle_deg: float) -> np.ndarray:
        """Landmarks on an upright (rotated by angle_deg), large-enough patch, mapped back to the frame.

        The patch is warped from dlib's own intensity image (see ``dlib_intensity``) of only
        the region it covers: one channel instead of three, over FIT_PATCH_SIDES box sides
        (1.6 for the 5-point model instead of 2.2: it reads ~1.2), ~5x less to warp.
        """
        scale = max(1.0, self.settings.fit_min_box_px / box.width)
        if scale == 1.0 and abs(angle_deg) < 3.0:
            return self._fitter.fit(image, box)
        cx, cy = box.center
        side = math.ceil(FIT_PATCH_SIDES[self.settings.landmark_points] * max(box.width, box.height) * scale)
        patch_affine = cv2.getRotationMatrix2D((cx, cy), angle_deg, scale)
        patch_affine[:, 2] += np.array([side / 2.0 - cx, side / 2.0 - cy])
        patch = _intensity_patch(image, patch_affine, side)
        w, h = box.width * scale, box.height * scale
        points = self._fitter.fit(patch, Box((side - w) / 2.0, (side - h) / 2.0, w, h))
        return transform_points(cv2.invertAffineTransform(patch_affine), points).astype(np.float32)

    def _warp(self, image: np.ndarray, landmarks: np.ndarray | None, affine: np.ndarray) -> np.ndarray:
        """The crop for the configured alignment (``affine`` is its frame → crop similarity)."""
        if self.geometry.alignment == FRONTAL_3D_V1 and landmarks is not None:
            return frontal_warp(landmarks, self.geometry).apply(image)
        return warp_face(image, affine, self.settings.input_size)

    def _analyse_face(
        self, image: np.ndarray, detection: Detection, angle_deg: float, scale: float, *, keyframe: bool,
        evidence: float | None = None,
    ) -> tuple[FaceAnalysis, float]:
        """Landmarks, pose, alignment and quality of one candidate, and its face evidence
        (HOG score on the aligned crop; computed unless `evidence` is given). ``scale``: frame
        pixels per image pixel, so the quality gate judges the face's size in frame pixels."""
        with _stage("landmarks"):
            landmarks = self._fit(image, detection.box, angle_deg)
        height, width = image.shape[:2]
        pose = estimate_pose(landmarks, (width, height))
        plausibility = landmark_plausibility(landmarks, detection.box)
        if plausibility == 0.0:
            quality = Quality(score=0.0, sharpness=0.0, exposure=0.0, face_size=0.0, pose=0.0, confidence=0.0)
            detail = "landmarks do not form a face inside the detector box"
            low = RejectReason.LOW_CONFIDENCE
            return FaceAnalysis(detection, landmarks, pose, quality, low, detail, None, keyframe), -math.inf
        with _stage("warp"):  # the crop the model gets: crop() reuses it
            affine = self.geometry.affine(landmarks, detection.box)
            crop = self._warp(image, landmarks, affine)
        with _stage("quality"):
            grey = cv2.cvtColor(crop, cv2.COLOR_BGR2GRAY) if crop.ndim == 3 else crop
            if evidence is None:
                seen = self._hog.evidence(grey)
                if seen.upside_down:  # not a face to analyse or follow: the fit sits on the wrong features
                    upside_down = FaceAnalysis(
                        detection, landmarks, pose, None, RejectReason.POSE, UPSIDE_DOWN, None, keyframe, upside_down=True
                    )
                    return upside_down, -math.inf
                evidence = seen.face
            quality, reason, detail = assess(
                QualityInputs(
                    face_px=detection.box.width * scale,  # in frame pixels
                    crop_grey=grey,
                    pose=pose,
                    confidence=detection.confidence * plausibility * hog_confidence(evidence),
                    pitch_measured=len(landmarks) == 68,
                ),
                self.settings.quality,
            )
        return FaceAnalysis(
            detection, landmarks, pose, quality, reason, detail, affine, keyframe, aligned=crop
        ), evidence


UPSIDE_DOWN = "the face is upside down in the frame (turned about 180°)"


# Fit patches span this many face-box sides, by landmark model: dlib's 5-point model reads
# pixels within ~1.2 sides around the box centre (profiled for issue #5), so 1.6 leaves a
# margin (was 2.2). The 68-point model's jaw contour reaches further (on 117 LFW faces 1.6
# sides moved its landmarks by up to 3.2 px, median 0.6), and it was not profiled: 2.2.
FIT_PATCH_SIDES = {5: 1.6, 68: 2.2}
# dlib reads a BGR image's pixels as (b + g + r) // 3; the 1×4 matrix with offset -1/3 rounds to that floor.
_DLIB_INTENSITY = np.array([[1 / 3, 1 / 3, 1 / 3, -1 / 3]], dtype=np.float32)


def dlib_intensity(image: np.ndarray) -> np.ndarray:
    """The single-channel image dlib fits on when given this (BGR or grey) one."""
    return cv2.transform(image, _DLIB_INTENSITY) if image.ndim == 3 else image


_thread_state = threading.local()
log = logging.getLogger(__name__)

Face = tuple[Box, float]  # a detection: box and confidence


@dataclass(frozen=True, slots=True, eq=False)
class _Candidates:
    """A keyframe's detections, those near the followed subject first, and the ones verified as faces."""

    faces: list[Face]
    near: list[Face]  # within max_subject_jump of the subject, best overlap first
    checked: list[Face]  # the max_candidates likeliest, near ones first
    results: list[tuple[FaceAnalysis, float]]  # each checked one's analysis and face evidence
    verified: list[tuple[Face, FaceAnalysis, float]]  # the checked ones that pass as faces, in order

    @property
    def face_count(self) -> int:
        """Faces in view: the verified candidates and the unchecked detections."""
        return len(self.verified) + len(self.faces) - len(self.checked)

    @property
    def subject_verified(self) -> bool:
        """The followed subject is found again: the best verified candidate is one near it."""
        return bool(self.verified) and self.verified[0][0] in self.near


@dataclass(frozen=True, slots=True, eq=False)
class _Verdict:
    """A keyframe check's outcome: the subject as re-detected, or None, and the time it took by stage."""

    subject: TrackedSubject | None
    stage_seconds: tuple[tuple[str, float], ...]


class _ScaledTracker:
    """A stream's tracker seen from a copy of its frame at 1/``scale`` of the size: the subject's
    box is read divided and stored multiplied, so the tracker itself stays in frame coordinates."""

    def __init__(self, tracker: FaceTracker, scale: float) -> None:
        self._tracker = tracker
        self._scale = scale

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tracker, name)

    @property
    def subject(self) -> TrackedSubject | None:
        subject = self._tracker.subject
        return dataclasses.replace(subject, box=subject.box.scaled(1.0 / self._scale)) if subject else None

    def keyframe(self, subject: TrackedSubject, *, same_subject: bool = False) -> None:
        self._tracker.keyframe(dataclasses.replace(subject, box=subject.box.scaled(self._scale)), same_subject=same_subject)

    def tracked(self, box: Box, roll_deg: float) -> None:
        self._tracker.tracked(box.scaled(self._scale), roll_deg)


_APPEARANCE_SIDE = 32


def _appearance(image: np.ndarray, affine: np.ndarray, input_size: int) -> np.ndarray:
    """The aligned face as a small zero-mean, unit-variance grey patch, for tracking checks."""
    small = affine * (_APPEARANCE_SIDE / input_size)
    patch = cv2.warpAffine(image, small, (_APPEARANCE_SIDE, _APPEARANCE_SIDE), flags=cv2.INTER_AREA)
    grey = (cv2.cvtColor(patch, cv2.COLOR_BGR2GRAY) if patch.ndim == 3 else patch).astype(np.float32)
    return (grey - grey.mean()) / (grey.std() + 1e-3)


_SCENE_SIDE = 24


def scene_thumbnail(image: np.ndarray) -> np.ndarray:
    """The whole frame as a tiny brightness-normalised grey image: enough to tell a changed scene.

    Halved by exact 2×2 means first: OpenCV's area resize by a fractional factor straight to
    24×24 cost 0.7 ms for a 640×480 frame and 2.7 ms for 720p, the halvings 0.1 and 0.3 ms, and
    a stream without a face takes a thumbnail of every frame.
    """
    grey = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY) if image.ndim == 3 else image
    while min(grey.shape) >= 4 * _SCENE_SIDE:
        height, width = grey.shape[0] // 2, grey.shape[1] // 2
        grey = cv2.resize(grey[: 2 * height, : 2 * width], (width, height), interpolation=cv2.INTER_AREA)
    small = cv2.resize(grey, (_SCENE_SIDE, _SCENE_SIDE), interpolation=cv2.INTER_AREA).astype(np.float32)
    return small - small.mean()


def scene_difference(a: np.ndarray, b: np.ndarray) -> float:
    """Largest mean absolute difference (grey levels) over the 6×6 blocks of two scene thumbnails.

    Blocks, not the whole frame: a face stepping into one side of a still room changes a
    few blocks a lot and the frame's mean a little.
    """
    blocks = np.abs(a - b).reshape(6, _SCENE_SIDE // 6, 6, _SCENE_SIDE // 6).mean(axis=(1, 3))
    return float(blocks.max())


class _StageClock:
    """Seconds per stage of the frame this thread is analysing."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}


@contextlib.contextmanager
def _stage(name: str) -> Iterator[None]:
    clock = getattr(_thread_state, "clock", None)
    started = time.perf_counter()
    try:
        yield
    finally:
        if clock is not None:
            clock.seconds[name] = clock.seconds.get(name, 0.0) + time.perf_counter() - started


def landmark_plausibility(landmarks: np.ndarray, box: Box) -> float:
    """1 for a face-like fit in its box, falling to 0 when eyes and nose are not where a face has them."""
    left, right = eye_centres(landmarks)
    iod = float(np.linalg.norm(right - left))
    if iod < 1e-3 or box.width <= 0:
        return 0.0
    deviation = abs(math.log(iod / (CANONICAL_EYE_DISTANCE * box.width)))
    roll = math.atan2(*(right - left)[::-1])
    dx, dy = nose_base(landmarks) - (left + right) / 2.0
    drop = (math.sin(-roll) * dx + math.cos(-roll) * dy) / iod
    if drop < 0.3:
        return 0.0
    return max(0.0, 1.0 - (deviation / math.log(1.6)) ** 2)


def _intensity_patch(image: np.ndarray, affine: np.ndarray, side: int) -> np.ndarray:
    """``dlib_intensity`` of the side×side warp of ``image`` by ``affine`` (border replicated),
    converting and warping only the frame region under it."""
    corners = np.array([[0, 0], [side, 0], [0, side], [side, side]])
    corners = transform_points(cv2.invertAffineTransform(affine), corners)
    (left, top), (right, bottom) = corners.min(axis=0), corners.max(axis=0)
    height, width = image.shape[:2]
    # One pixel wider for the interpolation, inside the frame and never empty.
    x0 = min(max(int(left) - 1, 0), width - 1)
    y0 = min(max(int(top) - 1, 0), height - 1)
    x1 = min(max(int(right) + 2, x0 + 1), width)
    y1 = min(max(int(bottom) + 2, y0 + 1), height)
    region_affine = affine.copy()
    region_affine[:, 2] += affine[:, :2] @ np.array([x0, y0], dtype=np.float64)
    region = dlib_intensity(image[y0:y1, x0:x1])
    return cv2.warpAffine(region, region_affine, (side, side), borderMode=cv2.BORDER_REPLICATE)


def _moved_box(box: Box, affine: np.ndarray) -> Box:
    """The same-sized box around the affine image of the box centre."""
    cx, cy = transform_points(affine, np.array([box.center]))[0]
    return Box(float(cx - box.width / 2.0), float(cy - box.height / 2.0), box.width, box.height)


def _rejected(reason: RejectReason, detail: str) -> FaceAnalysis:
    return FaceAnalysis(None, None, None, None, reason, detail, None)
