"""Out-of-plane frontalization with 68 landmarks (alignment "frontal-3d-v1").

Method, in the spirit of Hassner et al. 2015 ("Effective face frontalization in
unconstrained images"): the head's rotation is fitted to the 68 landmarks against the
generic face of ``pose.py`` (a least-squares scaled-orthographic fit: rotation, one scale
and an image shift, so no proportion of the subject can be fitted away; weak perspective
because a frame's focal length and principal point are unknown, and a guessed perspective
bent the fit on LFW's cut-out photographs). A smooth generic face surface (below) gives
every point of the face a depth. Each crop pixel is a point of a frontal view of that
surface; it is rotated with the fitted pose into the frame and sampled there
(``cv2.remap``): the frame's texture is laid on the generic surface and seen from the front.

What is undone. Yaw, fully. Pitch is *kept*: the crop shows the head at the frame's own
pitch. Pitch from a generic face is confounded with the subject's vertical proportions
(nose length and projection, chin height: what acromegaly changes); on shared/data the
fitted pitch of the frontal NASA portrait is 21°, so "correcting" it would stretch exactly
the features measured. Yaw is read from left-right asymmetry, which a face's own
proportions do not mimic. Roll is removed by the eye similarity, as before.

Proportions. Scale and placement come from the subject's own eye centres, as in
"similarity-eyes-v1": the eyes are mapped into the frontal view and a similarity puts them
level at the fixed crop positions, so the crop is normalised by the inter-ocular distance
alone. The landmarks are never moved onto a mean shape: a wider nose or jaw stays wider
(tests/unit/test_preprocess_frontal3d.py widens them by 20 % and finds 15 %, 13 %; the
eye similarity finds 11 %, 10 %, limited by re-fitting dlib's points on the crop). For a
frontal face the warp equals the similarity.

Soft symmetry. A part of the face that the pose turns away from the camera is seen at a
grazing angle; where its surface is seen at less than 0.6 of its mirror side's visibility
(the cosine between the surface normal and the view ray), the mirrored side's pixels are
blended in, in proportion. On a frontal face both sides are equally visible and nothing
is mirrored.

Measured (shared/data, every 4th photo of the first 100 identities, this repo's tests):
the nose tip's sideways offset from the eye midpoint, which follows yaw in the similarity
crop (correlation 0.97; 0.23 inter-ocular distances at |yaw| > 10°), is 0.04 after the
correction (correlation 0.16). Cost ≈ 4 ms a face on one core of a 2-core EPYC VM (the
maps are built on an 80 × 80 grid and upsampled), on top of the 68-point fit.

Limits. One generic surface for every head: a subject whose nose or cheeks are much
deeper than the generic ones is corrected by slightly the wrong amount (a 5 mm depth
error at 15° yaw shifts a point by ≈ 1.3 mm, 2 % of the inter-ocular distance).
Self-occlusion by the nose is not modelled (normals only, no depth buffer); the quality
gate's pose limits keep yaw where that matters little. Hair, ears and background are not
on the surface: the correction fades out beyond the face (an ellipse around the generic
face) and the crop follows the plain similarity there, so the crop has no seams. The GPU
batch warp (``frontalize.warp_faces_torch``) takes affines only; these dense maps would go
to ``grid_sample`` as they are, when a GPU path needs them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from .frontalize import FRONTAL_3D_V1, CropGeometry, block_averaged, eye_centres, prefilter_factor
from .pose import HeadPoseFit, fit_weak_perspective_68

# Generic face surface, millimetres, axes of pose.py's model (x right, y down, z away from
# the camera, origin between the eye centres): a cylinder-like cheek curve, a forehead and
# chin that slope back, and a nose ridge. Fitted to the 12 points of pose.py's generic face
# (RMS 0.6 mm).
_CHEEK_RADIUS = 80.0
_CHEEK_DEPTH = 132.5
_SLOPE_CENTRE_Y = 60.0
_SLOPE_RADIUS = 80.0
_SLOPE_DEPTH = 10.1
_NOSE_HEIGHT = 32.7
_NOSE_SIGMA = (6.0, 14.0)
_NOSE_CENTRE_Y = 22.0
_DEPTH_OFFSET = -8.1
_MAX_CHEEK_SLOPE = 0.95  # (x / radius)² is clamped here: the side of the head stays finite

# Where the correction applies: full inside 0.8 of this ellipse, none beyond 1.1 of it.
_FACE_CENTRE_Y = 45.0
_FACE_SEMI_AXES = (72.0, 100.0)
_FULL_INSIDE, _NONE_BEYOND = 0.8, 1.1
# A side is mirrored in when it is seen at less than this share of its mirror side's visibility.
_MIRROR_BELOW = 0.6

GENERIC_EYE_DISTANCE_MM = 61.1  # between pose.py's generic eye centres (corner midpoints)


def surface_depth(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Depth of the generic face surface at frontal-plane points (mm)."""
    return _surface(x, y)[0]


def _surface(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Depth and its x and y derivatives."""
    u = (x / _CHEEK_RADIUS) ** 2
    root = np.sqrt(1.0 - np.minimum(u, _MAX_CHEEK_SLOPE))
    cheek_dx = np.where(u < _MAX_CHEEK_SLOPE, x / (_CHEEK_RADIUS**2 * root), 0.0)
    sx, sy = _NOSE_SIGMA
    nose = np.exp(-(x**2) / (2 * sx**2) - (y - _NOSE_CENTRE_Y) ** 2 / (2 * sy**2))
    depth = (_CHEEK_DEPTH * (1.0 - root) + _SLOPE_DEPTH * ((y - _SLOPE_CENTRE_Y) / _SLOPE_RADIUS) ** 2
             - _NOSE_HEIGHT * nose + _DEPTH_OFFSET)
    depth_dx = _CHEEK_DEPTH * cheek_dx + _NOSE_HEIGHT * nose * x / sx**2
    depth_dy = 2.0 * _SLOPE_DEPTH * (y - _SLOPE_CENTRE_Y) / _SLOPE_RADIUS**2 + _NOSE_HEIGHT * nose * (y - _NOSE_CENTRE_Y) / sy**2
    return depth, depth_dx, depth_dy


def _correction_weight(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    ax, ay = _FACE_SEMI_AXES
    r = np.sqrt((x / ax) ** 2 + ((y - _FACE_CENTRE_Y) / ay) ** 2)
    t = np.clip((_NONE_BEYOND - r) / (_NONE_BEYOND - _FULL_INSIDE), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)  # smoothstep: no visible seam


@dataclass(frozen=True, slots=True)
class FrontalView:
    """Crop pixels ↔ points of the generic surface ↔ frame pixels, for one fitted face.

    Crop pixels map by a similarity to the *view plane* (u, v) in mm: the generic head
    turned by the fitted pitch only (no yaw, no roll), seen orthographically from the
    front, u = x and v = y·cos p − depth·sin p. So the crop keeps the frame's pitch and
    loses only the yaw.
    """

    fit: HeadPoseFit
    pitch_cos: float
    pitch_sin: float
    similarity: np.ndarray  # 2×3 frame → crop ("similarity-eyes-v1")
    plane_to_crop: np.ndarray  # 2×3 view plane (mm) → crop pixels

    def crop_to_surface(self, crop_points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The surface point (x, y) each crop point shows (fixed-point iteration on y, a
        contraction for the pitch the quality gate lets through)."""
        crop_to_plane = cv2.invertAffineTransform(self.plane_to_crop)
        plane = crop_points @ crop_to_plane[:, :2].T + crop_to_plane[:, 2]
        x, v = plane[..., 0], plane[..., 1]
        y = v / self.pitch_cos
        for _ in range(6):
            y = (v + surface_depth(x, y) * self.pitch_sin) / self.pitch_cos
        return x, y

    def crop_to_frame(self, crop_points: np.ndarray, surface: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
        """Frame pixel sampled for crop points: the 3-D projection inside the face, fading to the similarity."""
        x, y = self.crop_to_surface(crop_points) if surface is None else surface
        crop_to_frame = cv2.invertAffineTransform(self.similarity)
        flat = crop_points @ crop_to_frame[:, :2].T + crop_to_frame[:, 2]
        return flat + _correction_weight(x, y)[..., None] * (_project(self.fit, x, y) - flat)

    def mirrored(self, crop_points: np.ndarray) -> np.ndarray:
        """Crop points mirrored across the face's midline (u → −u; it shows surface point (−x, y))."""
        crop_to_plane = cv2.invertAffineTransform(self.plane_to_crop)
        plane = crop_points @ crop_to_plane[:, :2].T + crop_to_plane[:, 2]
        plane[..., 0] *= -1.0
        return plane @ self.plane_to_crop[:, :2].T + self.plane_to_crop[:, 2]


@dataclass(frozen=True, slots=True)
class FrontalWarp:
    """The crop → frame sampling maps of one face."""

    map_x: np.ndarray  # size × size float32, frame x sampled for each crop pixel
    map_y: np.ndarray
    mirror_x: np.ndarray  # the same for the pixel's mirror image across the face's midline
    mirror_y: np.ndarray
    own_share: np.ndarray  # size × size float32 in [0, 1]: 1 = own pixel, 0 = mirrored pixel
    similarity: np.ndarray  # 2×3 frame → crop of "similarity-eyes-v1" (for tracking and scale)
    view: FrontalView

    def apply(self, image: np.ndarray) -> np.ndarray:
        """The frontalized crop (same dtype and channel order as the frame)."""
        image, offset, factor = _prefiltered(image, self.similarity, self.map_x, self.map_y)

        def sample(mx: np.ndarray, my: np.ndarray) -> np.ndarray:
            return cv2.remap(image, (mx - offset[0]) / factor, (my - offset[1]) / factor,
                             cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)

        own = sample(self.map_x, self.map_y)
        if float(self.own_share.min()) >= 1.0:
            return own
        mirrored = sample(self.mirror_x, self.mirror_y)
        share = self.own_share if own.ndim == 2 else self.own_share[..., None]
        blended = own.astype(np.float32) * share + mirrored.astype(np.float32) * (1.0 - share)
        if np.issubdtype(image.dtype, np.integer):
            return np.clip(np.rint(blended), 0, 255).astype(image.dtype)
        return blended.astype(image.dtype)


def frontal_warp(landmarks: np.ndarray, geometry: CropGeometry) -> FrontalWarp:
    """The frontalizing maps for one face from its 68 landmarks."""
    points = np.asarray(landmarks, dtype=np.float64)
    if len(points) != 68:
        raise ValueError(f"{FRONTAL_3D_V1} needs 68 landmarks, got {len(points)}")
    left_eye, right_eye = eye_centres(points)
    similarity = geometry.affine_from_eyes(left_eye, right_eye)
    fit = fit_weak_perspective_68(points)
    size = geometry.input_size
    # The maps are smooth at the scale of two crop pixels: computed on a half-resolution grid
    # (whose samples sit where cv2.resize's bilinear upsampling expects them), then upsampled.
    grid = _half_resolution_grid(size)

    def full(values: np.ndarray) -> np.ndarray:
        return cv2.resize(values.astype(np.float32), (size, size), interpolation=cv2.INTER_LINEAR)

    # Yaw is undone; pitch is kept (see the module docstring).
    pitch = math.atan2(fit.rotation[2, 1], fit.rotation[2, 2])
    cos_p, sin_p = math.cos(pitch), math.sin(pitch)
    # The subject's own eyes in the view plane (u = x, v = y·cos p − depth·sin p); the view plane →
    # crop similarity puts them where "similarity-eyes-v1" puts them.
    half_eyes = GENERIC_EYE_DISTANCE_MM / 2
    plane_eyes = []
    for eye, side in ((left_eye, -1.0), (right_eye, 1.0)):
        x, y = _surface_point(fit, eye, np.array([side * half_eyes, 0.0]))
        plane_eyes.append(np.array([x[0], y[0] * cos_p - surface_depth(x, y)[0] * sin_p]))
    view = FrontalView(fit, cos_p, sin_p, similarity, geometry.affine_from_eyes(*plane_eyes))

    x, y = view.crop_to_surface(grid)
    own = view.crop_to_frame(grid, (x, y))
    mirror = view.crop_to_frame(view.mirrored(grid), (-x, y))
    ratio = _visibility(fit, x, y) / np.maximum(_visibility(fit, -x, y), 1e-6)
    own_share = 1.0 - (1.0 - np.clip(ratio / _MIRROR_BELOW, 0.0, 1.0)) * _correction_weight(x, y)
    return FrontalWarp(
        full(own[..., 0]), full(own[..., 1]), full(mirror[..., 0]), full(mirror[..., 1]),
        full(own_share), similarity, view,
    )


def _half_resolution_grid(size: int) -> np.ndarray:
    """Crop coordinates of a (size/2)² grid: sample k sits at crop pixel 2k + 0.5."""
    half = (size + 1) // 2
    ys, xs = np.mgrid[0:half, 0:half].astype(np.float64) * (size / half) + (size / half - 1) / 2.0
    return np.stack([xs, ys], axis=-1)


def _project(fit: HeadPoseFit, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Surface points, seen by the fitted camera → frame pixels."""
    surface = np.stack([x, y, surface_depth(x, y)], axis=-1)
    camera = surface @ fit.rotation.T + fit.translation
    projected = camera @ fit.camera.T
    return projected[..., :2] / projected[..., 2:3]


def _surface_point(fit: HeadPoseFit, frame_point: np.ndarray, start: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The surface point (x, y) the fitted camera sees at ``frame_point`` (Newton from ``start``)."""
    guess = start.astype(np.float64)
    for _ in range(10):
        at = _project(fit, guess[0:1], guess[1:2])[0]
        step = 1e-3
        dx = (_project(fit, guess[0:1] + step, guess[1:2])[0] - at) / step
        dy = (_project(fit, guess[0:1], guess[1:2] + step)[0] - at) / step
        delta = np.linalg.solve(np.stack([dx, dy], axis=1), frame_point - at)
        guess = guess + delta
        if float(np.abs(delta).max()) < 1e-4:
            break
    return guess[0:1], guess[1:2]


def _visibility(fit: HeadPoseFit, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Cosine between the surface normal and the ray to the camera (0 when turned away)."""
    depth, depth_dx, depth_dy = _surface(x, y)
    normal = np.stack([depth_dx, depth_dy, -np.ones_like(x)], axis=-1)  # towards the camera (−z)
    normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
    point = np.stack([x, y, depth], axis=-1) @ fit.rotation.T + fit.translation
    to_camera = -point / np.linalg.norm(point, axis=-1, keepdims=True)
    return np.maximum(0.0, np.sum((normal @ fit.rotation.T) * to_camera, axis=-1))


def _prefiltered(
    image: np.ndarray, similarity: np.ndarray, map_x: np.ndarray, map_y: np.ndarray
) -> tuple[np.ndarray, tuple[float, float], int]:
    """Block-average a face much larger than the crop first (as frontalize.warp_face does).

    Returns the image to sample, and the frame coordinates' origin and factor in it.
    """
    factor = prefilter_factor(similarity)
    reduced = None if factor == 1 else block_averaged(
        image, factor, (float(map_x.min()), float(map_x.max())), (float(map_y.min()), float(map_y.max()))
    )
    if reduced is None:
        return image, (0.0, 0.0), 1
    image, x0, y0 = reduced
    # reduced pixel j covers frame [x0 + j·f, x0 + (j+1)·f): its centre is x0 + j·f + (f − 1)/2
    return image, (x0 + (factor - 1) / 2.0, y0 + (factor - 1) / 2.0), factor
