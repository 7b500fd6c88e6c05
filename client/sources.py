"""Frame sources for the client: video files (PyAV), images or folders of images, webcams.

Video frames are sent as JPEG (quality 85 by default: ~37 KB for 640×480).
Photo files already in JPEG or PNG are sent byte for byte, without re-encoding.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .client import DEFAULT_MAX_MESSAGE_BYTES, REQUEST_FRAMING_BYTES
from .types import FrameData, ImageKind

IMAGE_SUFFIXES = {".jpg": ImageKind.JPEG, ".jpeg": ImageKind.JPEG, ".png": ImageKind.PNG}
VIDEO_SUFFIXES = {".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v"}


@dataclass(frozen=True, slots=True)
class Source:
    """What to screen: `kind` is video, images or webcam; `frame_count` is 0 when unknown."""

    kind: str
    location: str
    frame_count: int


def describe(spec: str) -> Source:
    """Classify a SOURCE argument: an integer is a webcam index, else a file or folder."""
    if spec.isdigit():
        return Source("webcam", spec, 0)
    path = Path(spec)
    if path.is_dir():
        count = len(image_paths(path))
        if count == 0:
            others = sorted(p.name for p in path.iterdir() if not p.name.startswith("."))
            found = (f"only {len(others)} other file(s) or folder(s), e.g. {others[0]}; photos in other formats"
                     " (HEIC, RAW) need converting to JPEG") if others else "it is empty"
            raise ValueError(f"no JPEG or PNG images in {spec} ({found})")
        return Source("images", spec, count)
    if not path.is_file():
        raise FileNotFoundError(f"no such file, folder or webcam: {spec}")
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return Source("images", spec, 1)
    if suffix in VIDEO_SUFFIXES:
        return Source("video", spec, video_frame_count(path))
    raise ValueError(f"unsupported file type {suffix!r}: use a video ({', '.join(sorted(VIDEO_SUFFIXES))}) or JPEG/PNG")


def frames(
    source: Source, jpeg_quality: int = 85, stop: threading.Event | None = None, on_open: Callable[[], None] | None = None
) -> Iterator[FrameData]:
    """The source's frames; a webcam's until `stop` is set, calling `on_open` once its camera opened."""
    if source.kind == "video":
        return video_frames(Path(source.location), jpeg_quality)
    if source.kind == "images":
        return image_frames(Path(source.location))
    return webcam_frames(int(source.location), jpeg_quality, stop=stop, on_open=on_open)


def image_paths(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def image_frames(path: Path) -> Iterator[FrameData]:
    for index, image_path in enumerate(image_paths(path)):
        data = image_path.read_bytes()
        if len(data) > PHOTO_MAX_BYTES:
            yield FrameData(_shrunk_jpeg(image_path, len(data)), ImageKind.JPEG, index=index)
        else:
            yield FrameData(data, IMAGE_SUFFIXES[image_path.suffix.lower()], index=index)


# A photo goes byte for byte when it fits one message (the server's 8 MiB default limit, less the
# message's framing). A larger one (a 48-MP phone photo, a DSLR JPEG) would end the whole stream
# with RESOURCE_EXHAUSTED, so it is decoded (turned upright by its EXIF orientation), shrunk to at
# most 4096 px on its longer side (the server's default pixel limit is 4096×4096) and re-encoded.
PHOTO_MAX_BYTES = DEFAULT_MAX_MESSAGE_BYTES - REQUEST_FRAMING_BYTES
_SHRINK_STEPS = ((4096, 95), (4096, 85), (2048, 85))  # longer side, JPEG quality: the first that fits


def _shrunk_jpeg(path: Path, size: int) -> bytes:
    import cv2

    pixels = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if pixels is None:
        raise ValueError(f"{path}: {size} bytes, over the {PHOTO_MAX_BYTES}-byte message limit, and not a readable image")
    longest = max(pixels.shape[:2])
    for side, quality in _SHRINK_STEPS:
        scale = min(1.0, side / longest)
        smaller = (round(pixels.shape[1] * scale), round(pixels.shape[0] * scale))
        resized = cv2.resize(pixels, smaller, interpolation=cv2.INTER_AREA) if scale < 1.0 else pixels
        encoded = _jpeg(cv2, resized, quality)
        if len(encoded) <= PHOTO_MAX_BYTES:
            return encoded
    raise ValueError(f"{path}: still over {PHOTO_MAX_BYTES} bytes at {_SHRINK_STEPS[-1][0]} px, quality {_SHRINK_STEPS[-1][1]}")


def video_frame_count(path: Path) -> int:
    """The video's frame count as its container states it (0 when it does not); ValueError for a
    file PyAV cannot read as a video."""
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ValueError(f"{path} holds no video stream")
            return container.streams.video[0].frames
    except av.error.FFmpegError as error:  # not a video at all, or a damaged one: say so, not an errno
        raise ValueError(f"{path} cannot be read as a video ({error.strerror or 'invalid data'})") from error


def video_frames(path: Path, jpeg_quality: int = 85) -> Iterator[FrameData]:
    """Decode with PyAV; timestamps come from the stream's presentation times. Frames are sent as
    displayed: turned by the video's display rotation (a phone's portrait recording is stored
    sideways, with a display matrix saying how to turn it upright)."""
    import av
    import cv2
    import numpy as np

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        for index, frame in enumerate(container.decode(stream)):
            pixels = frame.to_ndarray(format="bgr24")
            # `rotation`: degrees counter-clockwise (as np.rot90 turns for a positive k); older PyAV lacks it.
            if quarter_turns := round(getattr(frame, "rotation", 0) / 90) % 4:
                pixels = np.ascontiguousarray(np.rot90(pixels, quarter_turns))
            timestamp_us = int(frame.time * 1_000_000) if frame.time is not None else 0
            yield FrameData(_jpeg(cv2, pixels, jpeg_quality), ImageKind.JPEG, index=index, timestamp_us=timestamp_us)


def webcam_frames(
    device: int, jpeg_quality: int = 85, max_frames: int = 0, stop: threading.Event | None = None,
    on_open: Callable[[], None] | None = None,
) -> Iterator[FrameData]:
    """Captures until `stop` is set, the camera gives no more frames, or `max_frames` were
    captured (0: no cap). OSError when the camera cannot be opened; `on_open` is called once it
    did (to tell the user how to end the capture only when there is one)."""
    import itertools
    import time

    import cv2

    capture = cv2.VideoCapture(device)
    if not capture.isOpened():
        raise OSError(f"cannot open webcam {device}")
    if on_open is not None:
        on_open()
    started = time.monotonic()
    try:
        for index in range(max_frames) if max_frames else itertools.count():
            if stop is not None and stop.is_set():
                return
            ok, pixels = capture.read()
            if not ok:
                return
            timestamp_us = int((time.monotonic() - started) * 1_000_000)
            yield FrameData(_jpeg(cv2, pixels, jpeg_quality), ImageKind.JPEG, index=index, timestamp_us=timestamp_us)
    finally:
        capture.release()


def _jpeg(cv2, pixels, quality: int) -> bytes:  # noqa: ANN001 — cv2 is imported lazily (media extra)
    ok, encoded = cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return encoded.tobytes()
