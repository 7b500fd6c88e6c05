import cv2
import numpy as np
import pytest
from acroscreen.server.runtime.decode import DecodeLimits, decode_image
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
