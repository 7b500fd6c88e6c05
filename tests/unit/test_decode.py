import struct

import cv2
import numpy as np
import pytest
from acroscreen.server.runtime.decode import DecodeLimits, decode_image, decode_scaled
from acroscreen.server.runtime.types import (
    EncodedImage,
    FrameRejected,
    ImageEncoding,
    PixelFormat,
    RejectReason,
)

from tests.helpers import jpeg_bytes, png_bytes

LIMITS = DecodeLimits()


def _image() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 255, size=(48, 64, 3), dtype=np.uint8)


def _reason(image: EncodedImage, limits: DecodeLimits = LIMITS) -> RejectReason:
    with pytest.raises(FrameRejected) as caught:
        decode_image(image, limits)
    return caught.value.reason


def test_png_is_lossless_and_jpeg_is_close() -> None:
    image = _image()
    assert np.array_equal(decode_image(EncodedImage(ImageEncoding.PNG, png_bytes(image)), LIMITS), image)
    decoded = decode_image(EncodedImage(ImageEncoding.JPEG, jpeg_bytes(image, 95)), LIMITS)
    assert decoded.shape == image.shape


def test_jpeg_decodes_reduced_in_the_dct_and_says_by_how_much() -> None:
    image = cv2.resize(_image(), (1282, 722))  # not a multiple of the reduction: libjpeg rounds up
    encoded = EncodedImage(ImageEncoding.JPEG, jpeg_bytes(image, 90))
    full = decode_scaled(encoded, LIMITS, 1)
    half = decode_scaled(encoded, LIMITS, 2)
    quarter = decode_scaled(encoded, LIMITS, 4)
    assert full.scale == 1.0 and full.pixels.shape == image.shape
    assert half.pixels.shape == (361, 641, 3) and half.scale == pytest.approx(2.0)
    assert quarter.pixels.shape == (181, 321, 3) and quarter.scale == pytest.approx(1282 / 321)
    # The same picture, smaller: the half-size decode is close to a box-filtered full one.
    box_filtered = cv2.resize(full.pixels, (641, 361), interpolation=cv2.INTER_AREA)
    assert np.abs(half.pixels.astype(int) - box_filtered.astype(int)).mean() < 4
    png = decode_scaled(EncodedImage(ImageEncoding.PNG, png_bytes(image)), LIMITS, 2)  # no cheap way: in full
    assert png.scale == 1.0 and np.array_equal(png.pixels, image)
    with pytest.raises(ValueError, match="reduction"):
        decode_scaled(encoded, LIMITS, 3)
    with pytest.raises(FrameRejected):  # the same checks as a full decode
        decode_scaled(EncodedImage(ImageEncoding.JPEG, b"\xff\xd8 truncated"), LIMITS, 2)


def _with_exif_orientation(jpeg: bytes, orientation: int) -> bytes:
    """The JPEG with an APP1 Exif segment holding only the Orientation tag (a phone's rotated photo)."""
    tiff = b"MM\x00\x2a\x00\x00\x00\x08" + struct.pack(">H", 1)
    tiff += struct.pack(">HHIHH", 0x0112, 3, 1, orientation, 0) + struct.pack(">I", 0)
    app1 = b"Exif\x00\x00" + tiff
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 + jpeg[2:]


def test_a_rotated_photo_decodes_upright_and_reduced_by_the_right_factor() -> None:
    """Orientation 6 (turn 90° clockwise to view): the header says 1282×722, the picture is 722×1282."""
    upright = cv2.resize(_image(), (722, 1282))
    stored = cv2.rotate(upright, cv2.ROTATE_90_COUNTERCLOCKWISE)
    encoded = EncodedImage(ImageEncoding.JPEG, _with_exif_orientation(jpeg_bytes(stored, 90), 6))
    assert decode_image(encoded, LIMITS).shape == upright.shape
    half = decode_scaled(encoded, LIMITS, 2)
    assert half.pixels.shape == (641, 361, 3) and half.scale == pytest.approx(2.0)
    box_filtered = cv2.resize(upright, (361, 641), interpolation=cv2.INTER_AREA)
    assert np.abs(half.pixels.astype(int) - box_filtered.astype(int)).mean() < 4


@pytest.mark.parametrize("fmt", list(PixelFormat))
def test_raw_formats_come_back_as_bgr(fmt: PixelFormat) -> None:
    bgr = _image()
    pixels = {
        PixelFormat.BGR24: bgr,
        PixelFormat.RGB24: bgr[:, :, ::-1],
        PixelFormat.GRAY8: cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY),
    }[fmt]
    decoded = decode_image(EncodedImage(ImageEncoding.RAW, np.ascontiguousarray(pixels).tobytes(), 64, 48, fmt), LIMITS)
    assert decoded.shape == (48, 64, 3)
    if fmt is not PixelFormat.GRAY8:
        assert np.array_equal(decoded, bgr)


def test_bad_inputs_are_rejected_with_their_reason() -> None:
    image = _image()
    jpeg = jpeg_bytes(image)
    assert _reason(EncodedImage(ImageEncoding.JPEG, b"")) is RejectReason.DECODE_FAILED
    assert _reason(EncodedImage(ImageEncoding.RAW, b"")) is RejectReason.BAD_FORMAT  # a frame without an image
    assert _reason(EncodedImage(ImageEncoding.RAW, b"", 64, 48, PixelFormat.BGR24)) is RejectReason.BAD_FORMAT
    assert _reason(EncodedImage(ImageEncoding.JPEG, b"not a jpeg at all")) is RejectReason.DECODE_FAILED
    assert _reason(EncodedImage(ImageEncoding.JPEG, jpeg[:40])) is RejectReason.DECODE_FAILED
    assert _reason(EncodedImage(ImageEncoding.PNG, jpeg)) is RejectReason.DECODE_FAILED
    raw = image.tobytes()
    assert _reason(EncodedImage(ImageEncoding.RAW, raw[:-1], 64, 48, PixelFormat.BGR24)) is RejectReason.BAD_FORMAT
    assert _reason(EncodedImage(ImageEncoding.RAW, raw, 64, 48, None)) is RejectReason.BAD_FORMAT
    assert _reason(EncodedImage(ImageEncoding.RAW, raw, 0, 48, PixelFormat.BGR24)) is RejectReason.BAD_FORMAT
    assert _reason(EncodedImage(ImageEncoding.JPEG, jpeg), DecodeLimits(max_bytes=100)) is RejectReason.TOO_LARGE
    assert _reason(EncodedImage(ImageEncoding.JPEG, jpeg), DecodeLimits(max_pixels=1000)) is RejectReason.TOO_LARGE
    assert _reason(EncodedImage(ImageEncoding.PNG, png_bytes(image)), DecodeLimits(max_pixels=1000)) is RejectReason.TOO_LARGE


def test_huge_declared_size_is_refused_before_decoding() -> None:
    """A tiny PNG that declares 100k×100k pixels must not be decompressed."""
    png = bytearray(png_bytes(_image()))
    png[16:20] = (100_000).to_bytes(4, "big")
    png[20:24] = (100_000).to_bytes(4, "big")
    assert _reason(EncodedImage(ImageEncoding.PNG, bytes(png))) is RejectReason.TOO_LARGE
