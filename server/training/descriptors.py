"""Face-recognition descriptors of training crops: the targets of the distillation loss.

dlib's ResNet face descriptor (128-d, learnt from about three million faces; its weights ship in
face-recognition-models, already a dependency, so nothing is downloaded) carries face shape that
the phantom network, trained on a few hundred people, does not learn: mixed with the network's
probabilities it moved holdout frames from 0.891 to 0.916 (MODEL_CARD.md). At ~75 ms a face on
the CPU it is too slow to serve, so training can instead pull the network's 512-d embedding
towards it (`TrainConfig.distill`): computed here once per crop cache, on the CPU, in parallel
processes (dlib holds the GIL), and stored in the crop set's order with its paths and subjects. Reading them back
needs only numpy, so a GPU machine without dlib can train with them.
"""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import numpy as np

from .crops import CropSet

DESCRIPTOR_SIZE = 128
_RECOGNITION_FILE = "dlib_face_recognition_resnet_model_v1.dat"
_models: tuple[object, object] | None = None  # (shape predictor, recognition net), one pair a process


def crop_face_box(input_size: int, box_height_expand: float) -> tuple[int, int, int, int]:
    """The canonical face box inside an aligned crop (left, top, right, bottom), for dlib's fit."""
    from ..runtime.frontalize import CANONICAL_EYE_LINE, CropGeometry

    geometry = CropGeometry(input_size=input_size, box_height_expand=box_height_expand)
    height = geometry.input_size / (1.0 + geometry.box_height_expand)
    (_, eye_y), _ = geometry.eye_positions
    top = eye_y - CANONICAL_EYE_LINE * height
    left = (geometry.input_size - height) / 2.0
    return round(left), round(top), round(left + height), round(top + height)


def _load_models() -> tuple[object, object]:
    global _models
    if _models is None:
        import dlib

        from ..runtime.landmarks import landmark_model_path

        five_points = landmark_model_path(5)
        _models = (dlib.shape_predictor(str(five_points)),
                   dlib.face_recognition_model_v1(str(five_points.parent / _RECOGNITION_FILE)))
    return _models


def face_descriptors(pixels: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """N×128 float32 descriptors of N aligned RGB crops (this process)."""
    import dlib

    predictor, recognition = _load_models()
    rect = dlib.rectangle(*box)
    out = np.empty((len(pixels), DESCRIPTOR_SIZE), np.float32)
    for i, crop in enumerate(pixels):
        crop = np.ascontiguousarray(crop)
        shape = predictor(crop, rect)  # type: ignore[operator]
        out[i] = np.asarray(recognition.compute_face_descriptor(crop, shape), np.float32)  # type: ignore[attr-defined]
    return out


def _chunk(args: tuple[np.ndarray, tuple[int, int, int, int]]) -> np.ndarray:
    return face_descriptors(*args)


def write_descriptors(crops: CropSet, out: Path, processes: int | None = None, chunk: int = 64) -> Path:
    """Descriptors of every crop (fp16), in the crop set's order, saved as .npz with its paths and subjects."""
    box = crop_face_box(int(crops.preprocessing["input_size"]), float(crops.preprocessing["box_height_expand"]))
    parts = [(crops.pixels[i:i + chunk], box) for i in range(0, len(crops), chunk)]
    with multiprocessing.get_context("fork").Pool(processes) as pool:
        descriptors = np.concatenate(pool.map(_chunk, parts)) if parts else np.zeros((0, DESCRIPTOR_SIZE), np.float32)
    out = Path(out)
    np.savez(out, descriptors=descriptors.astype(np.float16),  # targets: half precision is plenty, half the carry
             paths=crops.paths.astype(str), subjects=crops.subjects.astype(str))
    return out


def load_descriptors(path: Path, crops: CropSet) -> np.ndarray:
    """The stored descriptors of these crops, row for row. They were made for the same caches in the
    same order (paths and subjects must match: caches of other seeds reuse file names, so a lookup
    by name would mix them up, and pixels of JPEG-stored caches may differ by a bit on another machine)."""
    with np.load(path) as stored:
        paths, subjects, descriptors = stored["paths"], stored["subjects"], stored["descriptors"]
    if len(paths) != len(crops) or not (np.array_equal(paths, crops.paths.astype(str))
                                        and np.array_equal(subjects, crops.subjects.astype(str))):
        raise ValueError(f"{path} was made for other crops ({len(paths)} rows; these are {len(crops)}): "
                         f"make it with write_descriptors on the same caches, in the same order")
    return descriptors.astype(np.float32)
