"""Head pose (yaw, pitch, roll in degrees) from dlib landmarks.

Conventions (image seen as displayed, y down): roll > 0 when the eye line descends
from image-left to image-right (clockwise tilt); yaw > 0 when the nose turns towards
the image right; pitch > 0 when the face looks down.

68 points: ``cv2.solvePnP`` of rigid points (eye corners, nose, mouth corners, chin)
against a generic adult face (millimetres: the median frontal dlib shape of LFW, with
rounded anthropometric depths), with a
pinhole camera whose focal length is the frame's longer side, solved with SQPnP (the
iterative solver can converge to a mirror pose behind the camera). Expression and the
individual face shape limit accuracy to a few degrees.

5 points: roll is exact (the eye line). Yaw and pitch are estimates from the nose
base relative to the eye midpoint in the de-rolled frame, in inter-ocular units,
using the same generic face (nose base 0.46 IOD in front of the eye centres and
0.77 IOD below them, weak perspective). A subject's own nose length shifts pitch by
several degrees, so pitch from 5 points is coarse. Over the 648 identity photos of
shared/data that the 5-point gate accepts, the 5-point values differ from 68-point
solvePnP on the same detector box by a median 2.5° (yaw) and 4.4° (pitch)
(tests/unit/test_preprocess_pose.py, marked slow, measures it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from .frontalize import eye_centres, nose_base
from .types import HeadPose

# Generic face in camera-aligned axes (x right, y down, z away from the camera), mm,
# origin between the eye centres. Indices are dlib's 68-point scheme. x and y are the
# median frontal dlib shape of the LFW images in shared/data (inter-ocular 61 mm);
# depths are rounded adult anthropometric means.
_MODEL_68 = {
    36: (-42.3, -0.5, 18.0),
    39: (-18.8, 0.5, 0.0),
    42: (18.8, 0.5, 0.0),
    45: (42.3, -0.5, 18.0),
    27: (0.0, -3.0, -8.0),
    30: (0.0, 34.0, -30.0),
    33: (0.0, 47.0, -14.0),
    31: (-14.4, 41.7, -6.0),
    35: (14.4, 41.7, -6.0),
    48: (-28.0, 64.5, 0.0),
    54: (28.0, 64.5, 0.0),
    8: (0.0, 116.0, -2.0),
}
_IDS_68 = sorted(_MODEL_68)
_POINTS_68 = np.array([_MODEL_68[i] for i in _IDS_68], dtype=np.float64)

# The same generic face seen by the 5-point model (eye centres = corner midpoints).
_IOD = 61.0
# Depth: the model's 23 mm gave 5-point yaw 1.22× the 68-point solvePnP yaw on
# shared/data; 28 mm makes them agree (the nose tip and alae make the nose look deeper).
NOSE_DEPTH_IOD = 28.0 / _IOD  # nose base in front of the eye centres ≈ 0.46
NOSE_DROP_IOD = 47.0 / _IOD  # nose base below the eye centres ≈ 0.77


def estimate_pose(landmarks: np.ndarray, frame_size: tuple[int, int]) -> HeadPose:
    """Pose from 5 or 68 landmarks; frame_size is (width, height)."""
    if len(landmarks) == 68:
        return pose_from_68(landmarks, frame_size)
    return pose_from_5(landmarks)


def roll_deg(landmarks: np.ndarray) -> float:
    """In-plane angle of the eye line (exact for any landmark scheme)."""
    left, right = eye_centres(landmarks)
    dx, dy = right - left
    return math.degrees(math.atan2(dy, dx))


def pose_from_5(landmarks: np.ndarray) -> HeadPose:
    """Roll from the eye line; yaw and pitch estimated from the nose base (see module doc)."""
    left, right = eye_centres(landmarks)
    roll = math.atan2(*(right - left)[::-1])
    iod = float(np.linalg.norm(right - left))
    cos_r, sin_r = math.cos(-roll), math.sin(-roll)
    dx, dy = nose_base(landmarks) - (left + right) / 2.0
    ox = (cos_r * dx - sin_r * dy) / iod  # de-rolled, in projected IODs
    oy = (sin_r * dx + cos_r * dy) / iod
    # ox = d·sin(yaw) / cos(yaw) because the projected IOD shrinks by cos(yaw)
    yaw = math.atan2(ox, NOSE_DEPTH_IOD)
    # oy·cos(yaw) = v·cos(pitch) + d·sin(pitch) = R·sin(pitch + α)
    radius = math.hypot(NOSE_DROP_IOD, NOSE_DEPTH_IOD)
    alpha = math.atan2(NOSE_DROP_IOD, NOSE_DEPTH_IOD)
    pitch = math.asin(max(-1.0, min(1.0, oy * math.cos(yaw) / radius))) - alpha
    return HeadPose(yaw_deg=math.degrees(yaw), pitch_deg=math.degrees(pitch), roll_deg=math.degrees(roll))


@dataclass(frozen=True, slots=True)
class HeadPoseFit:
    """The rigid fit of the generic face: model point P (mm) → frame pixel camera·(rotation·P + translation)."""

    rotation: np.ndarray  # 3×3
    translation: np.ndarray  # 3, mm
    camera: np.ndarray  # 3×3 pinhole intrinsics


def fit_head_pose_68(landmarks: np.ndarray, frame_size: tuple[int, int]) -> HeadPoseFit | None:
    """solvePnP (SQPnP) of the rigid 68-point subset against the generic face; None if it fails."""
    width, height = frame_size
    focal = float(max(width, height))
    camera = np.array([[focal, 0.0, width / 2.0], [0.0, focal, height / 2.0], [0.0, 0.0, 1.0]])
    image_points = np.asarray(landmarks, dtype=np.float64)[_IDS_68]
    ok, rvec, tvec = cv2.solvePnP(_POINTS_68, image_points, camera, None, flags=cv2.SOLVEPNP_SQPNP)
    if not ok:
        return None
    rotation, _ = cv2.Rodrigues(rvec)
    return HeadPoseFit(rotation=rotation, translation=tvec.reshape(3), camera=camera)


def fit_weak_perspective_68(landmarks: np.ndarray) -> HeadPoseFit:
    """Least-squares scaled-orthographic fit of the generic face (rotation, scale, image shift).

    Needs no focal length or principal point, which a frame cut from a larger picture does not
    have. Returned as a pinhole fit whose camera is so far away (1 km) that it is orthographic
    to within 10⁻⁴ over a face's depth.
    """
    image_points = np.asarray(landmarks, dtype=np.float64)[_IDS_68]
    model_centre, image_centre = _POINTS_68.mean(axis=0), image_points.mean(axis=0)
    model, image = _POINTS_68 - model_centre, image_points - image_centre
    affine = np.linalg.lstsq(model, image, rcond=None)[0].T  # 2×3: image ≈ affine · model
    u, singular, vt = np.linalg.svd(affine, full_matrices=False)
    rows = u @ vt  # the nearest two orthonormal rows
    rotation = np.vstack([rows, np.cross(rows[0], rows[1])])
    scale = float(singular.mean())
    distance = 1e6
    focal = scale * distance
    translation = np.array([*(image_centre / scale - rows @ model_centre), distance])
    camera = np.array([[focal, 0.0, 0.0], [0.0, focal, 0.0], [0.0, 0.0, 1.0]])
    return HeadPoseFit(rotation=rotation, translation=translation, camera=camera)


def pose_from_68(landmarks: np.ndarray, frame_size: tuple[int, int]) -> HeadPose:
    """solvePnP against the generic face; Euler angles of R = Rz(roll)·Ry(yaw)·Rx(pitch)."""
    fit = fit_head_pose_68(landmarks, frame_size)
    if fit is None:
        return pose_from_5_of_68(landmarks)
    rotation = fit.rotation
    yaw = math.asin(max(-1.0, min(1.0, -rotation[2, 0])))
    roll = math.atan2(rotation[1, 0], rotation[0, 0])
    pitch = math.atan2(rotation[2, 1], rotation[2, 2])
    # Ry(+) turns the nose (−z) towards image-left; report nose-right as positive yaw.
    # Rx(+) turns the nose down in the image: looking down is positive pitch.
    return HeadPose(yaw_deg=-math.degrees(yaw), pitch_deg=math.degrees(pitch), roll_deg=math.degrees(roll))


def pose_from_5_of_68(landmarks: np.ndarray) -> HeadPose:
    """The 5-point estimate computed from the equivalent 68-point indices."""
    pts = np.asarray(landmarks, dtype=np.float64)
    return pose_from_5(np.stack([pts[45], pts[42], pts[36], pts[39], pts[33]]))
