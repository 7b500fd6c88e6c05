"""Photos as the client sends them: byte for byte when they fit a message, shrunk when they do not."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from acroscreen.client.sources import PHOTO_MAX_BYTES, describe, image_frames, video_frames
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
    with pytest.raises(ValueError, match=r"1 other file\(s\) or folder\(s\), e.g. IMG_0001.HEIC; photos in other"):
        describe(str(tmp_path))


@pytest.mark.parametrize("rotation", [-90, 90, 180])
def test_a_video_stored_turned_is_sent_as_its_display_rotation_shows_it(
    rotation: int, portrait_bgr: np.ndarray, tmp_path: Path
) -> None:
    """A phone records portrait video sideways, with a display matrix saying how to turn it upright
    (frame.rotation: degrees counter-clockwise, -90 for a phone held upright). Frames were sent as
    stored, the face lying on its side."""
    import av

    upright = cv2.resize(portrait_bgr[:, 64:448], (192, 256), interpolation=cv2.INTER_AREA)  # 256 high, 192 wide
    stored = np.ascontiguousarray(np.rot90(upright, k=-rotation // 90))  # turned clockwise by `rotation`
    clip = tmp_path / f"turned{rotation}.mp4"
    with av.open(str(clip), "w") as container:
        stream = container.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = stored.shape[1], stored.shape[0], "yuv420p"
        stream.set_display_rotation(rotation)  # shown turned counter-clockwise by `rotation`: upright
        for _ in range(2):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(stored, format="bgr24")))
        container.mux(stream.encode())

    def difference(pixels: np.ndarray, picture: np.ndarray) -> float:
        return float(np.abs(pixels.astype(int) - picture.astype(int)).mean()) if pixels.shape == picture.shape else 255.0

    # The clip is made as players see it: OpenCV's FFmpeg reader turns it by its metadata, upright.
    capture = cv2.VideoCapture(str(clip))
    ok, shown = capture.read()
    capture.release()
    assert ok and difference(shown, upright) < 8
    frames = list(video_frames(clip))
    assert len(frames) == 2
    for frame in frames:
        pixels = cv2.imdecode(np.frombuffer(frame.data, np.uint8), cv2.IMREAD_COLOR)
        assert difference(pixels, upright) < 8
        assert difference(pixels, np.rot90(upright, 2)) > 30  # not upside down either


def test_a_file_that_is_not_a_video_is_refused_in_words(tmp_path: Path) -> None:
    fake = tmp_path / "fake.mp4"
    fake.write_bytes(b"this is not a video at all" * 10)
    with pytest.raises(ValueError, match="cannot be read as a video"):
        describe(str(fake))
