"""The severity model on crops aligned by the landmark CNN of `landmark_cnn_probe.py` instead of dlib.

The probe measures how far the CNN's points lie from dlib's; this asks what that costs where it
counts: the holdout phantom clips (`holdout_clips.py`, the #4 figure) screened through a server in
this process whose 5-point fit is the CNN (the phantoms' own 68-point fit stays dlib's). The CNN
sees what the server's fit would: a 64×64 grey patch of 1.6 box sides, the server's box (in the Haar
cascade's convention) turned back into the HOG box convention the CNN learnt on.

    .venv/bin/python scripts/landmark_cnn_probe.py --save /tmp/landmarks.pt
    .venv/bin/python scripts/landmark_cnn_serving_check.py /tmp/landmarks.pt [holdout_clips.py options]

A research check only: the server does not use the CNN.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import cv2
import numpy as np
import torch

from acroscreen.server.runtime import landmarks
from acroscreen.server.runtime.detect import HOG_TO_HAAR_RAISE, HOG_TO_HAAR_WIDTH
from acroscreen.server.runtime.types import Box

SCRIPTS = Path(__file__).resolve().parent
sys.path.insert(0, str(SCRIPTS))
from landmark_cnn_probe import SIDE, as_input, as_patch, landmark_net, large_patch  # noqa: E402


def cnn_fit(net: torch.nn.Module, image: np.ndarray, box: Box) -> np.ndarray:
    """Five points in frame coordinates, from the patch the probe's training patches were cut like."""
    hog_width = box.width / HOG_TO_HAAR_WIDTH
    cx, cy = box.center
    hog_box = Box(cx - hog_width / 2, cy + HOG_TO_HAAR_RAISE * hog_width - hog_width / 2, hog_width, hog_width)
    large, affine = large_patch(image, hog_box)
    with torch.no_grad():
        points = net(as_input(as_patch(large)[None])).numpy().reshape(5, 2) * SIDE
    back = cv2.invertAffineTransform(affine)
    return (points @ back[:, :2].T + back[:, 2]).astype(np.float32)


def main() -> None:
    weights, *clip_args = sys.argv[1:]
    net = landmark_net()
    net.load_state_dict(torch.load(weights, weights_only=True))
    net.eval()
    dlib_fit = landmarks.LandmarkFitter.fit

    def fit(self: landmarks.LandmarkFitter, image: np.ndarray, box: Box) -> np.ndarray:
        return cnn_fit(net, image, box) if self.points == 5 else dlib_fit(self, image, box)

    landmarks.LandmarkFitter.fit = fit  # type: ignore[method-assign]
    sys.argv = [str(SCRIPTS / "holdout_clips.py"), *clip_args]
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
