"""Domain values that travel between runtime stages: frozen, typed, no protobuf."""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np


class RejectReason(enum.Enum):
    """Why a frame gave no prediction; names match the wire enum's suffixes."""

    DECODE_FAILED = "decode_failed"
    BAD_FORMAT = "bad_format"
    TOO_LARGE = "too_large"
    NO_FACE = "no_face"
    FACE_TOO_SMALL = "face_too_small"
    BLURRED = "blurred"
    BAD_EXPOSURE = "bad_exposure"
    POSE = "pose"
    LOW_CONFIDENCE = "low_confidence"
    FACE_CHANGED = "face_changed"
    OVERLOADED = "overloaded"
    INFERENCE_FAILED = "inference_failed"


class FrameRejected(Exception):
    """Raised inside a stage for one frame; becomes a per-frame rejection, never a call error."""

    def __init__(self, reason: RejectReason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail


class ImageEncoding(enum.Enum):
    JPEG = "jpeg"
    PNG = "png"
    RAW = "raw"


class PixelFormat(enum.Enum):
    BGR24 = "bgr24"
    RGB24 = "rgb24"
    GRAY8 = "gray8"

    @property
    def channels(self) -> int:
        return 1 if self is PixelFormat.GRAY8 else 3


@dataclass(frozen=True, slots=True)
class EncodedImage:
    """Image bytes as received. width/height/pixel_format only matter for RAW."""

    encoding: ImageEncoding
    data: bytes
    width: int = 0
    height: int = 0
    pixel_format: PixelFormat | None = None


@dataclass(frozen=True, slots=True)
class Box:
    """Axis-aligned box in pixel coordinates of the image it was found in."""

    x: float
    y: float
    width: float
    height: float

    @property
    def area(self) -> float:
        return self.width * self.height

    @property
    def center(self) -> tuple[float, float]:
        return (self.x + self.width / 2.0, self.y + self.height / 2.0)

    def scaled(self, factor: float) -> Box:
        return Box(self.x * factor, self.y * factor, self.width * factor, self.height * factor)


@dataclass(frozen=True, slots=True)
class Detection:
    """The primary face of a frame and how many faces the detector saw."""

    box: Box
    confidence: float  # in [0, 1]
    face_count: int


@dataclass(frozen=True, slots=True)
class HeadPose:
    yaw_deg: float
    pitch_deg: float
    roll_deg: float


@dataclass(frozen=True, slots=True)
class Quality:
    """Overall score in [0, 1] and the components it was combined from."""

    score: float
    sharpness: float
    exposure: float
    face_size: float
    pose: float
    confidence: float


@dataclass(frozen=True, slots=True, eq=False)
class FaceCrop:
    """A model-ready face: uint8 RGB, input_size × input_size × 3."""

    pixels: np.ndarray
    detection: Detection
    quality: Quality
    pose: HeadPose | None
    landmarks: np.ndarray | None  # points × 2 in frame coordinates
