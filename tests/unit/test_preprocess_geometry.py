"""Frontalized crop geometry: roll is removed, eyes land at fixed places, facial proportions survive."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from acroscreen.server.runtime.detect import HaarFaceDetector
from acroscreen.server.runtime.frontalize import (
    CropGeometry,
    eye_centres,
    transform_points,
)
from acroscreen.server.runtime.landmarks import LandmarkFitter
from acroscreen.server.runtime.preprocess import FacePreprocessor, PreprocessSettings, _intensity_patch, dlib_intensity
from acroscreen.server.runtime.types import Box
from acroscreen.server.runtime.card import Preprocessing

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"shared test data not found at {DATA} (CI provides it)")
FRONTAL = ("Barack_Obama/1.jpg", "Joe_Biden/2.jpg", "Eileen_Collins/1.jpg")
UPSCALE = 4  # re-fit on an upscaled crop: dlib returns whole pixels


@pytest.fixture(scope="module")
def preprocessor() -> FacePreprocessor:
    return FacePreprocessor(PreprocessSettings())


def face(name: str) -> np.ndarray:
    image = cv2.imread(str(DATA / "faces" / "identities" / name))
    assert image is not None, name
    return image


def refit(crop_rgb: np.ndarray, fitter: LandmarkFitter, geometry: CropGeometry) -> np.ndarray:
    """Landmarks found afresh on a crop (an independent check of where the eyes ended up)."""
    big = cv2.resize(crop_rgb[..., ::-1], None, fx=UPSCALE, fy=UPSCALE, interpolation=cv2.INTER_CUBIC)
    (lx, ly), (rx, _ry) = geometry.eye_positions
    width = (rx - lx) / 0.35
    box = Box((lx + rx) / 2 - width / 2, ly - 0.4 * width, width, width).scaled(UPSCALE)
    return (fitter.fit(big, box) + 0.5) / UPSCALE - 0.5


def test_default_geometry_is_the_documented_one() -> None:
    geometry = PreprocessSettings().geometry
    assert geometry == CropGeometry(input_size=160, box_height_expand=0.4, alignment="similarity-eyes-v1")
    assert np.array(geometry.eye_positions) == pytest.approx(np.array([[60.0, 64.0], [100.0, 64.0]]))
    affine = geometry.affine_from_eyes(np.array([210.0, 300.0]), np.array([290.0, 340.0]))
    assert transform_points(affine, np.array([[210.0, 300.0], [290.0, 340.0]])) == pytest.approx(
        np.array([[60.0, 64.0], [100.0, 64.0]])
    )


def test_card_fields_round_trip() -> None:
    settings = PreprocessSettings(landmark_points=68, box_height_expand=0.3)

    class Card:  # duck-typed stand-in for weights.Preprocessing
        input_size = 160
        box_height_expand = 0.3
        alignment = "similarity-eyes-v1"
        landmark_points = 68

    assert dict(settings.card_fields()) == {k: getattr(Card, k) for k in settings.card_fields()}
    assert PreprocessSettings.from_card_preprocessing(Card()).geometry == settings.geometry
    card = Preprocessing(**PreprocessSettings().card_fields())  # what training writes into the weights file
    assert PreprocessSettings.from_card_preprocessing(card) == PreprocessSettings()
    legacy = PreprocessSettings.from_card_preprocessing(
        Preprocessing(alignment="box", landmark_points=0, box_height_expand=0.15)
    )  # the plain heightened-box crop, no alignment landmarks
    assert legacy.alignment == "box" and legacy.landmark_points == 5
    with pytest.raises(ValueError, match="unknown alignment"):
        PreprocessSettings(alignment="mean-shape")


@needs_data
@pytest.mark.parametrize("name", FRONTAL[:2])
def test_roll_is_reported_and_removed(preprocessor: FacePreprocessor, name: str) -> None:
    image = face(name)
    base, _ = preprocessor.crop_image(image)
    assert base.accepted and base.pose is not None and base.detection is not None
    fitter = LandmarkFitter(5)
    for angle in (-25.0, -10.0, 10.0, 25.0):
        rotation = cv2.getRotationMatrix2D(base.detection.box.center, angle, 1.0)
        rotated = cv2.warpAffine(image, rotation, image.shape[1::-1], borderMode=cv2.BORDER_REPLICATE)
        analysis, crop = preprocessor.crop_image(rotated)
        assert crop is not None and analysis.pose is not None, (angle, analysis.detail)
        # cv2's positive angle turns the content counter-clockwise: the eye line rises to the right
        roll_error = analysis.pose.roll_deg - (base.pose.roll_deg - angle)
        left, right = eye_centres(refit(crop.pixels, fitter, preprocessor.geometry))
        level = np.degrees(np.arctan2(right[1] - left[1], right[0] - left[0]))
        print(f"{name} rotated {angle:+.0f}°: roll error {roll_error:+.2f}°, crop eye line {level:+.2f}°")
        assert abs(roll_error) < 3.0
        assert abs(level) < 2.0


def widen_lower_face(image: np.ndarray, landmarks: np.ndarray, factor: float) -> np.ndarray:
    """Stretch horizontally about the face's midline, ramping in from just below the eyes."""
    left, right = eye_centres(landmarks)
    centre_x = (left[0] + right[0]) / 2
    iod = float(np.linalg.norm(right - left))
    eye_y = max(left[1], right[1])
    start, full = eye_y + 0.25 * iod, eye_y + 0.6 * iod
    height, width = image.shape[:2]
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    stretch = 1.0 + (factor - 1.0) * np.clip((ys - start) / (full - start), 0.0, 1.0)
    source_x = (centre_x + (xs - centre_x) / stretch).astype(np.float32)
    return cv2.remap(image, source_x, ys, cv2.INTER_LINEAR)


FEATURES = {  # 68-point index pairs whose distances are averaged per feature
    "nose width": ((31, 35), (32, 34)),
    "jaw width": ((4, 12), (5, 11), (6, 10)),
    "mouth width": ((48, 54),),
}


def feature_widths(points: np.ndarray) -> dict[str, float]:
    return {
        name: float(np.mean([np.linalg.norm(points[a] - points[b]) for a, b in pairs]))
        for name, pairs in FEATURES.items()
    }


@needs_data
def test_proportions_survive_frontalization(preprocessor: FacePreprocessor) -> None:
    """Widen nose, mouth and jaw (not the eyes) by 20 %: the crop shows about the same 20 %.

    Measured with 68 points re-fitted on the crops; the median over three faces damps
    the landmark model's own noise. The same instrument on the uncropped frames gives
    the reference the crop must match.
    """
    factor = 1.2
    fitter = LandmarkFitter(68)
    in_crop: dict[str, list[float]] = {name: [] for name in FEATURES}
    in_frame: dict[str, list[float]] = {name: [] for name in FEATURES}
    for name in FRONTAL:
        image = face(name)
        base, base_crop = preprocessor.crop_image(image)
        assert base_crop is not None and base.landmarks is not None and base.detection is not None
        widened = widen_lower_face(image, base.landmarks, factor)
        _, widened_crop = preprocessor.crop_image(widened)
        assert widened_crop is not None
        before = feature_widths(refit(base_crop.pixels, fitter, preprocessor.geometry))
        after = feature_widths(refit(widened_crop.pixels, fitter, preprocessor.geometry))
        frame_before = feature_widths(fitter.fit(image, base.detection.box))
        frame_after = feature_widths(fitter.fit(widened, base.detection.box))
        for feature in FEATURES:
            in_crop[feature].append(after[feature] / before[feature])
            in_frame[feature].append(frame_after[feature] / frame_before[feature])
    for feature in FEATURES:
        crop_ratio, frame_ratio = float(np.median(in_crop[feature])), float(np.median(in_frame[feature]))
        print(f"{feature}: crop ratio {crop_ratio:.3f}, frame ratio {frame_ratio:.3f}, applied {factor}")
        assert crop_ratio == pytest.approx(factor, rel=0.10)
        assert crop_ratio == pytest.approx(frame_ratio, rel=0.06)


@needs_data
def test_dlib_fits_its_intensity_image_as_it_fits_the_colour_one() -> None:
    """Fit patches are warped from dlib_intensity: it must be exactly what dlib reads in a BGR image."""
    image = face(FRONTAL[0])
    grey = dlib_intensity(image)
    assert grey.shape == image.shape[:2]
    assert np.array_equal(grey, (image.astype(np.int32).sum(axis=2) // 3).astype(np.uint8))
    fitter = LandmarkFitter(5)
    box = HaarFaceDetector().detect(image)
    assert box is not None
    assert np.array_equal(fitter.fit(image, box.box), fitter.fit(grey, box.box))


@pytest.mark.parametrize("centre", [(160.0, 120.0), (12.0, 230.0)])  # inside; past the bottom-left corner
def test_the_fit_patch_is_the_warp_of_the_whole_frame_s_intensity(centre: tuple[float, float]) -> None:
    """Only the frame region under the fit patch is converted and warped: same patch as from the whole frame."""
    rng = np.random.default_rng(0)
    image = cv2.GaussianBlur(rng.integers(0, 256, (240, 320, 3), dtype=np.uint8), (0, 0), 2)
    affine = cv2.getRotationMatrix2D(centre, 12.0, 2.5)
    affine[:, 2] += np.array([100.0 - centre[0], 100.0 - centre[1]])
    whole = cv2.warpAffine(dlib_intensity(image), affine, (200, 200), borderMode=cv2.BORDER_REPLICATE)
    patch = _intensity_patch(image, affine, 200)
    assert patch.shape == whole.shape and patch.dtype == np.uint8
    assert np.abs(patch.astype(np.int32) - whole).max() <= 1  # fixed-point interpolation of a shifted origin
