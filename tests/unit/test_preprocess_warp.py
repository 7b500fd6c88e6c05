"""Batched warps: the torch (GPU) path matches the OpenCV (CPU) path."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from acroscreen.server.runtime.frontalize import (
    CropGeometry,
    prefilter_factor,
    warp_faces,
    warp_faces_torch,
)


def synthetic_frame(height: int, width: int, seed: int) -> np.ndarray:
    """Smooth texture with edges, like a photo (pure noise would exaggerate interpolation differences)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)
    frame = cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC)
    cv2.circle(frame, (width // 2, height // 2), min(height, width) // 5, (250, 240, 230), -1)
    return frame


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("eye_distance", [25.0, 70.0, 160.0, 300.0])  # upscale … 4× block average
def test_torch_warp_matches_opencv(eye_distance: float, device: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    geometry = CropGeometry()
    rng = np.random.default_rng(int(eye_distance))
    frames = np.stack([synthetic_frame(720, 960, seed) for seed in range(4)])
    affines = []
    for _ in frames:
        centre = rng.uniform([300, 250], [660, 470])
        angle = rng.uniform(-0.5, 0.5)
        half = 0.5 * eye_distance * np.array([np.cos(angle), np.sin(angle)])
        affines.append(geometry.affine_from_eyes(centre - half, centre + half))
    cpu = warp_faces(list(frames), affines, geometry.input_size)
    batch = torch.from_numpy(frames).permute(0, 3, 1, 2).contiguous().to(device)
    gpu_path = warp_faces_torch(batch, np.stack(affines), geometry.input_size).permute(0, 2, 3, 1).cpu().numpy()
    diff = np.abs(cpu.astype(np.float64) - gpu_path.astype(np.float64))
    block = prefilter_factor(affines[0])
    print(f"eye distance {eye_distance:.0f} px (block {block}): mean abs diff {diff.mean():.3f}, max {diff.max():.0f}")
    assert cpu.shape == gpu_path.shape == (4, 160, 160, 3)
    assert diff.mean() < 1.0


def test_float_frames_stay_float_and_empty_batches_work() -> None:
    frames = (torch.rand(1, 3, 200, 200) * 255).expand(2, -1, -1, -1)
    affine = CropGeometry().affine_from_eyes(np.array([80.0, 90.0]), np.array([120.0, 90.0]))
    out = warp_faces_torch(frames, np.stack([affine, affine]))
    assert out.dtype == torch.float32 and out.shape == (2, 3, 160, 160)
    assert torch.allclose(out[0], out[1])
    assert warp_faces([], []).shape == (0, 160, 160, 3)
