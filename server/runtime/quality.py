"""Frame quality of one analysed face: component scores in [0, 1], one overall score, a rejection.

Sharpness and exposure are measured on the inner face of the frontalized crop
(eyes to mouth, cheek to cheek), so they do not depend on how large the face is in
the frame or on the background. Sharpness is the variance of the Laplacian; a small
or upscaled face is honestly less sharp at the model's input size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from .types import Box, HeadPose, Quality, RejectReason


@dataclass(frozen=True, slots=True, kw_only=True)
class QualitySettings:
    """Rejection thresholds and the points where a component reaches a full score."""

    min_face_px: float = 64.0  # detector-box width below which a face is too small
    good_face_px: float = 128.0
    min_sharpness: float = 15.0  # Laplacian variance on the inner-face crop (LFW median ≈ 110)
    good_sharpness: float = 300.0  # scored on a log scale between the two
    min_brightness: float = 40.0  # mean grey level of the inner face
    max_brightness: float = 215.0
    max_clipped: float = 0.25  # fraction of inner-face pixels at ≤ 5 or ≥ 250
    max_yaw_deg: float = 30.0
    max_pitch_deg: float = 25.0  # gated only when pitch is measured (68 points), see QualityInputs
    max_roll_deg: float = 40.0
    min_confidence: float = 0.35  # detector confidence × landmark plausibility

    def __post_init__(self) -> None:
        """A threshold set the score ramps cannot use is refused at start, not met per frame."""
        checks = (
            (0.0 < self.min_face_px < self.good_face_px, "0 < min_face_px < good_face_px"),
            (0.0 < self.min_sharpness < self.good_sharpness, "0 < min_sharpness < good_sharpness"),
            (0.0 <= self.min_brightness < self.max_brightness <= 255.0, "0 <= min_brightness < max_brightness <= 255"),
            (0.0 < self.max_clipped <= 1.0, "0 < max_clipped <= 1"),
            (min(self.max_yaw_deg, self.max_pitch_deg, self.max_roll_deg) > 0.0, "pose limits > 0"),
            (0.0 <= self.min_confidence <= 1.0, "0 <= min_confidence <= 1"),
        )
        broken = [rule for holds, rule in checks if not holds]
        if broken:
            raise ValueError(f"quality thresholds must satisfy {'; '.join(broken)}: got {self}")


@dataclass(frozen=True, slots=True)
class QualityInputs:
    """What the gate looks at for one face."""

    face_px: float
    crop_grey: np.ndarray  # the frontalized crop in grey, input_size²
    pose: HeadPose
    confidence: float
    # 5-point pitch comes from the nose's length below the eyes, and acromegaly enlarges
    # the nose: gating on it would turn away the very patients screened. Reported, not gated.
    pitch_measured: bool


def inner_face(crop_grey: np.ndarray) -> np.ndarray:
    """The central face region of a similarity-eyes crop (no hair, background, collar)."""
    size = crop_grey.shape[0]
    return crop_grey[int(0.30 * size) : int(0.85 * size), int(0.25 * size) : int(0.75 * size)]


def assess(inputs: QualityInputs, settings: QualitySettings) -> tuple[Quality, RejectReason | None, str]:
    """Quality components, the overall score (geometric mean) and the first failing reason."""
    region = inner_face(inputs.crop_grey)
    sharp = float(cv2.Laplacian(region, cv2.CV_64F).var())
    brightness = float(region.mean())
    clipped = float(np.mean((region <= 5) | (region >= 250)))
    pose = inputs.pose

    sharp_score = _ramp(math.log(max(sharp, 1e-6)), math.log(settings.min_sharpness), math.log(settings.good_sharpness))
    mid = (settings.min_brightness + settings.max_brightness) / 2.0
    half = (settings.max_brightness - settings.min_brightness) / 2.0
    exposure_score = max(0.0, 1.0 - (abs(brightness - mid) / half) ** 2)
    exposure_score *= max(0.0, 1.0 - clipped / settings.max_clipped)
    size_score = _ramp(inputs.face_px, settings.min_face_px, settings.good_face_px)
    pitch = abs(pose.pitch_deg) if inputs.pitch_measured else 0.0
    pose_score = max(0.0, 1.0 - max(abs(pose.yaw_deg) / settings.max_yaw_deg, pitch / settings.max_pitch_deg) ** 2)
    confidence = min(1.0, max(0.0, inputs.confidence))
    components = (sharp_score, exposure_score, size_score, pose_score, confidence)
    score = math.prod(max(c, 1e-3) for c in components) ** (1.0 / len(components))
    quality = Quality(
        score=score if min(components) > 0 else 0.0,
        sharpness=sharp_score,
        exposure=exposure_score,
        face_size=size_score,
        pose=pose_score,
        confidence=confidence,
    )

    if inputs.face_px < settings.min_face_px:
        return quality, RejectReason.FACE_TOO_SMALL, f"face {inputs.face_px:.0f} px < {settings.min_face_px:.0f} px"
    if confidence < settings.min_confidence:
        return quality, RejectReason.LOW_CONFIDENCE, f"face confidence {confidence:.2f} < {settings.min_confidence:.2f}"
    if (
        abs(pose.yaw_deg) > settings.max_yaw_deg
        or pitch > settings.max_pitch_deg
        or abs(pose.roll_deg) > settings.max_roll_deg
    ):
        return (
            quality,
            RejectReason.POSE,
            (
                f"pose yaw {pose.yaw_deg:.0f}°, pitch {pose.pitch_deg:.0f}°, roll {pose.roll_deg:.0f}° beyond "
                f"{settings.max_yaw_deg:.0f}/{settings.max_pitch_deg:.0f}/{settings.max_roll_deg:.0f}°"
            ),
        )
    if not settings.min_brightness <= brightness <= settings.max_brightness or clipped > settings.max_clipped:
        return quality, RejectReason.BAD_EXPOSURE, f"face brightness {brightness:.0f}, clipped {clipped:.0%}"
    if sharp < settings.min_sharpness:
        return quality, RejectReason.BLURRED, f"sharpness {sharp:.1f} < {settings.min_sharpness:.1f}"
    return quality, None, ""


def _ramp(value: float, low: float, high: float) -> float:
    """0 at low, 1 at high, linear between."""
    return min(1.0, max(0.0, (value - low) / (high - low)))


_MIN_PREVIEW_FACE_PX = 8


def preview_sharpness(preview_grey: np.ndarray, face: Box | None, scale: int) -> float:
    """Variance of the Laplacian of a reduced grey frame, where the face was last seen.

    Ranks the frames of a rate-limited stream by focus and motion blur before any of
    them is analysed. ``face`` is in full-frame pixels and ``scale`` the preview's
    reduction; without a face (or with one too small to measure) the whole frame counts.
    """
    region = preview_grey
    if face is not None:
        x0, y0 = max(0, int(face.x / scale)), max(0, int(face.y / scale))
        x1, y1 = int((face.x + face.width) / scale) + 1, int((face.y + face.height) / scale) + 1
        if min(x1 - x0, y1 - y0) >= _MIN_PREVIEW_FACE_PX and x0 < preview_grey.shape[1] and y0 < preview_grey.shape[0]:
            region = preview_grey[y0:y1, x0:x1]
    return float(cv2.Laplacian(region, cv2.CV_32F).var())
