"""68-point out-of-plane frontalization ("frontal-3d-v1"): turned faces come out frontal,
frontal faces come out as the similarity crop, proportions and eye positions survive."""

from __future__ import annotations

import numpy as np
import pytest
from acroscreen.server.runtime.frontal3d import GENERIC_EYE_DISTANCE_MM, FrontalWarp, frontal_warp, surface_depth
from acroscreen.server.runtime.frontalize import FRONTAL_3D_V1, affine_scale, eye_centres, transform_points, warp_face
from acroscreen.server.runtime.landmarks import LandmarkFitter
from acroscreen.server.runtime.preprocess import FaceAnalysis, FacePreprocessor, PreprocessSettings

from tests.unit.test_preprocess_geometry import (
    DATA,
    FEATURES,
    FRONTAL,
    face,
    feature_widths,
    needs_data,
    refit,
    widen_lower_face,
)

pytestmark = needs_data


@pytest.fixture(scope="module")
def preprocessor() -> FacePreprocessor:
    return FacePreprocessor(PreprocessSettings(landmark_points=68, alignment=FRONTAL_3D_V1))


def analysed_with_warp(preprocessor: FacePreprocessor, image: np.ndarray) -> tuple[FaceAnalysis, FrontalWarp | None]:
    """The analysis and the 3-D warp of its landmarks (None when no face shape was found)."""
    analysis = preprocessor.analyze(image)
    if analysis.landmarks is None or analysis.affine is None:
        return analysis, None
    return analysis, frontal_warp(analysis.landmarks, preprocessor.geometry)


def sample_photos() -> list[str]:
    """Every 4th photograph of the first 100 identities in shared/data."""
    root = DATA / "faces" / "identities"
    return [str(path.relative_to(root)) for path in sorted(root.glob("*/*.jpg"))[:400:4]]


def crop_points(warp: FrontalWarp, frame_points: np.ndarray) -> np.ndarray:
    """Where frame points land in the crop: Newton on the crop → frame map from three starts around
    the similarity's answer. Where the surface folds (a nose flank hidden behind the nose) several
    crop points see the same frame point; the one nearest the camera is the one the frame shows."""
    view = warp.view
    points = np.asarray(frame_points, dtype=np.float64).reshape(-1, 2)
    guess = transform_points(warp.similarity, points)
    spread = 0.25 * GENERIC_EYE_DISTANCE_MM * affine_scale(view.plane_to_crop)  # a quarter of the eyes' distance
    best, best_depth = guess.copy(), np.full(len(points), np.inf)
    for shift in (0.0, -spread, spread):
        found = guess + [shift, 0.0]
        for _ in range(12):
            at = view.crop_to_frame(found)
            step = 1e-2
            jacobian = np.stack([(view.crop_to_frame(found + [step, 0.0]) - at) / step,
                                 (view.crop_to_frame(found + [0.0, step]) - at) / step], axis=2)
            jacobian[np.abs(np.linalg.det(jacobian)) < 1e-9] = np.eye(2)
            found = found + np.linalg.solve(jacobian, (points - at)[..., None])[..., 0]
        converged = np.linalg.norm(view.crop_to_frame(found) - points, axis=1) < 0.05
        x, y = view.crop_to_surface(found)
        depth = (np.stack([x, y, surface_depth(x, y)], axis=-1) @ view.fit.rotation.T + view.fit.translation)[..., 2]
        better = converged & (depth < best_depth)
        best[better], best_depth[better] = found[better], depth[better]
    return best


def nose_offset(points: np.ndarray) -> float:
    """Nose tip (68-point index 30) left or right of the eye midpoint, in inter-ocular distances."""
    left, right = eye_centres(points)
    return float((points[30, 0] - (left[0] + right[0]) / 2) / np.linalg.norm(right - left))


def test_needs_68_points() -> None:
    with pytest.raises(ValueError, match="68 landmark points"):
        PreprocessSettings(alignment=FRONTAL_3D_V1)


def test_turned_faces_come_out_frontal(preprocessor: FacePreprocessor) -> None:
    """Yaw moves the nose tip sideways against the eyes (it stands ~30 mm in front of them);
    after the 3-D correction it sits between the eyes again, whatever the yaw.
    """
    yaws, flat, frontal = [], [], []
    for name in sample_photos():
        analysis, warp = analysed_with_warp(preprocessor, face(name))
        if warp is None or analysis.pose is None:
            continue
        yaws.append(analysis.pose.yaw_deg)
        flat.append(nose_offset(transform_points(warp.similarity, analysis.landmarks)))
        frontal.append(nose_offset(crop_points(warp, analysis.landmarks)))
    yaw, flat_offsets, frontal_offsets = np.array(yaws), np.array(flat), np.array(frontal)
    turned = np.abs(yaw) > 10
    print(f"{len(yaw)} faces, {turned.sum()} with |yaw| > 10°: mean |nose offset| "
          f"{np.abs(flat_offsets[turned]).mean():.3f} → {np.abs(frontal_offsets[turned]).mean():.3f} IOD; "
          f"correlation with yaw {np.corrcoef(yaw, flat_offsets)[0, 1]:.2f} → {np.corrcoef(yaw, frontal_offsets)[0, 1]:.2f}")
    assert len(yaw) >= 80 and turned.sum() >= 20
    assert np.corrcoef(yaw, flat_offsets)[0, 1] > 0.9  # the instrument sees yaw in the similarity crop
    assert abs(np.corrcoef(yaw, frontal_offsets)[0, 1]) < 0.4
    assert np.abs(frontal_offsets[turned]).mean() < 0.35 * np.abs(flat_offsets[turned]).mean()


def test_eyes_stay_at_the_fixed_crop_positions(preprocessor: FacePreprocessor) -> None:
    checked = 0
    for name in sample_photos()[::10]:
        analysis, warp = analysed_with_warp(preprocessor, face(name))
        if warp is None:
            continue
        left, right = eye_centres(analysis.landmarks)
        in_crop = crop_points(warp, np.stack([left, right]))
        assert np.abs(in_crop - np.array(preprocessor.geometry.eye_positions)).max() < 0.5, name
        checked += 1
    assert checked >= 8


def test_a_frontal_face_is_cropped_as_by_the_similarity(preprocessor: FacePreprocessor) -> None:
    """Nothing to undo: the 3-D crop differs from the eye similarity's by little more than resampling."""
    for name in FRONTAL:
        image = face(name)
        analysis, warp = analysed_with_warp(preprocessor, image)
        assert warp is not None and analysis.pose is not None and abs(analysis.pose.yaw_deg) < 8, name
        similarity_crop = warp_face(image, warp.similarity, 160).astype(np.float64)
        difference = np.abs(warp.apply(image).astype(np.float64) - similarity_crop)
        central = difference[40:140, 40:120].mean()
        print(f"{name}: mean |Δ| {central:.1f} grey levels in the face, own-pixel share ≥ {warp.own_share.min():.2f}")
        assert central < 6.0, name


def test_a_mirrored_face_gives_the_mirrored_crop(preprocessor: FacePreprocessor) -> None:
    """Yaw of either sign is undone alike: crop(mirror(frame)) ≈ mirror(crop(frame)), as closely
    as for the eye similarity (dlib's landmarks are not exactly mirror-symmetric themselves).
    On faces turned by more than 12°, where the correction is largest."""
    turned = [name for name in sample_photos()[:40]
              if (pose := preprocessor.analyze(face(name)).pose) is not None and abs(pose.yaw_deg) > 12]
    assert len(turned) >= 4
    for name in turned[:6]:
        image = face(name)
        mirrored_image = image[:, ::-1].copy()
        analysis, warp = analysed_with_warp(preprocessor, image)
        mirrored_analysis, mirrored_warp = analysed_with_warp(preprocessor, mirrored_image)
        assert warp is not None and mirrored_warp is not None

        def mismatch(crop: np.ndarray, mirrored_crop: np.ndarray) -> float:
            return float(np.abs(crop[:, ::-1].astype(np.float64) - mirrored_crop)[30:150, 30:130].mean())

        frontal = mismatch(warp.apply(image), mirrored_warp.apply(mirrored_image))
        similarity = mismatch(warp_face(image, warp.similarity, 160), warp_face(mirrored_image, mirrored_warp.similarity, 160))
        print(f"{name}: mirror mismatch {frontal:.1f} grey levels (similarity crop: {similarity:.1f})")
        assert frontal < similarity + 1.5, name


def test_proportions_survive_the_3d_correction(preprocessor: FacePreprocessor) -> None:
    """The same check as for the similarity: widen nose, mouth and jaw by 20 %, the crop shows it."""
    factor = 1.2
    fitter = LandmarkFitter(68)
    in_crop: dict[str, list[float]] = {name: [] for name in FEATURES}
    for name in FRONTAL:
        image = face(name)
        base, base_crop = preprocessor.crop_image(image)
        assert base_crop is not None and base.landmarks is not None
        _, widened_crop = preprocessor.crop_image(widen_lower_face(image, base.landmarks, factor))
        assert widened_crop is not None
        before = feature_widths(refit(base_crop.pixels, fitter, preprocessor.geometry))
        after = feature_widths(refit(widened_crop.pixels, fitter, preprocessor.geometry))
        for feature in FEATURES:
            in_crop[feature].append(after[feature] / before[feature])
    for feature in FEATURES:
        ratio = float(np.median(in_crop[feature]))
        print(f"{feature}: crop ratio {ratio:.3f}, applied {factor}")
        assert ratio == pytest.approx(factor, rel=0.10)
