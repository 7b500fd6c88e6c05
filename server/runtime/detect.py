"""Face detection with OpenCV's Haar cascade (the paper's detector).

A CascadeClassifier must not be shared across threads, so each thread gets its
own. Detection runs on a downscaled grey copy; boxes come back in the frame's
coordinates.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from .types import Box, Detection

CASCADE_FILE = "haarcascade_frontalface_default.xml"


@dataclass(frozen=True, slots=True, kw_only=True)
class DetectorSettings:
    max_side: int = 320  # longest side of the copy the cascade runs on
    scale_factor: float = 1.1
    min_neighbors: int = 5
    min_face_px: int = 24  # on the downscaled copy


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
        height, width = image_bgr.shape[:2]
        scale = min(1.0, self._settings.max_side / max(height, width))
        smallest = max(self._settings.min_face_px, int(min_face_px * scale))
        grey = cv2.cvtColor(image_bgr, cv2.COLOR_BGR2GRAY) if image_bgr.ndim == 3 else image_bgr
        if scale < 1.0:
            grey = cv2.resize(grey, (round(width * scale), round(height * scale)), interpolation=cv2.INTER_AREA)
        grey = cv2.equalizeHist(grey)
        boxes, _levels, weights = self._classifier().detectMultiScale3(
            grey,
            scaleFactor=self._settings.scale_factor,
            minNeighbors=self._settings.min_neighbors,
            minSize=(smallest, smallest),
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
