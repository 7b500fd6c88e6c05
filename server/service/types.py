"""Values the service layer hands to the transport: frozen, typed, no gRPC."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from ..runtime.types import Box, EncodedImage, HeadPose, Quality, RejectReason


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionOptions:
    """Per-stream options; zeros mean the server's default."""

    subject_id: str = ""
    max_analyzed_frames: int = 0
    min_analysis_interval_ms: int = 0
    analyze_every_frame: bool = False
    update_every_frames: int = 0
    acknowledge_frames: bool = False
    still_images: bool = False  # each frame a separate photograph: no rate policy, never skipped for load


@dataclass(frozen=True, slots=True, kw_only=True)
class FrameInput:
    index: int
    timestamp_us: int
    image: EncodedImage
    received_at: float  # time.monotonic() at arrival


@dataclass(frozen=True, slots=True, kw_only=True)
class FrameAck:
    """A frame arrived and is queued (or held as its interval's best) for analysis; its FramePrediction follows."""

    index: int
    timestamp_us: int


class FrameStatus(enum.Enum):
    ANALYZED = "analyzed"
    REJECTED = "rejected"
    SKIPPED = "skipped"


@dataclass(frozen=True, slots=True, kw_only=True)
class FramePrediction:
    """One frame's outcome: exactly one is sent per frame received."""

    index: int
    timestamp_us: int
    status: FrameStatus
    reject_reason: RejectReason | None = None
    detail: str = ""
    face_count: int = 0
    box: Box | None = None
    quality: Quality | None = None
    pose: HeadPose | None = None
    probabilities: tuple[float, float, float] | None = None
    latency_ms: float = 0.0

    @property
    def predicted_score(self) -> int:
        if self.probabilities is None:
            return 0
        return max(range(3), key=lambda k: self.probabilities[k]) + 1

    @property
    def expected_score(self) -> float:
        if self.probabilities is None:
            return 0.0
        return sum((k + 1) * p for k, p in enumerate(self.probabilities))


class SubjectStatus(enum.Enum):
    INSUFFICIENT_EVIDENCE = "insufficient_evidence"
    PROVISIONAL = "provisional"
    FINAL = "final"


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelRef:
    name: str
    version: str
    kind: str
    sha256: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ScoreInterval:
    low: float
    high: float
    confidence: float


@dataclass(frozen=True, slots=True, kw_only=True)
class SubjectResult:
    subject_id: str
    status: SubjectStatus
    predicted_score: int  # 0 when there is too little evidence
    expected_score: float
    probabilities: tuple[float, float, float]
    expected_score_interval: ScoreInterval | None
    frames_received: int
    frames_analyzed: int
    frames_skipped: int
    rejected: dict[RejectReason, int] = field(default_factory=dict)
    model: ModelRef | None = None
    faces_seen_max: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class PreprocessingInfo:
    input_size: int
    mean: float
    std: float
    channel_order: str
    box_height_expand: float
    alignment: str
    landmark_points: int


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelInfo:
    model: ModelRef
    class_labels: tuple[str, ...]
    preprocessing: PreprocessingInfo
    temperature: float
    arithmetic: str  # how the model computes on this server: fp16 (CUDA), or bf16, fp32 or int8 (CPU)
    architecture: str
    intended_use: str
    notices: tuple[str, ...]
