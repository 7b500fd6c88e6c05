"""Small helpers shared by tests."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np


def jpeg_bytes(image: np.ndarray, quality: int = 90) -> bytes:
    ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return data.tobytes()


def png_bytes(image: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".png", image)
    assert ok
    return data.tobytes()


def write_camera_photos(folder: Path, image: np.ndarray, count: int, size: tuple[int, int] = (4032, 3024)) -> None:
    """``count`` JPEGs of ``image`` at a phone camera's size with sensor grain, which is what makes
    such files large (~7 MB at 4032×3024): 0.jpg, 1.jpg, …"""
    for index in range(count):
        photo = cv2.resize(image, size, interpolation=cv2.INTER_CUBIC)
        photo = np.clip(photo + np.random.default_rng(index).normal(0.0, 8.0, photo.shape), 0, 255).astype(np.uint8)
        cv2.imwrite(str(folder / f"{index}.jpg"), photo, [cv2.IMWRITE_JPEG_QUALITY, 97])
