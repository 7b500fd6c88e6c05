"""Photos as the client sends them: byte for byte when they fit a message, shrunk when they do not."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from acroscreen.client.sources import PHOTO_MAX_BYTES, describe, image_frames
from acroscreen.client.types import ImageKind

from tests.helpers import write_camera_photos


def test_small_photos_go_byte_for_byte_and_large_ones_shrink_to_fit(portrait_bgr: np.ndarray, tmp_path: Path) -> None:
    small = tmp_path / "0.png"
    cv2.imwrite(str(small), portrait_bgr)
    camera = tmp_path / "camera"
    camera.mkdir()
    write_camera_photos(camera, portrait_bgr, 1, size=(5000, 3750))  # a 19-MP camera photo
    large = (camera / "0.jpg").rename(tmp_path / "1.jpg")
    assert large.stat().st_size > PHOTO_MAX_BYTES
    source = describe(str(tmp_path))
    assert source.kind == "images" and source.frame_count == 2
    first, second = image_frames(tmp_path)
    assert first.kind is ImageKind.PNG and first.data == small.read_bytes()
    assert second.kind is ImageKind.JPEG and second.index == 1 and len(second.data) <= PHOTO_MAX_BYTES
    pixels = cv2.imdecode(np.frombuffer(second.data, np.uint8), cv2.IMREAD_COLOR)
    assert pixels.shape == (3072, 4096, 3)  # the server's default pixel limit is 4096×4096
    # The same picture: the shrunk photo against the original scaled down alike.
    original = cv2.resize(cv2.imread(str(large)), (4096, 3072), interpolation=cv2.INTER_AREA)
    assert np.abs(pixels.astype(int) - original.astype(int)).mean() < 4


def test_a_folder_without_jpeg_or_png_photos_is_refused_with_what_it_holds(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="it is empty"):
        describe(str(tmp_path))
    (tmp_path / "IMG_0001.HEIC").write_bytes(b"not read")
    with pytest.raises(ValueError, match=r"1 other file\(s\), e.g. IMG_0001.HEIC: convert"):
        describe(str(tmp_path))
