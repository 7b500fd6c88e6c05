"""Data sets of labelled face images and their cached model-ready crops.

Crops come from the serving preprocessor's own `crop_image`, so training sees
exactly what serving feeds the model. Building them needs dlib and a Haar
cascade and is slow; it runs once and is cached as an .npz of uint8, which is
all the training loop needs: this module imports neither dlib nor the cascade
unless a cache is built, so training runs on machines that have neither.
"""

from __future__ import annotations

import contextlib
import csv
import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .phantom import IMAGE_SUFFIXES

CACHE_FORMAT = "acroscreen-crops-1"


@dataclass(frozen=True, slots=True)
class Sample:
    """One labelled image: its path, true score (1..3) and subject id."""

    path: Path
    score: int
    subject_id: str


@dataclass(frozen=True, slots=True, eq=False)
class CropSet:
    """Model-ready crops (N×S×S×3 uint8 RGB) with parallel labels.

    `preprocessing` is the card's Preprocessing as a dict, recorded when the
    crops were built so the trained model can state how its input was made.
    """

    pixels: np.ndarray
    scores: np.ndarray
    subjects: np.ndarray
    paths: np.ndarray
    preprocessing: dict[str, object]
    rejected: int = 0

    def __len__(self) -> int:
        return len(self.scores)

    def subset(self, mask: np.ndarray) -> CropSet:
        return CropSet(self.pixels[mask], self.scores[mask], self.subjects[mask], self.paths[mask],
                       self.preprocessing, 0)


def read_samples(data: Path) -> list[Sample]:
    """DATA/<score>/<subject_id>/<image> or a CSV manifest with columns path, score, subject_id.

    Manifest paths are relative to the manifest's folder (or absolute).
    """
    data = Path(data)
    if data.is_file() and data.suffix.lower() == ".csv":
        with data.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            missing = {"path", "score", "subject_id"} - set(reader.fieldnames or ())
            if missing:
                raise ValueError(f"{data}: missing column(s) {sorted(missing)}")
            samples = [Sample(data.parent / row["path"], int(row["score"]), row["subject_id"]) for row in reader]
    elif data.is_dir():
        samples = [
            Sample(image, int(score_dir.name), subject_dir.name)
            for score_dir in sorted(data.iterdir()) if score_dir.is_dir() and score_dir.name in ("1", "2", "3")
            for subject_dir in sorted(score_dir.iterdir()) if subject_dir.is_dir()
            for image in sorted(subject_dir.iterdir()) if image.suffix.lower() in IMAGE_SUFFIXES
        ]
    else:
        raise ValueError(f"{data}: neither a data folder nor a CSV manifest")
    bad = [s for s in samples if s.score not in (1, 2, 3)]
    if bad:
        raise ValueError(f"{data}: scores must be 1, 2 or 3 ({bad[0].path} has {bad[0].score})")
    if not samples:
        raise ValueError(f"{data}: no images found")
    return samples


def training_preprocessing(landmark_points: int = 5) -> dict[str, object]:
    """The model card's Preprocessing fields for training crops: 5 points crop with the eye
    similarity ("similarity-eyes-v1"), 68 points also undo yaw ("frontal-3d-v1")."""
    from dataclasses import asdict

    from ..runtime.card import Preprocessing
    from ..runtime.frontalize import FRONTAL_3D_V1, SIMILARITY_EYES_V1
    from ..runtime.preprocess import PreprocessSettings

    alignment = FRONTAL_3D_V1 if landmark_points == 68 else SIMILARITY_EYES_V1
    settings = PreprocessSettings(landmark_points=landmark_points, alignment=alignment)
    return asdict(Preprocessing(**settings.card_fields()))


_worker_preprocessor = None


def _init_worker(preprocessing: dict[str, object]) -> None:
    """Each crop process builds the serving preprocessor a model with this card would get."""
    global _worker_preprocessor
    import cv2

    from ..runtime.card import Preprocessing
    from ..runtime.preprocess import FacePreprocessor, PreprocessSettings

    cv2.setNumThreads(1)
    card = Preprocessing(**preprocessing)  # type: ignore[arg-type]
    _worker_preprocessor = FacePreprocessor(PreprocessSettings.from_card_preprocessing(card))


def _crop_one(path: str) -> np.ndarray | None:
    import cv2

    assert _worker_preprocessor is not None
    image = cv2.imread(path, cv2.IMREAD_COLOR)
    if image is None:
        return None
    _analysis, crop = _worker_preprocessor.crop_image(image)
    return None if crop is None else np.ascontiguousarray(crop.pixels, dtype=np.uint8)


def build_crops(
    samples: list[Sample], workers: int | None = None, preprocessing: dict[str, object] | None = None
) -> CropSet:
    """Run the serving crop on every sample (in worker processes: dlib holds the GIL).

    ``preprocessing`` is a model card's Preprocessing fields (default: 5-point training crops).

    Workers are spawned, not forked: a fork of a process that already runs
    threads (torch, PyAV, OpenCV) can deadlock. Images where the preprocessor finds
    no usable face are dropped and counted.
    """
    preprocessing = preprocessing or training_preprocessing()
    workers = workers or max(1, min(len(samples), os.cpu_count() or 1))
    started = time.monotonic()
    kept, crops = [], []
    paths = [str(s.path) for s in samples]
    with contextlib.ExitStack() as stack:
        if workers == 1:  # in this process: no pool to start, nothing to deadlock
            _init_worker(preprocessing)
            results = map(_crop_one, paths)
        else:
            context = multiprocessing.get_context("spawn")
            pool = stack.enter_context(ProcessPoolExecutor(
                max_workers=workers, mp_context=context, initializer=_init_worker, initargs=(preprocessing,)
            ))
            results = pool.map(_crop_one, paths, chunksize=16)
        for i, (sample, crop) in enumerate(zip(samples, results, strict=True)):
            if crop is not None:
                kept.append(sample)
                crops.append(crop)
            if (i + 1) % 500 == 0:
                print(f"cropped {i + 1}/{len(samples)} ({time.monotonic() - started:.0f} s)", file=sys.stderr, flush=True)
    print(f"cropped {len(kept)} of {len(samples)} images ({len(samples) - len(kept)} without a usable face) "
          f"in {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
    size = crops[0].shape[0] if crops else 0
    return CropSet(
        pixels=np.stack(crops) if crops else np.zeros((0, size, size, 3), np.uint8),
        scores=np.array([s.score for s in kept], dtype=np.int8),
        subjects=np.array([s.subject_id for s in kept], dtype=str),
        paths=np.array([str(s.path) for s in kept], dtype=str),
        preprocessing=preprocessing,
        rejected=len(samples) - len(kept),
    )


def source_key(samples: list[Sample]) -> str:
    """What a cache of these samples was made from: per sample its path, score, subject id and the
    file's size and mtime (ns; -1 for a missing file), in order, as JSON. Any change makes it differ."""
    rows = []
    for s in samples:
        try:
            stat = os.stat(s.path)
            size, mtime = stat.st_size, stat.st_mtime_ns
        except OSError:
            size = mtime = -1
        rows.append([str(s.path), s.score, s.subject_id, size, mtime])
    return json.dumps(rows)


def save_crops(crops: CropSet, path: Path, jpeg_quality: int | None = None, sources: str | None = None) -> None:
    """Write an .npz: raw pixels compressed losslessly, or JPEG-encoded (small enough to ship to a GPU box).

    ``sources`` is the `source_key` of the samples the crops were built from (kept to tell a stale cache).
    """
    arrays: dict[str, np.ndarray] = {
        "format": np.array(CACHE_FORMAT), "scores": crops.scores, "subjects": crops.subjects, "paths": crops.paths,
        "preprocessing": np.array(json.dumps(crops.preprocessing, sort_keys=True)),
        "rejected": np.array(crops.rejected),
    }
    if sources is not None:
        arrays["sources"] = np.array(sources)
    if jpeg_quality is None:
        arrays["pixels"] = crops.pixels
    else:
        import cv2

        encoded = []
        for rgb in crops.pixels:
            ok, buffer = cv2.imencode(".jpg", rgb[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality])
            if not ok:
                raise RuntimeError("JPEG encoding failed")
            encoded.append(buffer.ravel())
        arrays["jpeg"] = np.concatenate(encoded) if encoded else np.zeros(0, np.uint8)
        arrays["offsets"] = np.cumsum([0] + [len(b) for b in encoded]).astype(np.int64)
        arrays["size"] = np.array(crops.pixels.shape[1])
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)


def load_crops(path: Path) -> CropSet:
    """Read a cache written by `save_crops` (no pickles)."""
    with np.load(path, allow_pickle=False) as z:
        if str(z["format"]) != CACHE_FORMAT:
            raise ValueError(f"{path}: not a crop cache of format {CACHE_FORMAT}")
        if "pixels" in z:
            pixels = z["pixels"]
        else:
            import cv2

            jpeg, offsets, size = z["jpeg"], z["offsets"], int(z["size"])
            pixels = np.empty((len(offsets) - 1, size, size, 3), np.uint8)
            for i in range(len(pixels)):
                bgr = cv2.imdecode(jpeg[offsets[i]:offsets[i + 1]], cv2.IMREAD_COLOR)
                pixels[i] = bgr[..., ::-1]
        return CropSet(pixels=pixels, scores=z["scores"], subjects=z["subjects"], paths=z["paths"],
                       preprocessing=json.loads(str(z["preprocessing"])), rejected=int(z["rejected"]))


def load_or_build_crops(
    data: Path, cache: Path | None = None, workers: int | None = None, preprocessing: dict[str, object] | None = None
) -> CropSet:
    """Crops for DATA: DATA itself if it is a cache (.npz), else the cache if it matches, else built (and cached).

    A cache matches when it was built from exactly DATA's samples (same paths in the same
    order, same scores and subject ids, files of the same size and mtime) with the same
    preprocessing; any change rebuilds it, so a stale cache is never used silently. A crop
    cache given as DATA must have been made with ``preprocessing`` (when given): it cannot be rebuilt.
    """
    data = Path(data)
    wanted_preprocessing = preprocessing or training_preprocessing()
    if data.suffix == ".npz":
        crops = load_crops(data)
        if preprocessing is not None and crops.preprocessing != preprocessing:
            raise ValueError(f"{data} holds crops made with {crops.preprocessing}, not {preprocessing}")
        return crops
    samples = read_samples(data)
    sources = source_key(samples)  # before building: a file changed meanwhile makes the next run rebuild
    if cache is not None and Path(cache).is_file():
        with np.load(cache, allow_pickle=False) as z:
            cached_sources = str(z["sources"]) if "sources" in z else None
            cached_preprocessing = json.loads(str(z["preprocessing"]))
        if cached_sources == sources and cached_preprocessing == wanted_preprocessing:
            cached = load_crops(cache)
            print(f"using cached crops {cache} ({len(cached)} crops)", file=sys.stderr, flush=True)
            return cached
        why = ("other preprocessing" if cached_preprocessing != wanted_preprocessing
               else "no record of its sources" if cached_sources is None
               else "images, files, scores or subject ids differ from DATA's")
        print(f"crop cache {cache} is stale ({why}); rebuilding", file=sys.stderr, flush=True)
    crops = build_crops(samples, workers, wanted_preprocessing)
    if cache is not None:
        save_crops(crops, cache, sources=sources)
    return crops
