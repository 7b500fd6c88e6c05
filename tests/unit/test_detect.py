import dataclasses
from pathlib import Path

import cv2
import numpy as np
from acroscreen.server.runtime.detect import (
    HaarFaceDetector,
    HogFaceDetector,
    primary_score,
    subject_preference,
)
from acroscreen.server.runtime.preprocess import FacePreprocessor, PreprocessSettings
from acroscreen.server.runtime.tracking import iou
from acroscreen.server.runtime.types import Box, RejectReason


def test_portrait_has_a_face(portrait_bgr: np.ndarray) -> None:
    detection = HaarFaceDetector().detect(portrait_bgr)
    assert detection is not None
    assert 0.0 <= detection.confidence <= 1.0
    # The face is in the upper middle of the NASA portrait.
    cx, cy = detection.box.center
    assert 150 < cx < 400 and 80 < cy < 300


def test_photos_without_faces_give_none(shared_data: Path) -> None:
    detector = HaarFaceDetector()
    for path in sorted((shared_data / "faces" / "none").glob("*.jpg")):
        assert detector.detect(cv2.imread(str(path))) is None, path.name


def test_group_photos_count_every_face(shared_data: Path) -> None:
    detector = HaarFaceDetector()
    for path in sorted((shared_data / "faces" / "multi").glob("*.jpg")):
        image = cv2.imread(str(path))
        detection = detector.detect(image)
        assert detection is not None and detection.face_count > 1, path.name
        faces = detector.detect_all(image)
        best = max(faces, key=lambda face: subject_preference(face, image.shape[1], image.shape[0]))
        assert detection.box == best[0]


def test_primary_prefers_large_and_central() -> None:
    central = Box(280, 200, 80, 80)
    corner_same_size = Box(0, 0, 80, 80)
    assert primary_score(central, 640, 480) > primary_score(corner_same_size, 640, 480)
    big_corner = Box(0, 0, 200, 200)
    assert primary_score(big_corner, 640, 480) > primary_score(central, 640, 480)


def test_a_minimum_face_size_keeps_comparable_faces_and_drops_small_ones(shared_data: Path) -> None:
    """What a followed stream's keyframes rely on (min_face_px = 0.7 x the subject's width)."""
    detector = HaarFaceDetector()
    dropped_any = False
    for path in sorted((shared_data / "faces" / "multi").glob("*.jpg")):
        image = cv2.imread(str(path))
        widths = [box.width for box, _ in detector.detect_all(image)]
        largest = max(widths)
        kept = [box.width for box, _ in detector.detect_all(image, min_face_px=0.7 * largest)]
        assert len(kept) >= sum(w >= 0.85 * largest for w in widths), path.name
        # The cascade's scale steps (factor 1.1) blur the edge by a step or two.
        assert min(kept) >= 0.7 * largest / 1.25, path.name
        dropped_any |= len(kept) < len(widths)
    assert dropped_any, "a group photo with small and large faces should lose its small ones"


def test_hog_boxes_come_in_the_cascades_convention(portrait_bgr: np.ndarray) -> None:
    """Downstream stages judge face size and landmark fits on cascade boxes (raw HOG box: IoU 0.73)."""
    cascade = HaarFaceDetector().detect(portrait_bgr)
    found = HogFaceDetector().detect_all(portrait_bgr)
    assert cascade is not None and len(found) == 1
    box, confidence = found[0]
    assert iou(cascade.box, box) > 0.8
    assert 0.5 < confidence <= 1.0
    assert HogFaceDetector().detect_all(portrait_bgr, min_face_px=2.0 * box.width) == []


def test_hog_finds_no_face_in_photos_without_faces(shared_data: Path) -> None:
    detector = HogFaceDetector()
    for path in sorted((shared_data / "faces" / "none").glob("*.jpg")):
        assert detector.detect_all(cv2.imread(str(path))) == [], path.name


def test_a_face_the_cascade_misses_is_found_by_the_hog_fallback(shared_data: Path) -> None:
    """The fallback is what keeps strongly morphed (level-3 phantom) faces from going unscored."""
    image = cv2.imread(str(shared_data / "faces" / "identities" / "Cathy_Freeman" / "2.jpg"))
    assert HaarFaceDetector().detect_all(image) == []
    settings = PreprocessSettings()
    analysis, crop = FacePreprocessor(settings).crop_image(image)
    assert analysis.accepted and crop is not None, analysis.detail
    without = dataclasses.replace(settings, detector=dataclasses.replace(settings.detector, fallback_max_side=0))
    analysis, crop = FacePreprocessor(without).crop_image(image)
    assert analysis.rejection is RejectReason.NO_FACE and crop is None
