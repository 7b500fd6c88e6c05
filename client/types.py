"""Results as plain dataclasses, so callers never handle protobuf messages."""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Any

from acroscreen.v1 import screening_pb2 as pb


class ImageKind(enum.Enum):
    JPEG = "jpeg"
    PNG = "png"
    RAW_BGR24 = "bgr24"
    RAW_RGB24 = "rgb24"
    RAW_GRAY8 = "gray8"


@dataclass(frozen=True, slots=True)
class FrameData:
    """One frame to send: encoded bytes (JPEG/PNG) or raw pixels with their size."""

    data: bytes
    kind: ImageKind = ImageKind.JPEG
    index: int = 0
    timestamp_us: int = 0
    width: int = 0  # raw only
    height: int = 0  # raw only


@dataclass(frozen=True, slots=True)
class Box:
    x: float
    y: float
    width: float
    height: float


@dataclass(frozen=True, slots=True)
class HeadPose:
    yaw_deg: float
    pitch_deg: float
    roll_deg: float


@dataclass(frozen=True, slots=True)
class Quality:
    score: float
    sharpness: float
    exposure: float
    face_size: float
    pose: float
    confidence: float


@dataclass(frozen=True, slots=True)
class FrameResult:
    index: int
    timestamp_us: int
    status: str  # analyzed | rejected | skipped
    reject_reason: str | None
    detail: str
    face_count: int
    box: Box | None
    quality: Quality | None
    pose: HeadPose | None
    probabilities: tuple[float, float, float] | None
    predicted_score: int | None
    expected_score: float | None
    latency_ms: float


@dataclass(frozen=True, slots=True)
class FrameAck:
    """The server queued this frame for analysis (or holds it as the best of its interval so far); its FrameResult follows."""

    index: int
    timestamp_us: int


@dataclass(frozen=True, slots=True)
class ModelRef:
    name: str
    version: str
    kind: str
    sha256: str


@dataclass(frozen=True, slots=True)
class SubjectResult:
    subject_id: str
    status: str  # insufficient_evidence | provisional | final
    predicted_score: int | None
    expected_score: float | None
    probabilities: tuple[float, float, float]
    expected_score_interval: tuple[float, float] | None
    frames_received: int
    frames_analyzed: int
    frames_skipped: int
    rejected: dict[str, int] = field(default_factory=dict)
    model: ModelRef | None = None
    faces_seen_max: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True, slots=True)
class ModelInfo:
    model: ModelRef
    class_labels: tuple[str, ...]
    input_size: int
    mean: float
    std: float
    channel_order: str
    box_height_expand: float
    alignment: str
    landmark_points: int
    temperature: float
    arithmetic: str  # fp16 (CUDA), bf16, fp32 or int8 (CPU); "" from servers before it was reported
    architecture: str
    intended_use: str
    notices: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------ conversions

_RAW_FORMATS = {
    ImageKind.RAW_BGR24: pb.PIXEL_FORMAT_BGR24,
    ImageKind.RAW_RGB24: pb.PIXEL_FORMAT_RGB24,
    ImageKind.RAW_GRAY8: pb.PIXEL_FORMAT_GRAY8,
}


def frame_message(frame: FrameData) -> pb.Frame:
    message = pb.Frame(index=frame.index, timestamp_us=frame.timestamp_us)
    if frame.kind is ImageKind.JPEG:
        message.jpeg = frame.data
    elif frame.kind is ImageKind.PNG:
        message.png = frame.data
    else:
        message.raw.CopyFrom(
            pb.RawImage(width=frame.width, height=frame.height, format=_RAW_FORMATS[frame.kind], data=frame.data)
        )
    return message


def _enum_suffix(enum_type: Any, value: int, prefix: str) -> str | None:
    if value == 0:
        return None
    try:
        return enum_type.Name(value).removeprefix(prefix).lower()
    except ValueError:
        return f"unknown_{value}"


def frame_result(message: pb.FrameResult) -> FrameResult:
    analyzed = message.status == pb.FRAME_STATUS_ANALYZED
    p = message.probabilities
    return FrameResult(
        index=message.index,
        timestamp_us=message.timestamp_us,
        status=_enum_suffix(pb.FrameStatus, message.status, "FRAME_STATUS_") or "unspecified",
        reject_reason=_enum_suffix(pb.RejectReason, message.reject_reason, "REJECT_REASON_"),
        detail=message.detail,
        face_count=message.face_count,
        box=Box(message.box.x, message.box.y, message.box.width, message.box.height) if message.HasField("box") else None,
        quality=Quality(
            message.quality.score,
            message.quality.sharpness,
            message.quality.exposure,
            message.quality.face_size,
            message.quality.pose,
            message.quality.confidence,
        )
        if message.HasField("quality")
        else None,
        pose=HeadPose(message.pose.yaw_deg, message.pose.pitch_deg, message.pose.roll_deg)
        if message.HasField("pose")
        else None,
        probabilities=(p.p1, p.p2, p.p3) if analyzed else None,
        predicted_score=message.predicted_score if analyzed else None,
        expected_score=message.expected_score if analyzed else None,
        latency_ms=message.latency_ms,
    )


StreamEvent = FrameAck | FrameResult | SubjectResult


def stream_event(response: pb.ScreenResponse) -> StreamEvent:
    """One ScreenStream response as the event it carries."""
    payload = response.WhichOneof("payload")
    if payload == "frame_result":
        return frame_result(response.frame_result)
    if payload == "frame_ack":
        return FrameAck(response.frame_ack.index, response.frame_ack.timestamp_us)
    return subject_result(response.subject)


def _model_ref(message: pb.ModelRef) -> ModelRef:
    return ModelRef(message.name, message.version, message.kind, message.sha256)


def subject_result(message: pb.SubjectResult) -> SubjectResult:
    p = message.probabilities
    has_score = message.predicted_score != 0
    interval = message.expected_score_interval
    return SubjectResult(
        subject_id=message.subject_id,
        status=_enum_suffix(pb.SubjectStatus, message.status, "SUBJECT_STATUS_") or "unspecified",
        predicted_score=message.predicted_score if has_score else None,
        expected_score=message.expected_score if message.frames_analyzed else None,
        probabilities=(p.p1, p.p2, p.p3),
        expected_score_interval=(interval.low, interval.high) if message.HasField("expected_score_interval") else None,
        frames_received=message.frames_received,
        frames_analyzed=message.frames_analyzed,
        frames_skipped=message.frames_skipped,
        rejected={
            _enum_suffix(pb.RejectReason, item.reason, "REJECT_REASON_") or "unspecified": item.count
            for item in message.rejected
        },
        model=_model_ref(message.model) if message.HasField("model") else None,
        faces_seen_max=message.faces_seen_max,
    )


def model_info(message: pb.ModelInfo) -> ModelInfo:
    p = message.preprocessing
    return ModelInfo(
        model=_model_ref(message.model),
        class_labels=tuple(message.class_labels),
        input_size=p.input_size,
        mean=p.mean,
        std=p.std,
        channel_order=p.channel_order,
        box_height_expand=p.box_height_expand,
        alignment=p.alignment,
        landmark_points=p.landmark_points,
        temperature=message.temperature,
        arithmetic=message.arithmetic,
        architecture=message.architecture,
        intended_use=message.intended_use,
        notices=tuple(message.notices),
    )
