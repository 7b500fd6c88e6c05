"""Can a small CNN, batched on the GPU beside the model, stand in for dlib's 5-point fit?

dlib's fit is the largest single CPU cost of a frame (~1.3 ms in a server worker, holding the
GIL), so it is one of the two stages the GPU target of issue #5 needs off the CPU. This probe
distils dlib into a 46-MFLOP CNN and measures how far the two disagree, on data the CNN never saw:

1. Patches: 1.6 face-box sides around a HOG box of each photograph of the **train** identities
   (faces/SPLIT.md), 40 jittered copies each (box ±10 % size, ±8 % shift, ±12° roll, half of them
   mirrored), 64×64 grey; the label is dlib's 5-point fit on the same patch at 4× size.
2. Training: direct regression (L1), AdamW, one-cycle schedule; ~45 s an epoch on a 2-core CPU.
3. Evaluation: the holdout identities' photographs (6 jittered patches each) and the first 150
   frames of each real video (a HOG box per frame, no jitter): the eye centres' distance from
   dlib's, over the interocular distance (IOD), and the frame-to-frame jitter of both (the mean
   second difference of the eye centres in frame pixels, over the IOD).

    .venv/bin/python scripts/landmark_cnn_probe.py [--epochs 18] [--out report.json] [--save net.pt]

`landmark_cnn_serving_check.py` then screens the holdout phantom clips with the saved network in
place of dlib's fit.

A feasibility check only: nothing in the server uses this network.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

import av
import cv2
import dlib
import numpy as np
import torch
from torch import nn

from acroscreen.server.runtime.landmarks import LandmarkFitter
from acroscreen.server.runtime.types import Box
from acroscreen.server.training.phantom import holdout_identities

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SIDE = 64  # the CNN's input, pixels
SPAN = 1.6  # box sides the patch covers (the server's fit patch for 5 points)
LABEL_SCALE = 4.0  # dlib fits on the patch at this size: its fit wants faces of ~100+ px


def landmark_net() -> nn.Sequential:
    def block(inputs: int, outputs: int, stride: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(inputs, outputs, 3, stride, 1, bias=False), nn.BatchNorm2d(outputs), nn.ReLU(inplace=True))

    return nn.Sequential(
        block(1, 24, 2), block(24, 24, 1), block(24, 48, 2), block(48, 48, 1), block(48, 96, 2), block(96, 96, 1),
        block(96, 128, 2), nn.Flatten(), nn.Linear(128 * 16, 128), nn.ReLU(inplace=True), nn.Linear(128, 10),
    )


class Patches:
    """Patches and dlib's labels (in patch units, 0..1) for boxes of frames."""

    def __init__(self) -> None:
        self._detector = dlib.get_frontal_face_detector()
        self._fitter = LandmarkFitter(5)

    def largest_face(self, image: np.ndarray) -> Box | None:
        found = self._detector(cv2.cvtColor(image, cv2.COLOR_BGR2GRAY), 1)
        best = max(found, key=lambda d: d.width(), default=None)
        return Box(best.left(), best.top(), best.width(), best.height()) if best is not None else None

    def cut(self, image: np.ndarray, box: Box, angle_deg: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(patch SIDE×SIDE uint8, dlib's 5 points in patch units, the frame → patch affine)."""
        large, affine = large_patch(image, box, angle_deg)
        width = SIDE / SPAN * LABEL_SCALE  # the box's side in the large patch
        centre = large.shape[0] / 2
        points = self._fitter.fit(large, Box(centre - width / 2, centre - width / 2, width, width)) / LABEL_SCALE
        return as_patch(large), (points / SIDE).astype(np.float32), affine


def large_patch(image: np.ndarray, box: Box, angle_deg: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """The grey patch of SPAN box sides around `box`, upright by `angle_deg`, at LABEL_SCALE × SIDE
    pixels (where dlib labels it), and the frame → SIDE-patch affine."""
    cx, cy = box.x + box.width / 2, box.y + box.height / 2
    affine = cv2.getRotationMatrix2D((cx, cy), angle_deg, SIDE / (SPAN * box.width))
    affine[:, 2] += (SIDE / 2 - cx, SIDE / 2 - cy)
    grey = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY) if image.ndim == 3 else image
    large_side = int(SIDE * LABEL_SCALE)
    large = cv2.warpAffine(grey, affine * LABEL_SCALE, (large_side, large_side), flags=cv2.INTER_LINEAR,
                           borderMode=cv2.BORDER_REPLICATE)
    return large, affine


def as_patch(large: np.ndarray) -> np.ndarray:
    """The CNN's SIDE×SIDE input from a `large_patch` (area-averaged, as it was trained)."""
    return cv2.resize(large, (SIDE, SIDE), interpolation=cv2.INTER_AREA)


def photo_patches(patches: Patches, names: list[str], copies: int, augment: bool, rng: random.Random) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for name in names:
        for path in sorted((DATA / "faces" / "identities" / name).iterdir()):
            image = cv2.imread(str(path))
            box = patches.largest_face(image) if image is not None else None
            if box is None:
                continue
            for _ in range(copies):
                mirrored = augment and rng.random() < 0.5
                frame = cv2.flip(image, 1) if mirrored else image
                face = Box(frame.shape[1] - box.x - box.width, box.y, box.width, box.height) if mirrored else box
                side = face.width * (1 + rng.uniform(-0.1, 0.1))
                jittered = Box(face.x + face.width / 2 - side / 2 + rng.uniform(-0.08, 0.08) * face.width,
                               face.y + face.height / 2 - side / 2 + rng.uniform(-0.08, 0.08) * face.width, side, side)
                patch, points, _ = patches.cut(frame, jittered, rng.uniform(-12, 12))
                images.append(patch)
                labels.append(points.reshape(-1))
    return np.stack(images), np.stack(labels)


def as_input(patches: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(patches).float().unsqueeze(1) / 255.0 - 0.5


def eye_centres(points: np.ndarray) -> np.ndarray:
    """(n, 5, 2) dlib 5-point order (two points per eye, then the nose) → (n, 2 eyes, 2)."""
    return np.stack([points[:, 0:2].mean(1), points[:, 2:4].mean(1)], 1)


def eye_error(predicted: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Mean distance of the two eye centres from the reference's, over its interocular distance."""
    got, want = eye_centres(predicted), eye_centres(reference)
    iod = np.linalg.norm(want[:, 0] - want[:, 1], axis=1)
    return np.linalg.norm(got - want, axis=2).mean(1) / iod


def train(net: nn.Sequential, images: torch.Tensor, labels: torch.Tensor, epochs: int, log: list[str]) -> None:
    batch = 128
    optimiser = torch.optim.AdamW(net.parameters(), 2e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, 3e-3, total_steps=epochs * (len(images) // batch))
    started = time.monotonic()
    for epoch in range(epochs):
        net.train()
        order = torch.randperm(len(images))
        for first in range(0, len(images) - batch + 1, batch):
            chosen = order[first:first + batch]
            x = images[chosen]
            x = x * (1 + 0.3 * (torch.rand(len(x), 1, 1, 1) - 0.5)) + 0.2 * (torch.rand(len(x), 1, 1, 1) - 0.5)
            loss = (net(x) - labels[chosen]).abs().mean()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
        log.append(f"epoch {epoch}: {time.monotonic() - started:.0f} s, loss {loss.item():.4f}")
        print(log[-1], flush=True)


def video_rows(patches: Patches, net: nn.Sequential) -> list[dict]:
    rows = []
    for video in sorted((DATA / "videos").glob("*.mp4")):
        with av.open(str(video)) as container:
            frames = [frame.to_ndarray(format="bgr24") for _, frame in zip(range(150), container.decode(video=0))]
        reference, predicted = [], []
        for frame in frames:
            box = patches.largest_face(frame)
            if box is None:
                continue
            patch, points, affine = patches.cut(frame, box)
            with torch.no_grad():
                guess = net(as_input(patch[None])).numpy().reshape(5, 2)
            back = cv2.invertAffineTransform(affine)
            reference.append((points * SIDE) @ back[:, :2].T + back[:, 2])
            predicted.append((guess * SIDE) @ back[:, :2].T + back[:, 2])
        want, got = np.array(reference), np.array(predicted)
        iod = np.linalg.norm(eye_centres(want)[:, 0] - eye_centres(want)[:, 1], axis=1)

        def jitter(points: np.ndarray) -> float:
            eyes = eye_centres(points)
            return float((np.linalg.norm(eyes[2:] - 2 * eyes[1:-1] + eyes[:-2], axis=2).mean(1) / iod[1:-1]).mean())

        error = eye_error(got, want)
        rows.append({"video": video.name, "frames": len(want), "eye_error_iod": round(float(error.mean()), 4),
                     "eye_error_iod_p95": round(float(np.quantile(error, 0.95)), 4),
                     "jitter_iod_dlib": round(jitter(want), 4), "jitter_iod_cnn": round(jitter(got), 4)})
        print(rows[-1], flush=True)
    return rows


def cpu_microseconds_a_face(net: nn.Sequential, sample: torch.Tensor, batch: int) -> float:
    x = sample[:batch]
    with torch.no_grad():
        net(x)
        started, faces = time.perf_counter(), 0
        while time.perf_counter() - started < 1.0:
            net(x)
            faces += batch
    return round(1e6 * (time.perf_counter() - started) / faces, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=18)
    parser.add_argument("--out", type=Path, help="also write the report here")
    parser.add_argument("--save", type=Path, help="also save the trained network's state dict here")
    args = parser.parse_args()
    torch.manual_seed(0)
    rng = random.Random(0)
    holdout = holdout_identities(DATA / "faces" / "SPLIT.md")
    names = sorted(p.name for p in (DATA / "faces" / "identities").iterdir() if p.is_dir())
    patches = Patches()
    train_x, train_y = photo_patches(patches, [n for n in names if n not in holdout], 40, True, rng)
    test_x, test_y = photo_patches(patches, [n for n in names if n in holdout], 6, False, rng)
    net = landmark_net()
    log: list[str] = []
    train(net, as_input(train_x), torch.from_numpy(train_y), args.epochs, log)
    net.eval()
    if args.save:
        torch.save(net.state_dict(), args.save)
    with torch.no_grad():
        error = eye_error(net(as_input(test_x)).numpy().reshape(-1, 5, 2), test_y.reshape(-1, 5, 2))
    videos = video_rows(patches, net)
    report = {
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "training_patches": len(train_x), "epochs": args.epochs, "log": log,
        "holdout_photos": {"patches": len(test_x), "eye_error_iod": round(float(error.mean()), 4),
                           "eye_error_iod_p95": round(float(np.quantile(error, 0.95)), 4)},
        "videos": videos,
        "cpu_us_a_face": {str(b): cpu_microseconds_a_face(net, as_input(test_x), b) for b in (1, 16, 64)},
    }
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
