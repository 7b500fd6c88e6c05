"""Per-stream face tracking between detections.

Haar detection is the expensive stage, so a stream detects only on keyframes (every
N analysed frames, or when tracking is lost). A scheduled keyframe that finds the followed
face again among as many faces doubles the gap to the next, up to ``max_keyframe_interval``;
anything else (another face count, another subject, tracking lost) starts again at N. In
between, landmarks are re-fitted from the box derived from the previous frames' landmarks
(on a patch de-rotated by the last roll). At a keyframe the detection nearest the followed subject is kept even when a
larger face is present, so a second person entering never switches the subject
silently; the face count is reported. A scheduled keyframe of a followed face
looks only for faces of comparable size (``keyframe_min_face_ratio`` of its
width): the cascade's small scales are most of its cost, so a face much smaller
than the subject is counted only once tracking is lost and the whole range is
searched. While no face is found, searches back off (the n-th miss in a row waits
min(n, ``max_search_gap``) frames) unless the frame is a different picture from the one
before it (a cut, or the next photograph of a set): a camera on an empty room or a
moving camera without a usable face is searched at most once every ``max_search_gap``
frames once the back-off has grown (a pan drifts far from the searched scene over those
frames, but never cuts), and a new photograph is searched at once. A picture that has not
changed at all since the last search (a fixed camera on an empty room: only sensor and codec
noise) waits up to ``still_search_gap`` frames instead, since the detector would see the same
pixels; the first frame that moves away from it (someone stepping in) is searched on the
back-off schedule, at once while it is short. When the subject is gone
and a face appears elsewhere (more than ``max_subject_jump`` face widths away), that
frame is rejected FACE_CHANGED once and the new face is followed from then on. A
different person in the same place cannot be told apart: there is no identity
embedding here. A scheduled keyframe of a followed face need not hold up its frame: the
preprocessor may track that frame as any other and run the detection beside the stream
(``check_started``); its verdict is applied a fixed number of analysed frames later, so a
stream gets the same answers however fast the check ran. A check that confirms the subject
among as many faces counts as that keyframe (``confirmed``); any other verdict makes the
frame it is applied on a keyframe in line (``recheck``), which sorts out what changed.
The tracker only holds state; ``FacePreprocessor.analyze`` drives it.
"""

from __future__ import annotations

import dataclasses
import math
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .frontalize import CANONICAL_EYE_DISTANCE, CANONICAL_EYE_LINE, eye_centres
from .types import Box, RejectReason


# The next fit starts from this share of the box the last fit implies, the rest from the box before
# it. Only where the fit starts is smoothed, never the landmarks or the crop: fitting from the
# last fit's own box alone lets the fits' pixel noise feed on itself between keyframes. Over every
# frame of the test clips (eye step in frontalized crops over raw, lower is steadier): keyframes
# every 10 frames and weight 1: 0.377; gaps up to 40 frames: 0.395 at weight 1, 0.377 at 0.5,
# 0.388 at 0.25 (the start lags a moving face).
TRACKED_BOX_WEIGHT = 0.5


@dataclass(frozen=True, slots=True)
class TrackedSubject:
    """The followed face as of the last analysed frame."""

    box: Box  # canonical detector-like box derived from the landmarks
    confidence: float  # detector confidence at the last keyframe
    face_count: int  # faces the detector saw at the last keyframe
    roll_deg: float = 0.0  # the next fit is made on an upright patch
    evidence: float = 0.0  # face evidence (HOG on the aligned crop) at the last keyframe
    appearance: np.ndarray | None = field(default=None, compare=False)  # normalised aligned patch at the keyframe


@dataclass(frozen=True, slots=True)
class SearchMiss:
    """The last search that found no usable face, and why."""

    reason: RejectReason
    detail: str


class FaceTracker:
    """State of one stream: the subject, and when the next detection is due. Not thread-safe."""

    def __init__(
        self, keyframe_interval: int = 5, max_search_gap: int = 1, still_search_gap: int = 1,
        max_keyframe_interval: int | None = None,
    ) -> None:
        max_keyframe_interval = keyframe_interval if max_keyframe_interval is None else max_keyframe_interval
        if min(keyframe_interval, max_search_gap, still_search_gap) < 1 or max_keyframe_interval < keyframe_interval:
            raise ValueError(f"keyframe_interval, max_search_gap and still_search_gap must be >= 1 and "
                             f"max_keyframe_interval >= keyframe_interval, got {keyframe_interval}, "
                             f"{max_search_gap}, {still_search_gap}, {max_keyframe_interval}")
        self.keyframe_interval = keyframe_interval
        self.max_keyframe_interval = max_keyframe_interval
        self.keyframe_gap = keyframe_interval  # analysed frames from this keyframe to the next
        self.max_search_gap = max_search_gap
        self.still_search_gap = still_search_gap
        self.subject: TrackedSubject | None = None
        self._since_keyframe = 0
        self._lost = True
        self.misses = 0  # keyframes in a row that found no face
        self.last_miss: SearchMiss | None = None
        self.frames_since_search = 0  # frames whose search was deferred since the last miss
        # The last frame seen while no face is found, as a small grey thumbnail (see
        # preprocess.scene_thumbnail): a frame that differs much from it is a new picture.
        self.last_scene: np.ndarray | None = None
        self.searched_scene: np.ndarray | None = None  # the thumbnail of the frame the last search missed on
        self._check: Future[Any] | None = None  # a scheduled keyframe running beside the stream
        self._check_wait = 0  # tracked frames still to come before its verdict is applied
        self._check_failed = False  # its verdict did not confirm the subject: the next keyframe runs in line
        self._look_changed = False  # tracking refused a fit in place for its look: the next keyframe confirms nothing

    @property
    def rotation_search_due(self) -> bool:
        """Search rotated copies only now and then while no face is found: it costs two more detections."""
        return self.misses % self.keyframe_interval == 0

    def missed(self, miss: SearchMiss, scene: np.ndarray) -> None:
        """A keyframe found no usable face in ``scene``."""
        self.misses += 1
        self._lost = True
        self.last_miss = miss
        self.last_scene = self.searched_scene = scene
        self.frames_since_search = 0

    def search_gap(self, still: bool) -> int:
        """Frames from one search to the next while no face is found: grows by one a miss, and is
        ``still_search_gap`` (if longer) while the picture is the one that search looked at."""
        gap = min(self.misses, self.max_search_gap)
        return max(gap, self.still_search_gap) if still else gap

    def search_can_wait(self, still: bool) -> bool:
        """A search found no face lately and the next one is not due yet (unless the scene changed)."""
        return self.last_miss is not None and self.frames_since_search + 1 < self.search_gap(still)

    def defer_search(self, scene: np.ndarray) -> None:
        """This frame (``scene``) waits for the next search."""
        self.frames_since_search += 1
        self.last_scene = scene

    @property
    def following(self) -> bool:
        """A subject is being tracked (a detection now is a scheduled check, not a search)."""
        return self.subject is not None and not self._lost

    @property
    def keyframe_due(self) -> bool:
        """Detect now: no subject is being tracked, or the keyframe gap has passed since the last
        detection and no check of it is running."""
        return self._lost or self.subject is None or (self._since_keyframe >= self.keyframe_gap and self._check is None)

    @property
    def check_may_run_beside(self) -> bool:
        """This keyframe is a scheduled check of a followed face whose last check, if any, confirmed it."""
        return self.following and self.keyframe_due and not self._check_failed

    def check_started(self, verdict: Future[Any], lag: int, appearance: np.ndarray) -> None:
        """The keyframe due on the frame just tracked runs beside the stream; its verdict is applied
        before the ``lag``-th analysed frame after that one. Meanwhile the frames are compared with
        ``appearance``, that frame's face (it passed the comparison with the last keyframe's)."""
        if lag < 1:
            raise ValueError(f"lag must be >= 1, not {lag}")
        if self.subject is None:
            raise RuntimeError("check_started() without a subject")
        self._check = verdict
        self._check_wait = lag - 1
        self.subject = dataclasses.replace(self.subject, appearance=appearance)

    @property
    def verdict_due(self) -> bool:
        """The running check's verdict is to be applied before this frame is analysed."""
        return self._check is not None and self._check_wait <= 0

    def take_check(self) -> Future[Any]:
        """The running check, handed over to have its verdict applied."""
        if self._check is None:
            raise RuntimeError("no keyframe check is running")
        check, self._check = self._check, None
        return check

    def confirmed(self, checked: TrackedSubject, frames_since: int) -> None:
        """A check found the followed face among as many faces ``frames_since`` analysed frames ago:
        that frame was a confirming keyframe. The subject stays where tracking has it now; what the
        check measured (confidence, face evidence, appearance) replaces the last keyframe's."""
        if self.subject is None:
            raise RuntimeError("confirmed() without a subject")
        self.keyframe_gap = min(2 * self.keyframe_gap, self.max_keyframe_interval)
        self.subject = dataclasses.replace(checked, box=self.subject.box, roll_deg=self.subject.roll_deg)
        self._since_keyframe = frames_since

    def recheck(self) -> None:
        """A check did not confirm the subject (or failed): detect in line on this frame, as the
        scheduled keyframe."""
        self._check_failed = True
        self._since_keyframe = max(self._since_keyframe, self.keyframe_gap)

    def look_changed(self) -> None:
        """Tracking refused a fit that is in place (where the face was, as large) for its look alone:
        detect in line on this frame, for faces of about its size as a scheduled keyframe does, and
        start the keyframe gap again as a lost track would."""
        self.recheck()
        self._look_changed = True

    def _drop_check(self) -> None:
        if self._check is not None:
            self._check.cancel()  # one still queued never runs; a running one is ignored
            self._check = None
        self._check_failed = False

    def keyframe(self, subject: TrackedSubject, *, same_subject: bool = False) -> None:
        """A detection (re)established the subject. ``same_subject``: it is the followed face, found
        by a scheduled keyframe; with as many faces in view as before, the next keyframe may wait
        twice as long."""
        confirmed = same_subject and self.following and not self._look_changed and self.subject is not None \
            and subject.face_count == self.subject.face_count
        self._look_changed = False
        self.keyframe_gap = min(2 * self.keyframe_gap, self.max_keyframe_interval) if confirmed else self.keyframe_interval
        self.subject = subject
        self.misses = 0
        self.last_miss = None
        self.last_scene = self.searched_scene = None
        self._since_keyframe = 1
        self._lost = False
        self._drop_check()

    def tracked(self, box: Box, roll_deg: float) -> None:
        """Landmarks were re-fitted without a detection; move the box with them, half way (see
        ``TRACKED_BOX_WEIGHT``)."""
        if self.subject is None:
            raise RuntimeError("tracked() without a subject")
        last, w = self.subject.box, TRACKED_BOX_WEIGHT
        moved = Box(
            w * box.x + (1 - w) * last.x, w * box.y + (1 - w) * last.y,
            w * box.width + (1 - w) * last.width, w * box.height + (1 - w) * last.height,
        )
        self.subject = dataclasses.replace(self.subject, box=moved, roll_deg=roll_deg)
        self._since_keyframe += 1
        self._check_wait -= 1

    def lost(self) -> None:
        """Tracking failed or no face: detect on the next frame; the last subject stays remembered."""
        self._lost = True
        self._drop_check()


def box_from_landmarks(landmarks: np.ndarray) -> Box:
    """The canonical detector box implied by the eye centres (the inverse of the measured layout)."""
    left, right = eye_centres(landmarks)
    width = float(np.linalg.norm(right - left)) / CANONICAL_EYE_DISTANCE
    cx, cy = (left + right) / 2.0
    return Box(float(cx - width / 2.0), float(cy - CANONICAL_EYE_LINE * width), width, width)


def iou(a: Box, b: Box) -> float:
    """Intersection over union of two boxes."""
    ix = max(0.0, min(a.x + a.width, b.x + b.width) - max(a.x, b.x))
    iy = max(0.0, min(a.y + a.height, b.y + b.height) - max(a.y, b.y))
    inter = ix * iy
    union = a.area + b.area - inter
    return inter / union if union > 0 else 0.0


def centre_jump(a: Box, b: Box) -> float:
    """Distance between box centres in widths of ``a``."""
    (ax, ay), (bx, by) = a.center, b.center
    return math.hypot(ax - bx, ay - by) / max(a.width, 1e-6)
