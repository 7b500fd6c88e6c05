"""Face detection: OpenCV's Haar cascade (the paper's detector), and dlib's HOG detector
as its second opinion.

A CascadeClassifier must not be shared across threads, so each thread gets its
own. Detection runs on a downscaled grey copy; boxes come back in the frame's
coordinates, in the cascade's box convention whichever detector found them.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from pathlib import Path

import cv2
import dlib
import numpy as np

from .types import Box, Detection

CASCADE_FILE = "haarcascade_frontalface_default.xml"
HOG_WINDOW_PX = 80  # dlib's frontal HOG detector: the smallest face it finds, in pixels of the image scanned
HOG_MIN_SIDE = 480  # its copies are never shorter: in a 640×480 frame it finds faces from 107 px


@dataclass(frozen=True, slots=True, kw_only=True)
class DetectorSettings:
    max_side: int = 320  # longest side of the copy the cascade runs on
    scale_factor: float = 1.1
    min_neighbors: int = 5
    min_face_px: int = 24  # on the downscaled copy
    # ``detect_small``'s copy is at most this large, so its smallest face is 24/960 of the frame's
    # longer side where that is above the quality gate's 64 px (a 4032×3024 photo: 101 px).
    max_fine_side: int = 960
    # Frames the cascade finds empty are searched again by the HOG detector, whose smallest face is
    # 80 px on the copy it scans: a copy at least 480 px long (107 px in a 640×480 frame, ~10 ms
    # here), larger in larger frames so that faces of fallback_face_px still fill its window, up
    # to fallback_max_side (1280×720: 800 px, 19 ms; 1920×1080: 960 px, a 160-px floor, 28 ms).
    # 0 = no fallback.
    fallback_face_px: float = 128.0
    fallback_max_side: int = 960


class HaarFaceDetector:
    """Finds faces; picks the primary one (large and central) and counts the rest."""

    def __init__(self, settings: DetectorSettings = DetectorSettings()) -> None:
        self._settings = settings
        self._cascade_path = str(Path(cv2.data.haarcascades) / CASCADE_FILE)
        self._local = threading.local()

    def _classifier(self) -> cv2.CascadeClassifier:
        classifier = getattr(self._local, "classifier", None)
        if classifier is None:
            classifier = cv2.CascadeClassifier(self._cascade_path)
            if classifier.empty():
                raise RuntimeError(f"cannot load Haar cascade {self._cascade_path}")
            self._local.classifier = classifier
        return classifier

    def detect_all(self, image_bgr: np.ndarray, min_face_px: float = 0.0) -> list[tuple[Box, float]]:
        """Every face as (box in frame coordinates, confidence in [0, 1]).

        ``min_face_px`` (frame pixels) skips the small scales of the cascade's pyramid,
        which cost the most: a stream that already follows a face looks only for faces
        of comparable size.
        """
        grey, scale = grey_copy(image_bgr, self._settings.max_side)
        smallest = max(self._settings.min_face_px, int(min_face_px * scale))
        return self._scan(cv2.equalizeHist(grey), scale, smallest)

    def detect_small(self, image_bgr: np.ndarray, min_face_px: float) -> list[tuple[Box, float]]:
        """The faces ``detect_all`` cannot see in a large frame: narrower than its copy's smallest
        window (frames wider than 853 px at the defaults), down to ``min_face_px``, on a larger copy
        on which only these sizes are scanned (with two steps of overlap, for faces at the seam).
        [] at once where ``detect_all`` sees them all. Costs ~1.5x ``detect_all`` at 1280×720 and
        ~4x at 1920×1080 (here, without a face), so a search runs it when ``detect_all`` finds none.

        Unlike ``detect_all`` it does not equalise the copy's histogram: that mapping is set by the
        whole frame, and for a face this small it crushes the face on a dark or flat scene (64-px
        faces of 60 people in 1280×720 frames: found 0 / 18 / 48 times on a night sky / noise /
        photograph background equalised, 48 / 45 / 47 times as they are; no false hits either way)."""
        settings = self._settings
        longest = max(image_bgr.shape[:2])
        scale = min(1.0, settings.max_side / longest)
        fine_scale = min(1.0, settings.min_face_px / max(min_face_px, 1.0), settings.max_fine_side / longest)
        if fine_scale <= scale * settings.scale_factor:
            return []
        grey, fine_scale = grey_copy(image_bgr, round(longest * fine_scale))
        largest = math.ceil(settings.min_face_px * fine_scale / scale * settings.scale_factor**2)
        return self._scan(grey, fine_scale, settings.min_face_px, largest)

    def _scan(self, grey: np.ndarray, scale: float, smallest: int, largest: int = 0) -> list[tuple[Box, float]]:
        """The cascade over one grey copy (copy pixels per frame pixel: ``scale``), windows from
        ``smallest`` to ``largest`` copy pixels (0: no upper bound); boxes in frame coordinates."""
        boxes, _levels, weights = self._classifier().detectMultiScale3(
            grey,
            scaleFactor=self._settings.scale_factor,
            minNeighbors=self._settings.min_neighbors,
            minSize=(smallest, smallest),
            maxSize=(largest, largest),
            outputRejectLevels=True,
        )
        faces = []
        for (x, y, w, h), weight in zip(np.asarray(boxes).reshape(-1, 4), np.asarray(weights).reshape(-1)):
            box = Box(float(x), float(y), float(w), float(h)).scaled(1.0 / scale)
            faces.append((box, _confidence(float(weight))))
        return faces

    def detect(self, image_bgr: np.ndarray) -> Detection | None:
        """The primary face, or None when there is no face."""
        faces = self.detect_all(image_bgr)
        if not faces:
            return None
        height, width = image_bgr.shape[:2]
        box, confidence = max(faces, key=lambda face: subject_preference(face, width, height))
        return Detection(box=box, confidence=confidence, face_count=len(faces))


NO_HOG_FACE = -2.0  # the score reported when the HOG detector finds nothing
# A crop turned round must hold at least this good a face to be called upside down (the HOG
# detector's scores run from about −1 to 3; the crops below scored 0.12–2.3 turned round).
UPSIDE_DOWN_MIN_SCORE = -0.5


@dataclass(frozen=True, slots=True)
class CropEvidence:
    """The HOG detector's opinion of an aligned face crop.

    ``upside_down``: the crop turned 180° holds a better face (anywhere in it) than the crop as it
    is. The cascade finds some faces standing on their heads, and the landmark fit, which assumes
    an upright face in its box, then puts the eyes on the mouth: the crop is aligned, and upside
    down. Anywhere, not centred: such a fit also moves and scales the face. Over 217 photographs
    the gate took upright, every crop scored better as it was (margin p5 1.29); all 10 the gate took
    turned 180° scored better turned round (margin ≥ 0.49).
    """

    face: float  # best score of a face centred in the crop (≈ −1 … 3); NO_HOG_FACE when none
    upside_down: bool


class HogFaceDetector:
    """dlib's HOG face detector: a second, differently trained opinion on what is a face.

    It verifies the cascade's candidates on their aligned crops (``evidence``: Haar fires on
    cats, suits and shadows, and the landmark model always returns a face shape), and searches
    frames the cascade finds empty (``detect_all``). The cascade misses faces whose proportions
    are far from its training faces, strongly acromegalic ones among them: on phantoms of the
    holdout identities it found no face in 9 of 135 level-3 images against 0 of 135 level-2 and
    2 of 135 level-1; with this fallback, 2, 0 and 0. Not thread-safe (dlib's scanner keeps
    state), so one instance is shared behind its own lock; dlib releases the GIL while it scans
    (a Python thread beside a scan keeps its full speed), so other threads run meanwhile.
    """

    def __init__(self, settings: DetectorSettings = DetectorSettings()) -> None:
        # Building one holds the GIL for ~0.25 s: once per preprocessor, never per thread.
        self._detector = dlib.get_frontal_face_detector()
        self._settings = settings
        self._lock = threading.Lock()

    def evidence(self, crop_grey: np.ndarray) -> CropEvidence:
        """How much an aligned crop looks like a face centred in it, and whether it stands on its head."""
        size = crop_grey.shape[0]
        with self._lock:
            boxes, scores, _ = self._detector.run(crop_grey, 0, -1.0)
            turned = max(self._detector.run(cv2.rotate(crop_grey, cv2.ROTATE_180), 0, -1.0)[1], default=NO_HOG_FACE)
        centred = NO_HOG_FACE
        for box, score in zip(boxes, scores):
            cx, cy = (box.left() + box.right()) / 2.0, (box.top() + box.bottom()) / 2.0
            if abs(cx - size / 2.0) < 0.1 * size and abs(cy - size / 2.0) < 0.125 * size:
                centred = max(centred, float(score))
        anywhere = max(scores, default=NO_HOG_FACE)
        return CropEvidence(face=centred, upside_down=turned > anywhere and turned > UPSIDE_DOWN_MIN_SCORE)

    def detect_all(self, image_bgr: np.ndarray, min_face_px: float = 0.0) -> list[tuple[Box, float]]:
        """Every face as (box in frame coordinates and the cascade's convention, confidence in [0, 1]),
        down to ``min_face_px`` or the settings' ``fallback_face_px`` (where the copy allows)."""
        longest = max(image_bgr.shape[:2])
        wanted = round(longest * HOG_WINDOW_PX / max(min_face_px, self._settings.fallback_face_px))
        grey, scale = grey_copy(image_bgr, min(max(HOG_MIN_SIDE, wanted), self._settings.fallback_max_side))
        with self._lock:
            boxes, scores, _ = self._detector.run(grey, 0, 0.0)
        faces = []
        for found, score in zip(boxes, scores):
            box = _haar_convention(Box(found.left(), found.top(), found.width(), found.height())).scaled(1.0 / scale)
            if box.width >= min_face_px:
                faces.append((box, hog_confidence(float(score))))
        return faces


def grey_copy(image: np.ndarray, max_side: int) -> tuple[np.ndarray, float]:
    """The image in grey, shrunk (area-averaged) so its longer side is at most ``max_side``, and
    the factor it was shrunk by (copy pixels per image pixel, ≤ 1)."""
    height, width = image.shape[:2]
    scale = min(1.0, max_side / max(height, width))
    grey = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY) if image.ndim == 3 else image
    if scale < 1.0:
        # at least a pixel a side: a 4096×4 frame is within the pixel limit
        grey = cv2.resize(grey, (max(1, round(width * scale)), max(1, round(height * scale))), interpolation=cv2.INTER_AREA)
    return grey, scale


def hog_confidence(score: float) -> float:
    """HOG score → [0, 1]: 0.5 at −0.2, ≈ 0.2 at −0.75, ≈ 0.99 at 1.6 (LFW median)."""
    return 1.0 / (1.0 + math.exp(-2.5 * (score + 0.2)))


# Where the cascade puts its box around a face HOG boxed: 1.10× as wide, centred 0.11 HOG
# widths higher (it takes in the forehead). Medians over 200 holdout phantom faces both found
# (10th–90th percentile of the width ratio 0.95–1.26); downstream stages (quality's face size,
# landmark plausibility) were tuned on cascade boxes.
HOG_TO_HAAR_WIDTH = 1.10
HOG_TO_HAAR_RAISE = 0.11


def _haar_convention(box: Box) -> Box:
    cx, cy = box.center
    side = box.width * HOG_TO_HAAR_WIDTH
    cy -= HOG_TO_HAAR_RAISE * box.width
    return Box(cx - side / 2.0, cy - side / 2.0, side, side)


def subject_preference(face: tuple[Box, float], frame_width: int, frame_height: int) -> float:
    """Ranks faces as the subject: large, central and confident (a big, doubtful false positive loses)."""
    box, confidence = face
    return primary_score(box, frame_width, frame_height) * confidence


def primary_score(box: Box, frame_width: int, frame_height: int) -> float:
    """Large and central wins: area, discounted by distance from the frame centre."""
    cx, cy = box.center
    dx = (cx - frame_width / 2.0) / frame_width
    dy = (cy - frame_height / 2.0) / frame_height
    return box.area * (1.0 - min(0.9, math.hypot(dx, dy)))


def _confidence(level_weight: float) -> float:
    """Map the cascade's last-stage weight (≈ -1 … 6+) onto [0, 1]."""
    return 1.0 / (1.0 + math.exp(-(level_weight - 1.0)))
