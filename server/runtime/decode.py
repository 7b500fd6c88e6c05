"""Frame bytes → BGR pixels. Every failure is a per-frame rejection with a reason."""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from .types import EncodedImage, FrameRejected, ImageEncoding, PixelFormat, RejectReason

_JPEG_MAGIC = b"\xff\xd8"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PREVIEW_SCALE = 4  # matches IMREAD_REDUCED_GRAYSCALE_4


@dataclass(frozen=True, slots=True, kw_only=True)
class DecodeLimits:
    max_bytes: int = 8 * 1024 * 1024
    max_pixels: int = 4096 * 4096


def decode_image(image: EncodedImage, limits: DecodeLimits) -> np.ndarray:
    """Decode to a contiguous uint8 H×W×3 BGR array (grey input is expanded)."""
    _check_size(image, limits)
    if image.encoding is ImageEncoding.RAW:
        return _decode_raw(image, limits)
    return _imdecode(image, limits, cv2.IMREAD_COLOR)


@dataclass(frozen=True, slots=True, eq=False)
class ScaledImage:
    """Decoded pixels and how many frame pixels each stands for (1 unless decoded reduced)."""

    pixels: np.ndarray
    scale: float


_REDUCED_COLOR = {2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}


def decode_scaled(image: EncodedImage, limits: DecodeLimits, reduction: int) -> ScaledImage:
    """``decode_image`` at 1/``reduction`` (2, 4 or 8) of the size where that is cheap: JPEG, scaled
    inside libjpeg's DCT. Other encodings decode in full (scale 1)."""
    if reduction == 1 or image.encoding is not ImageEncoding.JPEG:
        return ScaledImage(decode_image(image, limits), 1.0)
    if reduction not in _REDUCED_COLOR:
        raise ValueError(f"reduction must be 1, 2, 4 or 8, not {reduction}")
    _check_size(image, limits)
    pixels = _imdecode(image, limits, _REDUCED_COLOR[reduction])
    # Longer side to longer side: OpenCV turns the picture upright by its EXIF orientation, which
    # may swap the sides the header declares.
    declared = max(_declared_size(image.data, image.encoding))
    return ScaledImage(pixels, declared / max(pixels.shape[:2]))


def decode_preview_grey(image: EncodedImage, limits: DecodeLimits) -> np.ndarray:
    """A grey copy at 1/PREVIEW_SCALE of the size, for choosing frames before analysing them.

    JPEG is scaled inside libjpeg's DCT, a few times cheaper than a full decode; PNG and
    raw frames are decoded or read as they are and subsampled. The same checks as
    ``decode_image`` run first, so a bad frame fails here the same way.
    """
    _check_size(image, limits)
    if image.encoding is ImageEncoding.RAW:
        pixels = _raw_pixels(image, limits)[::PREVIEW_SCALE, ::PREVIEW_SCALE]
        if image.pixel_format is PixelFormat.GRAY8:
            return np.ascontiguousarray(pixels[:, :, 0])
        code = cv2.COLOR_RGB2GRAY if image.pixel_format is PixelFormat.RGB24 else cv2.COLOR_BGR2GRAY
        return cv2.cvtColor(np.ascontiguousarray(pixels), code)
    if image.encoding is ImageEncoding.JPEG:
        return _imdecode(image, limits, cv2.IMREAD_REDUCED_GRAYSCALE_4)
    # OpenCV's reduced PNG read is a full decode and a resize, which fails below 4 pixels a side.
    grey = _imdecode(image, limits, cv2.IMREAD_GRAYSCALE)
    size = (max(1, grey.shape[1] // PREVIEW_SCALE), max(1, grey.shape[0] // PREVIEW_SCALE))
    return cv2.resize(grey, size, interpolation=cv2.INTER_AREA)


def _check_size(image: EncodedImage, limits: DecodeLimits) -> None:
    if not image.data:
        if image.encoding is ImageEncoding.RAW:  # no image at all, or raw pixels without their bytes
            raise FrameRejected(RejectReason.BAD_FORMAT, "no image bytes: a frame carries jpeg, png or raw pixels")
        raise FrameRejected(RejectReason.DECODE_FAILED, "empty image bytes")
    if len(image.data) > limits.max_bytes:
        raise FrameRejected(
            RejectReason.TOO_LARGE, f"{len(image.data)} bytes exceeds the limit of {limits.max_bytes}"
        )


def _raw_pixels(image: EncodedImage, limits: DecodeLimits) -> np.ndarray:
    """The raw bytes as an H×W×C view, after checking the declared layout."""
    if image.pixel_format is None:
        raise FrameRejected(RejectReason.BAD_FORMAT, "raw frame without a known pixel format")
    if image.width <= 0 or image.height <= 0:
        raise FrameRejected(RejectReason.BAD_FORMAT, f"raw frame size {image.width}x{image.height}")
    if image.width * image.height > limits.max_pixels:
        raise FrameRejected(
            RejectReason.TOO_LARGE,
            f"{image.width}x{image.height} exceeds the limit of {limits.max_pixels} pixels",
        )
    channels = image.pixel_format.channels
    expected = image.width * image.height * channels
    if len(image.data) != expected:
        raise FrameRejected(
            RejectReason.BAD_FORMAT,
            f"raw {image.pixel_format.value} {image.width}x{image.height} needs {expected} bytes, got {len(image.data)}",
        )
    return np.frombuffer(image.data, dtype=np.uint8).reshape(image.height, image.width, channels)


def _decode_raw(image: EncodedImage, limits: DecodeLimits) -> np.ndarray:
    pixels = _raw_pixels(image, limits)
    if image.pixel_format is PixelFormat.GRAY8:
        return cv2.cvtColor(pixels, cv2.COLOR_GRAY2BGR)
    if image.pixel_format is PixelFormat.RGB24:
        return cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR)
    return pixels.copy()


def _imdecode(image: EncodedImage, limits: DecodeLimits, flags: int) -> np.ndarray:
    """JPEG/PNG bytes through OpenCV, after the signature and the declared size are checked."""
    magic = _JPEG_MAGIC if image.encoding is ImageEncoding.JPEG else _PNG_MAGIC
    if not image.data.startswith(magic):
        raise FrameRejected(
            RejectReason.DECODE_FAILED, f"bytes are not {image.encoding.value.upper()} (bad signature)"
        )
    buffer = np.frombuffer(image.data, dtype=np.uint8)
    width, height = _declared_size(image.data, image.encoding)
    if width * height > limits.max_pixels:
        raise FrameRejected(
            RejectReason.TOO_LARGE, f"{width}x{height} exceeds the limit of {limits.max_pixels} pixels"
        )
    try:
        pixels = cv2.imdecode(buffer, flags)
    except cv2.error:  # OpenCV asserts on some malformed input instead of returning nothing
        pixels = None
    if pixels is None or pixels.size == 0:
        raise FrameRejected(RejectReason.DECODE_FAILED, f"corrupt or truncated {image.encoding.value.upper()}")
    return pixels


def _declared_size(data: bytes, encoding: ImageEncoding) -> tuple[int, int]:
    """Read width and height from the header, so decompression bombs are refused before decoding."""
    if encoding is ImageEncoding.PNG:
        if len(data) < 24:
            raise FrameRejected(RejectReason.DECODE_FAILED, "truncated PNG header")
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    offset = 2
    while offset + 9 < len(data):
        if data[offset] != 0xFF:
            break
        marker = data[offset + 1]
        if marker == 0xFF:  # a fill byte before a marker (ITU T.81 B.1.1.2)
            offset += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            offset += 2
            continue
        length = int.from_bytes(data[offset + 2 : offset + 4], "big")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            height = int.from_bytes(data[offset + 5 : offset + 7], "big")
            width = int.from_bytes(data[offset + 7 : offset + 9], "big")
            return width, height
        offset += 2 + length
    raise FrameRejected(RejectReason.DECODE_FAILED, "JPEG without a frame header (corrupt or truncated)")
