"""Frontalization: the frame → crop similarity transform and the batched warps that apply it.

Method ("similarity-eyes-v1"). The crop is fixed by the two eye centres alone: a
similarity (rotation + uniform scale + translation) puts them level and at fixed
positions. A similarity changes no ratio of lengths and no angle, so nose width, jaw
width, chin height and brow position keep the subject's own proportions relative to
each other; only the overall size is normalised (by the inter-ocular distance). The
landmarks are never warped onto a mean shape: that would erase the features measured.

Layout. The positions are defined in units of a *canonical Haar box*: the median
relation between OpenCV's frontal Haar box and dlib's eye centres (measured on the
LFW images of shared/data: eye line 0.40 box heights below the top, eye centres 0.35
box widths apart, centred). The paper heightens the box to keep forehead and chin:
``box_height_expand`` of the box height is added, 40 % above and 60 % below (the chin
sits at ≈ 1.08 box heights, further down with a prognathic jaw). The crop is the
square around that heightened box, so nothing is squashed. With the default
expansion 0.4 and 160 px the eyes land at (60, 64) and (100, 64).

Eye centre = midpoint of the eye's two corners, for 5 points (dlib's 5-point model
marks only corners) and for 68 points (corners 36/39 and 42/45), so both models
put the eyes within ≈ 2 % of the inter-ocular distance of each other (LFW median).

Limits. In-plane rotation (roll) is removed exactly. Out-of-plane rotation is not:
with yaw the inter-ocular distance shrinks by cos(yaw), so the face is shown
slightly larger and turned; the quality gate rejects large yaw (and, with 68 points,
pitch) instead. With 68 points, "frontal-3d-v1" (frontal3d.py) also undoes yaw
with a generic 3-D face surface (pitch is kept on purpose), keeping this module's
eye-based scale and placement. A first-order planar correction from the 68-point pose (vertical
scale × cos(yaw)/cos(pitch)) was measured on the clips in shared/data (yaw within
±12°): the spread of eye-to-mouth over inter-ocular distance across frames did not
shrink (coefficient of variation 0.053→0.048, 0.053→0.054, 0.079→0.083, 0.061→0.062,
0.034→0.033), so it is not applied; a 3D-reference warp would need a 3D face model
this project did not have then (frontal3d.py now builds one). The nose is not used in the transform: a least-squares fit through
eyes and nose would tilt the eye line under yaw and normalise away the eye-to-nose
length. The scale is only as independent of the lower face as dlib's eye corners
are: widening nose, mouth and jaw by 20 % moved the fitted eyes 1–4 % apart, so a
jaw measured +16 % wider in the frame shows +10 % wider in the crop (see
tests/unit/test_preprocess_geometry.py).

The "box" alignment (no landmarks) is the paper's plain crop: the heightened
detector box, widened to a square, scaled to the input size.

Warping. Downscaling with bilinear sampling aliases, so a face more than twice the
crop size is first block-averaged by an integer factor (grid-aligned, identical on
CPU and GPU) and then sampled bilinearly; borders replicate the edge pixels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import cv2
import numpy as np

from .types import Box

if TYPE_CHECKING:
    import torch

CANONICAL_EYE_LINE = 0.40  # eye centres below the canonical box top, in box heights
CANONICAL_EYE_DISTANCE = 0.35  # between the eye centres, in box widths
EXPAND_ABOVE_SHARE = 0.4  # share of the added height that goes above the box

SIMILARITY_EYES_V1 = "similarity-eyes-v1"
FRONTAL_3D_V1 = "frontal-3d-v1"  # 68 points: also undoes yaw (frontal3d.py)
BOX_ALIGNMENT = "box"
ALIGNMENTS = (SIMILARITY_EYES_V1, FRONTAL_3D_V1, BOX_ALIGNMENT)


@dataclass(frozen=True, slots=True, kw_only=True)
class CropGeometry:
    """Everything the crop's geometry depends on; a model card carries these fields."""

    input_size: int = 160
    box_height_expand: float = 0.4
    alignment: str = SIMILARITY_EYES_V1

    def __post_init__(self) -> None:
        if self.alignment not in ALIGNMENTS:
            raise ValueError(f"unknown alignment {self.alignment!r}; known: {', '.join(ALIGNMENTS)}")
        if self.input_size <= 0 or self.box_height_expand < 0:
            raise ValueError(f"bad crop geometry: size {self.input_size}, expand {self.box_height_expand}")

    @property
    def eye_positions(self) -> tuple[tuple[float, float], tuple[float, float]]:
        """Where the image-left and image-right eye centres land in the crop (pixels)."""
        side = 1.0 + self.box_height_expand
        y = self.input_size * (CANONICAL_EYE_LINE + EXPAND_ABOVE_SHARE * self.box_height_expand) / side
        half = self.input_size * CANONICAL_EYE_DISTANCE / (2.0 * side)
        centre = self.input_size / 2.0
        return (centre - half, y), (centre + half, y)

    def affine_from_eyes(self, left_eye: np.ndarray, right_eye: np.ndarray) -> np.ndarray:
        """2×3 similarity mapping the image-left/right eye centres onto eye_positions."""
        (lx, ly), (rx, ry) = self.eye_positions
        src = complex(*(right_eye - left_eye))
        if abs(src) < 1e-6:
            raise ValueError("eye centres coincide")
        a = complex(rx - lx, ry - ly) / src
        t = complex(lx, ly) - a * complex(*left_eye)
        return np.array([[a.real, -a.imag, t.real], [a.imag, a.real, t.imag]], dtype=np.float64)

    def affine_from_box(self, box: Box) -> np.ndarray:
        """2×3 scale+translation of the heightened box, widened to a square, onto the crop."""
        height = box.height * (1.0 + self.box_height_expand)
        top = box.y - EXPAND_ABOVE_SHARE * self.box_height_expand * box.height
        side = max(height, box.width)
        cx = box.x + box.width / 2.0
        s = self.input_size / side
        left, top = cx - side / 2.0, top - (side - height) / 2.0
        # pixel centres: the crop pixel i covers source [left + i/s, left + (i+1)/s)
        return np.array([[s, 0.0, -s * left - 0.5 + 0.5 * s], [0.0, s, -s * top - 0.5 + 0.5 * s]])

    def affine(self, landmarks: np.ndarray | None, box: Box) -> np.ndarray:
        """The frame → crop transform for this alignment."""
        if self.alignment == BOX_ALIGNMENT:
            return self.affine_from_box(box)
        if landmarks is None:
            raise ValueError(f"alignment {self.alignment} needs landmarks")
        left, right = eye_centres(landmarks)
        return self.affine_from_eyes(left, right)


def eye_centres(landmarks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Image-left and image-right eye centres (corner midpoints) from 5 or 68 dlib points."""
    pts = np.asarray(landmarks, dtype=np.float64)
    if len(pts) == 5:  # dlib 5-point: 0/1 image-right eye corners, 2/3 image-left, 4 nose base
        return (pts[2] + pts[3]) / 2.0, (pts[0] + pts[1]) / 2.0
    if len(pts) == 68:
        return (pts[36] + pts[39]) / 2.0, (pts[42] + pts[45]) / 2.0
    raise ValueError(f"expected 5 or 68 landmarks, got {len(pts)}")


def nose_base(landmarks: np.ndarray) -> np.ndarray:
    """The nose's lower centre (dlib 5-point index 4 ≈ 68-point index 33)."""
    pts = np.asarray(landmarks, dtype=np.float64)
    return pts[4] if len(pts) == 5 else pts[33]


def transform_points(affine: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a 2×3 affine to (N, 2) points."""
    pts = np.asarray(points, dtype=np.float64)
    return pts @ affine[:, :2].T + affine[:, 2]


def affine_scale(affine: np.ndarray) -> float:
    """Crop pixels per frame pixel (the similarity's uniform scale)."""
    return math.sqrt(abs(float(np.linalg.det(affine[:, :2]))))


def prefilter_factor(affine: np.ndarray) -> int:
    """Integer block-average factor that keeps the remaining bilinear step at scale > 1/2."""
    return max(1, math.floor(1.0 / max(affine_scale(affine), 1e-6)))


def _reduced_affine(affine: np.ndarray, factor: int, x0: int, y0: int) -> np.ndarray:
    """The affine for an image block-averaged by ``factor`` from origin (x0, y0)."""
    centre = np.array([x0 + (factor - 1) / 2.0, y0 + (factor - 1) / 2.0])
    reduced = affine.copy()
    reduced[:, :2] = affine[:, :2] * factor
    reduced[:, 2] = affine[:, :2] @ centre + affine[:, 2]
    return reduced


def block_averaged(
    image: np.ndarray, factor: int, x_range: tuple[float, float], y_range: tuple[float, float]
) -> tuple[np.ndarray, int, int] | None:
    """The frame region spanning ``x_range`` × ``y_range`` (frame pixels, plus a margin), block-averaged
    by ``factor`` on the frame's grid of factor × factor blocks, and its origin (x0, y0): reduced
    pixel j covers frame [x0 + j·factor, x0 + (j+1)·factor). None when the region is empty."""
    height, width = image.shape[:2]
    margin = 2 * factor
    x0 = max(0, math.floor((x_range[0] - margin) / factor) * factor)
    y0 = max(0, math.floor((y_range[0] - margin) / factor) * factor)
    x1 = min(width // factor * factor, math.ceil((x_range[1] + margin) / factor) * factor)
    y1 = min(height // factor * factor, math.ceil((y_range[1] + margin) / factor) * factor)
    if x1 - x0 < factor or y1 - y0 < factor:
        return None
    roi = image[y0:y1, x0:x1]
    return cv2.resize(roi, ((x1 - x0) // factor, (y1 - y0) // factor), interpolation=cv2.INTER_AREA), x0, y0


def warp_face(image: np.ndarray, affine: np.ndarray, size: int) -> np.ndarray:
    """One crop of ``size``² from a frame (any channel order; the order is kept)."""
    affine = np.asarray(affine, dtype=np.float64)
    factor = prefilter_factor(affine)
    if factor > 1:
        inverse = cv2.invertAffineTransform(affine)
        corners = transform_points(inverse, np.array([[0, 0], [size, 0], [0, size], [size, size]]) - 0.5)
        reduced = block_averaged(
            image, factor, (corners[:, 0].min(), corners[:, 0].max()), (corners[:, 1].min(), corners[:, 1].max())
        )
        if reduced is not None:
            image, x0, y0 = reduced
            affine = _reduced_affine(affine, factor, x0, y0)
    return cv2.warpAffine(image, affine, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def warp_faces(images: Sequence[np.ndarray], affines: Sequence[np.ndarray] | np.ndarray, size: int = 160) -> np.ndarray:
    """Warp N faces at once on the CPU: N×size×size×C uint8 (frames may repeat)."""
    if len(images) != len(affines):
        raise ValueError(f"{len(images)} images but {len(affines)} affines")
    if len(images) == 0:
        return np.zeros((0, size, size, 3), dtype=np.uint8)
    return np.stack([warp_face(image, affine, size) for image, affine in zip(images, affines)])


def warp_faces_torch(frames: torch.Tensor, affines: torch.Tensor | np.ndarray, size: int = 160) -> torch.Tensor:
    """GPU path: (N, C, H, W) frames and N frame→crop affines → (N, C, size, size), same dtype.

    The same grid-aligned block average as the CPU path (avg_pool2d, grouped by
    factor), then one bilinear ``grid_sample`` with border padding.
    """
    import torch
    import torch.nn.functional as F

    n = frames.shape[0]
    affines = np.asarray(torch.as_tensor(affines).detach().cpu().numpy(), dtype=np.float64).reshape(n, 2, 3)
    compute = frames if frames.is_floating_point() else frames.float()
    factors = [prefilter_factor(a) for a in affines]
    out = torch.empty((n, compute.shape[1], size, size), dtype=compute.dtype, device=frames.device)
    for factor in sorted(set(factors)):
        index = [i for i, f in enumerate(factors) if f == factor]
        source = compute[index]
        if factor > 1:
            source = F.avg_pool2d(source, factor, stride=factor)
        src_h, src_w = source.shape[-2:]
        thetas = []
        for i in index:
            reduced = _reduced_affine(affines[i], factor, 0, 0) if factor > 1 else affines[i]
            inverse = cv2.invertAffineTransform(reduced)
            thetas.append(_normalised_theta(inverse, size, src_w, src_h))
        theta = torch.as_tensor(np.stack(thetas), dtype=compute.dtype, device=frames.device)
        grid = F.affine_grid(theta, [len(index), compute.shape[1], size, size], align_corners=False)
        out[index] = F.grid_sample(source, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if not frames.is_floating_point():
        out = out.round().clamp(0, 255).to(frames.dtype)
    return out


def _normalised_theta(inverse: np.ndarray, size: int, src_w: int, src_h: int) -> np.ndarray:
    """Crop-pixel → frame-pixel affine rewritten in grid_sample's [-1, 1] coordinates."""
    to_pixels = np.array([[size / 2.0, 0.0, size / 2.0 - 0.5], [0.0, size / 2.0, size / 2.0 - 0.5], [0, 0, 1]])
    to_norm = np.array([[2.0 / src_w, 0.0, 1.0 / src_w - 1.0], [0.0, 2.0 / src_h, 1.0 / src_h - 1.0], [0, 0, 1]])
    full = np.vstack([inverse, [0.0, 0.0, 1.0]])
    return (to_norm @ full @ to_pixels)[:2]
