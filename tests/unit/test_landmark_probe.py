"""scripts/landmark_cnn_probe.py is a research probe, not served; these checks keep its parts honest."""

import importlib.util
from pathlib import Path

import cv2
import numpy as np
import pytest
from acroscreen.server.runtime.landmarks import LandmarkFitter

ROOT = Path(__file__).resolve().parents[2]
PORTRAIT = ROOT / "server" / "demo" / "eileen_collins_nasa.jpg"


@pytest.fixture(scope="module")
def probe():
    spec = importlib.util.spec_from_file_location("landmark_cnn_probe", ROOT / "scripts" / "landmark_cnn_probe.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_patch_carries_dlibs_points_that_map_back_to_the_frame(probe) -> None:
    image = cv2.imread(str(PORTRAIT))
    patches = probe.Patches()
    box = patches.largest_face(image)
    assert box is not None
    patch, points, affine = patches.cut(image, box)
    assert patch.shape == (probe.SIDE, probe.SIDE) and patch.dtype == np.uint8
    assert points.shape == (5, 2) and (points > 0).all() and (points < 1).all()
    # Back in the frame, the points are dlib's own fit on the frame, to a fraction of the eye distance.
    back = cv2.invertAffineTransform(affine)
    in_frame = (points * probe.SIDE) @ back[:, :2].T + back[:, 2]
    direct = LandmarkFitter(5).fit(image, box)
    assert probe.eye_error(in_frame[None], direct[None])[0] < 0.05
    assert probe.landmark_net()(probe.as_input(patch[None])).shape == (1, 10)


def test_eye_error_is_in_interocular_distances(probe) -> None:
    points = np.array([[[0, 0], [2, 0], [8, 0], [10, 0], [5, 5]]], dtype=np.float32)  # eyes at x 1 and 9: 8 apart
    assert probe.eye_error(points, points)[0] == 0.0
    assert probe.eye_error(points + np.float32([0.8, 0]), points)[0] == pytest.approx(0.1)
