"""Facial landmarks with dlib's shape predictors, fitted on a detector box.

The model files come from the `face-recognition-models` package. Importing that
package needs `pkg_resources`, so its folder is found with `find_spec` instead.
The 5-point model may be used commercially; the 68-point model was trained on
iBUG 300-W, whose licence allows research and non-commercial use only.
A fit on a 2-core AMD EPYC VM takes ~0.25 ms (5 points) and ~0.8 ms (68 points) a
face; docs/preprocessing.md has the measurements.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import dlib
import numpy as np

from .types import Box

MODEL_FILES = {
    5: "shape_predictor_5_face_landmarks.dat",
    68: "shape_predictor_68_face_landmarks.dat",
}
LICENCE_NOTICES = {
    5: "dlib 5-point landmark model (CC0 / free for commercial use)",
    68: "dlib 68-point landmark model trained on iBUG 300-W: research and non-commercial use only",
}


def landmark_model_path(points: int) -> Path:
    """Path of the dlib model for 5 or 68 points, without importing its package."""
    if points not in MODEL_FILES:
        raise ValueError(f"landmark model must have 5 or 68 points, not {points}")
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the face-recognition-models package is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "models" / MODEL_FILES[points]
    if not path.is_file():
        raise RuntimeError(f"landmark model file missing: {path}")
    return path


class LandmarkFitter:
    """Fits 5 or 68 points inside a face box. dlib holds the GIL while fitting."""

    def __init__(self, points: int = 5) -> None:
        self.points = points
        self._predictor = dlib.shape_predictor(str(landmark_model_path(points)))

    def fit(self, image: np.ndarray, box: Box) -> np.ndarray:
        """Landmarks as a float32 (points, 2) array of (x, y) in image coordinates."""
        rect = dlib.rectangle(
            int(round(box.x)), int(round(box.y)),
            int(round(box.x + box.width)), int(round(box.y + box.height)),
        )
        shape = self._predictor(np.ascontiguousarray(image), rect)
        return np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float32)
