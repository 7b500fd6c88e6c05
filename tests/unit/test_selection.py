"""The best-frame-per-interval choice of rate-limited streams, and the preview it ranks by."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from acroscreen.server.runtime.decode import PREVIEW_SCALE, DecodeLimits, decode_preview_grey
from acroscreen.server.runtime.quality import preview_sharpness
from acroscreen.server.runtime.types import (
    Box,
    EncodedImage,
    FrameRejected,
    ImageEncoding,
    PixelFormat,
    RejectReason,
)
from acroscreen.server.service.selection import BestFramePicker
from acroscreen.server.service.types import FrameInput

from tests.helpers import jpeg_bytes, png_bytes


def _frame(index: int, timestamp_us: int) -> FrameInput:
    return FrameInput(index=index, timestamp_us=timestamp_us, image=EncodedImage(ImageEncoding.JPEG, b""),
                      received_at=0.0)


def test_picker_releases_the_best_frame_of_each_interval_when_the_next_begins() -> None:
    picker = BestFramePicker(interval_us=100)
    scores = {0: 1.0, 1: 5.0, 2: 3.0, 3: 2.0, 4: 9.0, 5: 1.0}
    times = {0: 0, 1: 30, 2: 60, 3: 100, 4: 150, 5: 200}
    decisions = {i: picker.offer(_frame(i, times[i]), scores[i]) for i in range(6)}
    assert decisions[0].held and decisions[0].released is None and decisions[0].passed_over is None
    assert decisions[1].held and decisions[1].passed_over.index == 0  # sharper: frame 0 loses
    assert not decisions[2].held and decisions[2].passed_over.index == 2
    assert decisions[3].released.index == 1  # interval [0, 100) closed with frame 1 as its best
    assert decisions[4].passed_over.index == 3
    assert decisions[5].released.index == 4
    assert picker.release().index == 5 and picker.release() is None


def test_a_capture_clock_that_starts_again_starts_the_intervals_again() -> None:
    """Timestamps that went back (a restarted camera) made every later frame lose to the held one
    of a "later" interval: nothing more was analysed until they passed the old maximum."""
    picker = BestFramePicker(interval_us=100)
    released = [picker.offer(_frame(i, i * 50), 1.0).released for i in range(6)]  # 0-250 µs: intervals 0, 1, 2
    released += [picker.offer(_frame(6 + i, i * 50), 1.0).released for i in range(6)]  # the clock restarts at 0
    assert [f.index for f in released if f is not None] == [0, 2, 4, 6, 8]
    # A frame stamped a little before the last one (less than an interval) is not a restart.
    jitter = BestFramePicker(interval_us=100)
    assert jitter.offer(_frame(0, 0), 1.0).held and jitter.offer(_frame(1, 110), 1.0).released is not None
    late = jitter.offer(_frame(2, 95), 2.0)  # competes in the current interval instead
    assert late.released is None and late.passed_over is not None and late.passed_over.index == 1


def test_picker_keeps_the_first_of_equals_and_prefers_any_readable_frame() -> None:
    picker = BestFramePicker(interval_us=1_000)
    picker.offer(_frame(0, 0), float("-inf"))
    assert picker.offer(_frame(1, 10), 0.0).passed_over.index == 0
    assert picker.offer(_frame(2, 20), 0.0).passed_over.index == 2
    assert picker.release().index == 1
    with pytest.raises(ValueError):
        BestFramePicker(interval_us=0)


def test_jpeg_preview_is_grey_and_reduced(portrait_bgr: np.ndarray) -> None:
    preview = decode_preview_grey(EncodedImage(ImageEncoding.JPEG, jpeg_bytes(portrait_bgr)), DecodeLimits())
    height, width = portrait_bgr.shape[:2]
    assert preview.ndim == 2 and preview.shape == (height // PREVIEW_SCALE, width // PREVIEW_SCALE)


def test_png_previews_of_any_size_including_a_few_pixels(portrait_bgr: np.ndarray) -> None:
    """OpenCV's reduced PNG read asserted below 4 pixels a side: a 1×1 or 3×100 PNG was an
    internal error with a traceback (and INFERENCE_FAILED) instead of a frame without a face."""
    for height, width in ((1, 1), (100, 3), (3, 100), (480, 640)):
        image = cv2.resize(portrait_bgr, (width, height), interpolation=cv2.INTER_AREA)
        preview = decode_preview_grey(EncodedImage(ImageEncoding.PNG, png_bytes(image)), DecodeLimits())
        assert preview.ndim == 2
        assert preview.shape == (max(1, height // PREVIEW_SCALE), max(1, width // PREVIEW_SCALE))


def test_raw_preview_matches_the_layout_and_bad_bytes_fail_as_in_decoding(portrait_bgr: np.ndarray) -> None:
    rgb = np.ascontiguousarray(portrait_bgr[:, :, ::-1])
    height, width = rgb.shape[:2]
    raw = EncodedImage(ImageEncoding.RAW, rgb.tobytes(), width, height, PixelFormat.RGB24)
    preview = decode_preview_grey(raw, DecodeLimits())
    expected = cv2.cvtColor(portrait_bgr, cv2.COLOR_BGR2GRAY)[::PREVIEW_SCALE, ::PREVIEW_SCALE]
    assert np.abs(preview.astype(int) - expected.astype(int)).max() <= 1
    short = EncodedImage(ImageEncoding.RAW, rgb.tobytes()[:-1], width, height, PixelFormat.RGB24)
    with pytest.raises(FrameRejected) as bad:
        decode_preview_grey(short, DecodeLimits())
    assert bad.value.reason is RejectReason.BAD_FORMAT
    with pytest.raises(FrameRejected) as big:
        decode_preview_grey(EncodedImage(ImageEncoding.JPEG, jpeg_bytes(portrait_bgr)), DecodeLimits(max_pixels=100))
    assert big.value.reason is RejectReason.TOO_LARGE


def test_preview_sharpness_ranks_blur_below_focus_where_the_face_is(portrait_bgr: np.ndarray) -> None:
    limits = DecodeLimits()
    height, width = portrait_bgr.shape[:2]
    face = Box(width * 0.3, height * 0.2, width * 0.4, height * 0.5)
    focused = portrait_bgr.copy()
    face_blurred = portrait_bgr.copy()
    x, y, w, h = (int(v) for v in (face.x, face.y, face.width, face.height))
    face_blurred[y:y + h, x:x + w] = cv2.GaussianBlur(portrait_bgr, (0, 0), 3.0)[y:y + h, x:x + w]

    def score(image: np.ndarray, box: Box | None) -> float:
        preview = decode_preview_grey(EncodedImage(ImageEncoding.JPEG, jpeg_bytes(image)), limits)
        return preview_sharpness(preview, box, PREVIEW_SCALE)

    assert score(face_blurred, face) < 0.5 * score(focused, face)
    # The whole-frame score is diluted by the sharp background; the face region is not.
    assert score(face_blurred, face) / score(focused, face) < score(face_blurred, None) / score(focused, None)
