import dataclasses
from pathlib import Path

import av
import cv2
import numpy as np
import pytest
from acroscreen.server.runtime.detect import (
    DetectorSettings,
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


# Photographs whose face, turned 180°, the gate took as a face (upside down) before the check.
TAKEN_UPSIDE_DOWN = ("Alastair_Campbell/1.jpg", "Arnold_Schwarzenegger/3.jpg", "Barbara_Walters/1.jpg",
                     "Lucy_Liu/1.jpg", "Kit_Harington/1.jpg", "Tom_Harkin/5.jpg")


def test_an_aligned_crop_turned_round_is_upside_down(portrait_bgr: np.ndarray) -> None:
    analysis, _ = FacePreprocessor(PreprocessSettings()).crop_image(portrait_bgr)
    assert analysis.aligned is not None
    grey = cv2.cvtColor(analysis.aligned, cv2.COLOR_BGR2GRAY)
    hog = HogFaceDetector()
    upright, turned = hog.evidence(grey), hog.evidence(cv2.rotate(grey, cv2.ROTATE_180))
    assert upright.face > 0.5 and not upright.upside_down
    assert turned.upside_down and turned.face < upright.face


def test_faces_standing_on_their_heads_are_rejected_not_analysed(shared_data: Path) -> None:
    """The cascade finds some upside-down faces and the fit then puts the eyes on the mouth: those
    crops went to the model upside down. Now they are rejected (POSE, saying why); upright, the
    same photographs are still taken."""
    preprocessor = FacePreprocessor(PreprocessSettings())
    for name in TAKEN_UPSIDE_DOWN:
        image = cv2.imread(str(shared_data / "faces" / "identities" / name))
        assert preprocessor.analyze(image).accepted, name
        turned = preprocessor.analyze(cv2.rotate(image, cv2.ROTATE_180))
        assert turned.rejection is RejectReason.POSE and "upside down" in turned.detail, (name, turned.detail)


def test_a_stream_turned_upside_down_is_not_analysed(shared_data: Path) -> None:
    """A keyframe's verdict covers the tracked frames after it: a stream turned round gave the model
    91 of its first 150 frames upside down; now none."""
    preprocessor = FacePreprocessor(PreprocessSettings())
    tracker = preprocessor.settings.new_tracker()
    reasons = []
    with av.open(str(shared_data / "videos" / "liveportrait_d3.mp4")) as container:
        for index, frame in enumerate(container.decode(video=0)):
            if index == 60:
                break
            analysis = preprocessor.analyze(cv2.rotate(frame.to_ndarray(format="bgr24"), cv2.ROTATE_180), tracker)
            reasons.append(analysis.detail if analysis.rejection is RejectReason.POSE else analysis.rejection)
    assert None not in reasons  # no frame accepted
    assert sum("upside down" in str(reason) for reason in reasons) >= 5, reasons


def _face_on_canvas(face_image: np.ndarray, face_box: Box, face_px: float, size: tuple[int, int]) -> tuple[np.ndarray, Box]:
    """``face_image`` shrunk so its face is ``face_px`` wide, pasted at the centre-left of a
    width×height canvas of smooth noise (a flat canvas would skew the cascade's histogram
    equalisation); the canvas and where the face box lands on it."""
    factor = face_px / face_box.width
    small = cv2.resize(face_image, None, fx=factor, fy=factor, interpolation=cv2.INTER_AREA)
    width, height = size
    noise = np.random.default_rng(0).normal(110.0, 40.0, (height, width, 3)).astype(np.float32)
    canvas = np.clip(cv2.GaussianBlur(noise, (0, 0), 3.0), 0, 255).astype(np.uint8)
    x, y = width // 3, (height - small.shape[0]) // 2
    canvas[y : y + small.shape[0], x : x + small.shape[1]] = small
    box = face_box.scaled(factor)
    return canvas, Box(box.x + x, box.y + y, box.width, box.height)


def test_small_faces_in_large_frames_are_found_on_a_larger_copy(portrait_bgr: np.ndarray) -> None:
    """detect_all's 320-px copy shrinks a 72-px face in a 1280×720 frame to 18 px, below the
    cascade's 24-px window; detect_small scans just those sizes on a 480-px copy."""
    detector = HaarFaceDetector()
    portrait = detector.detect(portrait_bgr)
    assert portrait is not None
    canvas, truth = _face_on_canvas(portrait_bgr, portrait.box, 72.0, (1280, 720))
    assert detector.detect_all(canvas) == []
    found = detector.detect_small(canvas, min_face_px=64.0)
    assert len(found) == 1
    box, confidence = found[0]
    assert iou(box, truth) > 0.6 and confidence > 0.0
    # A still goes through it when detect_all finds nothing, and the face is analysed at its size.
    analysis = FacePreprocessor(PreprocessSettings()).analyze(canvas)
    assert analysis.detection is not None and iou(analysis.detection.box, truth) > 0.6
    assert analysis.accepted, analysis.detail


def test_detect_small_scans_only_what_detect_all_cannot_see(portrait_bgr: np.ndarray) -> None:
    detector = HaarFaceDetector()
    portrait = detector.detect(portrait_bgr)
    assert portrait is not None
    # 640×480: the 320-px copy's 24-px window is 48 frame pixels, below the quality gate's 64.
    canvas, _ = _face_on_canvas(portrait_bgr, portrait.box, 72.0, (640, 480))
    assert detector.detect_small(canvas, min_face_px=64.0) == []
    # 1280×720, looking for faces of 100 px and more: all within detect_all's range.
    canvas, _ = _face_on_canvas(portrait_bgr, portrait.box, 72.0, (1280, 720))
    assert detector.detect_small(canvas, min_face_px=100.0) == []


@pytest.mark.parametrize(("size", "face_px"), [((1280, 720), 80.0), ((1920, 1080), 96.0)])
def test_small_faces_of_many_people_in_hd_frames(shared_data: Path, size: tuple[int, int], face_px: float) -> None:
    """Faces of 16 people, small in an HD frame: detect_all finds 1 of 16 at 80 px in 1280×720 and
    none at 96 px in 1920×1080; a still's search (detect_small when detect_all finds none) 15 and 16."""
    detector = HaarFaceDetector()
    preprocessor = FacePreprocessor(PreprocessSettings())
    found = 0
    for person in sorted((shared_data / "faces" / "identities").iterdir())[:16]:
        image = cv2.imread(str(sorted(person.glob("*.jpg"))[0]))
        detection = detector.detect(image)
        assert detection is not None, person.name
        canvas, truth = _face_on_canvas(image, detection.box, face_px, size)
        analysis = preprocessor.analyze(canvas)
        found += analysis.detection is not None and iou(analysis.detection.box, truth) > 0.5
    assert found >= 14


def test_large_photos_without_faces_give_no_small_or_hog_faces(shared_data: Path) -> None:
    cascade, hog = HaarFaceDetector(), HogFaceDetector()
    for path in sorted((shared_data / "faces" / "none").glob("*.jpg")):
        image = cv2.resize(cv2.imread(str(path)), (1920, 1080))
        assert cascade.detect_small(image, min_face_px=64.0) == [], path.name
        assert hog.detect_all(image) == [], path.name


def test_the_hog_fallback_scales_its_copy_with_the_frame(shared_data: Path) -> None:
    """A face the cascade misses, 130 px wide in a 1280×720 frame: HOG's 80-px window on the
    480-px copy it used to scan is 213 frame px; the copy now grows so that 128-px faces fill it."""
    image = cv2.imread(str(shared_data / "faces" / "identities" / "Cathy_Freeman" / "2.jpg"))
    [(box, _)] = HogFaceDetector().detect_all(image)
    canvas, truth = _face_on_canvas(image, box, 130.0, (1280, 720))
    cascade = HaarFaceDetector()
    assert cascade.detect_all(canvas) == [] and cascade.detect_small(canvas, min_face_px=64.0) == []
    assert HogFaceDetector(DetectorSettings(fallback_max_side=480)).detect_all(canvas) == []
    found = HogFaceDetector().detect_all(canvas)
    assert len(found) == 1 and iou(found[0][0], truth) > 0.7
    analysis = FacePreprocessor(PreprocessSettings()).analyze(canvas)
    assert analysis.accepted and analysis.detection is not None, analysis.detail
    assert iou(analysis.detection.box, truth) > 0.7


def test_a_small_face_in_a_1080p_stream_is_followed(shared_data: Path) -> None:
    """A talking head ~120 px wide in 1920×1080 frames (a patient sitting back from an HD camera):
    before detect_small none of these 40 frames had a face; now every one is analysed."""
    background = cv2.resize(cv2.imread(str(shared_data / "faces" / "none" / "coffee.jpg")), (1920, 1080))
    settings = PreprocessSettings()
    preprocessor, tracker = FacePreprocessor(settings), settings.new_tracker()
    accepted = []
    with av.open(str(shared_data / "videos" / "liveportrait_d9.mp4")) as container:
        for index, frame in enumerate(container.decode(video=0)):
            if index == 40:
                break
            small = cv2.resize(frame.to_ndarray(format="bgr24"), None, fx=0.35, fy=0.35, interpolation=cv2.INTER_AREA)
            picture = background.copy()
            picture[700 : 700 + small.shape[0], 1200 : 1200 + small.shape[1]] = small
            analysis = preprocessor.analyze(picture, tracker)
            if analysis.accepted:
                assert analysis.detection is not None
                accepted.append(analysis.detection.box.width)
    assert len(accepted) == 40
    assert 90 < float(np.median(accepted)) < 150
