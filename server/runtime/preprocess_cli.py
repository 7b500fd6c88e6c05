"""Body of ``acroscreen preprocess SOURCE --out DIR [--landmarks 5|68] [--json]``.

The same ``FacePreprocessor`` the server and training use, so crops made here are
exactly the model's input. Videos are decoded with PyAV and tracked like a stream.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from .frontalize import FRONTAL_3D_V1, SIMILARITY_EYES_V1
from .landmarks import LICENCE_NOTICES
from .preprocess import FaceAnalysis, FacePreprocessor, PreprocessSettings
from .tracking import FaceTracker

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})


def run_preprocess(source: Path, out_dir: Path, landmark_points: int, emit_json: bool) -> int:
    """Crop every face in an image, a folder of images (recursively) or a video; 0 on success.

    Crops go to ``out_dir`` as PNG (a folder's layout is kept; video frames are
    ``<stem>_<frame>.png``). With ``emit_json`` one JSON object per analysed frame
    is printed on stdout; the summary always goes to stderr.
    """
    if landmark_points not in (5, 68):
        print(f"error: --landmarks must be 5 or 68, not {landmark_points}", file=sys.stderr)
        return 2
    if not source.exists():
        print(f"error: {source} does not exist", file=sys.stderr)
        return 2
    if landmark_points == 68:
        print(f"note: {LICENCE_NOTICES[68]}", file=sys.stderr)
    # 68 points can also undo yaw; 5 points give the eye-based similarity only.
    alignment = FRONTAL_3D_V1 if landmark_points == 68 else SIMILARITY_EYES_V1
    preprocessor = FacePreprocessor(PreprocessSettings(landmark_points=landmark_points, alignment=alignment))
    out_dir.mkdir(parents=True, exist_ok=True)
    analysed = written = 0
    try:
        for name, frame_index, image, tracker in _frames(source, preprocessor):
            if image is None:
                print(f"warning: cannot read {name}", file=sys.stderr)
                continue
            analysis = preprocessor.analyze(image, tracker)
            crop_path = None
            if analysis.accepted:
                crop_path = out_dir / (f"{name}.png" if tracker is None else f"{name}_{frame_index:06d}.png")
                crop_path.parent.mkdir(parents=True, exist_ok=True)
                pixels = preprocessor.crop(image, analysis).pixels
                if not cv2.imwrite(str(crop_path), cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR)):
                    print(f"error: cannot write {crop_path}", file=sys.stderr)
                    return 1
                written += 1
            analysed += 1
            if emit_json:
                print(json.dumps(face_record(name, frame_index, analysis, crop_path)), flush=True)
    except (OSError, ValueError) as error:  # av.error.* derive from these: unreadable or not a video
        print(f"error: cannot decode {source}: {error}", file=sys.stderr)
        return 1
    except ImportError:
        print("error: reading video needs PyAV: pip install 'acroscreen[media]'", file=sys.stderr)
        return 1
    print(f"{analysed} frame(s) analysed, {written} crop(s) written to {out_dir}", file=sys.stderr)
    return 0 if analysed else 1


def face_record(source: str, frame: int, analysis: FaceAnalysis, crop: Path | None) -> dict[str, Any]:
    """The JSON shape of one analysed frame."""
    detection, pose, quality = analysis.detection, analysis.pose, analysis.quality
    return {
        "source": source,
        "frame": frame,
        "box": None
        if detection is None
        else {
            "x": round(detection.box.x, 2),
            "y": round(detection.box.y, 2),
            "width": round(detection.box.width, 2),
            "height": round(detection.box.height, 2),
        },
        "face_count": 0 if detection is None else detection.face_count,
        "keyframe": analysis.keyframe,
        "landmarks": None if analysis.landmarks is None else np.round(analysis.landmarks, 2).tolist(),
        "pose": None
        if pose is None
        else {
            "yaw": round(pose.yaw_deg, 2),
            "pitch": round(pose.pitch_deg, 2),
            "roll": round(pose.roll_deg, 2),
        },
        "quality": None
        if quality is None
        else {
            "score": round(quality.score, 4),
            "sharpness": round(quality.sharpness, 4),
            "exposure": round(quality.exposure, 4),
            "face_size": round(quality.face_size, 4),
            "pose": round(quality.pose, 4),
            "confidence": round(quality.confidence, 4),
        },
        "rejected": None if analysis.rejection is None else analysis.rejection.value,
        "detail": analysis.detail,
        "crop": None if crop is None else str(crop),
    }


def _frames(
    source: Path, preprocessor: FacePreprocessor
) -> Iterator[tuple[str, int, np.ndarray | None, FaceTracker | None]]:
    """(name, frame index, BGR image or None when unreadable, tracker for video frames)."""
    if source.is_dir():
        for path in sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
            yield str(path.relative_to(source).with_suffix("")), 0, cv2.imread(str(path)), None
    elif source.suffix.lower() in IMAGE_SUFFIXES:
        yield source.stem, 0, cv2.imread(str(source)), None
    else:
        import av  # the media extra; only needed for video

        tracker = preprocessor.settings.new_tracker()
        with av.open(str(source)) as container:
            for index, frame in enumerate(container.decode(video=0)):
                yield source.stem, index, frame.to_ndarray(format="bgr24"), tracker
