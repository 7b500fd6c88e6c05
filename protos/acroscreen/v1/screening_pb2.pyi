from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PixelFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PIXEL_FORMAT_UNSPECIFIED: _ClassVar[PixelFormat]
    PIXEL_FORMAT_BGR24: _ClassVar[PixelFormat]
    PIXEL_FORMAT_RGB24: _ClassVar[PixelFormat]
    PIXEL_FORMAT_GRAY8: _ClassVar[PixelFormat]

class RejectReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REJECT_REASON_UNSPECIFIED: _ClassVar[RejectReason]
    REJECT_REASON_DECODE_FAILED: _ClassVar[RejectReason]
    REJECT_REASON_BAD_FORMAT: _ClassVar[RejectReason]
    REJECT_REASON_TOO_LARGE: _ClassVar[RejectReason]
    REJECT_REASON_NO_FACE: _ClassVar[RejectReason]
    REJECT_REASON_FACE_TOO_SMALL: _ClassVar[RejectReason]
    REJECT_REASON_BLURRED: _ClassVar[RejectReason]
    REJECT_REASON_BAD_EXPOSURE: _ClassVar[RejectReason]
    REJECT_REASON_POSE: _ClassVar[RejectReason]
    REJECT_REASON_LOW_CONFIDENCE: _ClassVar[RejectReason]
    REJECT_REASON_FACE_CHANGED: _ClassVar[RejectReason]
    REJECT_REASON_OVERLOADED: _ClassVar[RejectReason]
    REJECT_REASON_INFERENCE_FAILED: _ClassVar[RejectReason]

class FrameStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FRAME_STATUS_UNSPECIFIED: _ClassVar[FrameStatus]
    FRAME_STATUS_ANALYZED: _ClassVar[FrameStatus]
    FRAME_STATUS_REJECTED: _ClassVar[FrameStatus]
    FRAME_STATUS_SKIPPED: _ClassVar[FrameStatus]

class SubjectStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SUBJECT_STATUS_UNSPECIFIED: _ClassVar[SubjectStatus]
    SUBJECT_STATUS_INSUFFICIENT_EVIDENCE: _ClassVar[SubjectStatus]
    SUBJECT_STATUS_PROVISIONAL: _ClassVar[SubjectStatus]
    SUBJECT_STATUS_FINAL: _ClassVar[SubjectStatus]
PIXEL_FORMAT_UNSPECIFIED: PixelFormat
PIXEL_FORMAT_BGR24: PixelFormat
PIXEL_FORMAT_RGB24: PixelFormat
PIXEL_FORMAT_GRAY8: PixelFormat
REJECT_REASON_UNSPECIFIED: RejectReason
REJECT_REASON_DECODE_FAILED: RejectReason
REJECT_REASON_BAD_FORMAT: RejectReason
REJECT_REASON_TOO_LARGE: RejectReason
REJECT_REASON_NO_FACE: RejectReason
REJECT_REASON_FACE_TOO_SMALL: RejectReason
REJECT_REASON_BLURRED: RejectReason
REJECT_REASON_BAD_EXPOSURE: RejectReason
REJECT_REASON_POSE: RejectReason
REJECT_REASON_LOW_CONFIDENCE: RejectReason
REJECT_REASON_FACE_CHANGED: RejectReason
REJECT_REASON_OVERLOADED: RejectReason
REJECT_REASON_INFERENCE_FAILED: RejectReason
FRAME_STATUS_UNSPECIFIED: FrameStatus
FRAME_STATUS_ANALYZED: FrameStatus
FRAME_STATUS_REJECTED: FrameStatus
FRAME_STATUS_SKIPPED: FrameStatus
SUBJECT_STATUS_UNSPECIFIED: SubjectStatus
SUBJECT_STATUS_INSUFFICIENT_EVIDENCE: SubjectStatus
SUBJECT_STATUS_PROVISIONAL: SubjectStatus
SUBJECT_STATUS_FINAL: SubjectStatus

class ScreenRequest(_message.Message):
    __slots__ = ("options", "frame")
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    FRAME_FIELD_NUMBER: _ClassVar[int]
    options: SessionOptions
    frame: Frame
    def __init__(self, options: _Optional[_Union[SessionOptions, _Mapping]] = ..., frame: _Optional[_Union[Frame, _Mapping]] = ...) -> None: ...

class SessionOptions(_message.Message):
    __slots__ = ("subject_id", "max_analyzed_frames", "min_analysis_interval_ms", "analyze_every_frame", "update_every_frames", "acknowledge_frames", "still_images")
    SUBJECT_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_ANALYZED_FRAMES_FIELD_NUMBER: _ClassVar[int]
    MIN_ANALYSIS_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    ANALYZE_EVERY_FRAME_FIELD_NUMBER: _ClassVar[int]
    UPDATE_EVERY_FRAMES_FIELD_NUMBER: _ClassVar[int]
    ACKNOWLEDGE_FRAMES_FIELD_NUMBER: _ClassVar[int]
    STILL_IMAGES_FIELD_NUMBER: _ClassVar[int]
    subject_id: str
    max_analyzed_frames: int
    min_analysis_interval_ms: int
    analyze_every_frame: bool
    update_every_frames: int
    acknowledge_frames: bool
    still_images: bool
    def __init__(self, subject_id: _Optional[str] = ..., max_analyzed_frames: _Optional[int] = ..., min_analysis_interval_ms: _Optional[int] = ..., analyze_every_frame: _Optional[bool] = ..., update_every_frames: _Optional[int] = ..., acknowledge_frames: _Optional[bool] = ..., still_images: _Optional[bool] = ...) -> None: ...

class RawImage(_message.Message):
    __slots__ = ("width", "height", "format", "data")
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    width: int
    height: int
    format: PixelFormat
    data: bytes
    def __init__(self, width: _Optional[int] = ..., height: _Optional[int] = ..., format: _Optional[_Union[PixelFormat, str]] = ..., data: _Optional[bytes] = ...) -> None: ...

class Frame(_message.Message):
    __slots__ = ("index", "timestamp_us", "jpeg", "png", "raw")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_US_FIELD_NUMBER: _ClassVar[int]
    JPEG_FIELD_NUMBER: _ClassVar[int]
    PNG_FIELD_NUMBER: _ClassVar[int]
    RAW_FIELD_NUMBER: _ClassVar[int]
    index: int
    timestamp_us: int
    jpeg: bytes
    png: bytes
    raw: RawImage
    def __init__(self, index: _Optional[int] = ..., timestamp_us: _Optional[int] = ..., jpeg: _Optional[bytes] = ..., png: _Optional[bytes] = ..., raw: _Optional[_Union[RawImage, _Mapping]] = ...) -> None: ...

class ScreenImagesRequest(_message.Message):
    __slots__ = ("options", "images")
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    options: SessionOptions
    images: _containers.RepeatedCompositeFieldContainer[Frame]
    def __init__(self, options: _Optional[_Union[SessionOptions, _Mapping]] = ..., images: _Optional[_Iterable[_Union[Frame, _Mapping]]] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ScreenResponse(_message.Message):
    __slots__ = ("frame_result", "subject", "frame_ack")
    FRAME_RESULT_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    FRAME_ACK_FIELD_NUMBER: _ClassVar[int]
    frame_result: FrameResult
    subject: SubjectResult
    frame_ack: FrameAck
    def __init__(self, frame_result: _Optional[_Union[FrameResult, _Mapping]] = ..., subject: _Optional[_Union[SubjectResult, _Mapping]] = ..., frame_ack: _Optional[_Union[FrameAck, _Mapping]] = ...) -> None: ...

class FrameAck(_message.Message):
    __slots__ = ("index", "timestamp_us")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_US_FIELD_NUMBER: _ClassVar[int]
    index: int
    timestamp_us: int
    def __init__(self, index: _Optional[int] = ..., timestamp_us: _Optional[int] = ...) -> None: ...

class Box(_message.Message):
    __slots__ = ("x", "y", "width", "height")
    X_FIELD_NUMBER: _ClassVar[int]
    Y_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    x: float
    y: float
    width: float
    height: float
    def __init__(self, x: _Optional[float] = ..., y: _Optional[float] = ..., width: _Optional[float] = ..., height: _Optional[float] = ...) -> None: ...

class HeadPose(_message.Message):
    __slots__ = ("yaw_deg", "pitch_deg", "roll_deg")
    YAW_DEG_FIELD_NUMBER: _ClassVar[int]
    PITCH_DEG_FIELD_NUMBER: _ClassVar[int]
    ROLL_DEG_FIELD_NUMBER: _ClassVar[int]
    yaw_deg: float
    pitch_deg: float
    roll_deg: float
    def __init__(self, yaw_deg: _Optional[float] = ..., pitch_deg: _Optional[float] = ..., roll_deg: _Optional[float] = ...) -> None: ...

class Quality(_message.Message):
    __slots__ = ("score", "sharpness", "exposure", "face_size", "pose", "confidence")
    SCORE_FIELD_NUMBER: _ClassVar[int]
    SHARPNESS_FIELD_NUMBER: _ClassVar[int]
    EXPOSURE_FIELD_NUMBER: _ClassVar[int]
    FACE_SIZE_FIELD_NUMBER: _ClassVar[int]
    POSE_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    score: float
    sharpness: float
    exposure: float
    face_size: float
    pose: float
    confidence: float
    def __init__(self, score: _Optional[float] = ..., sharpness: _Optional[float] = ..., exposure: _Optional[float] = ..., face_size: _Optional[float] = ..., pose: _Optional[float] = ..., confidence: _Optional[float] = ...) -> None: ...

class SeverityProbabilities(_message.Message):
    __slots__ = ("p1", "p2", "p3")
    P1_FIELD_NUMBER: _ClassVar[int]
    P2_FIELD_NUMBER: _ClassVar[int]
    P3_FIELD_NUMBER: _ClassVar[int]
    p1: float
    p2: float
    p3: float
    def __init__(self, p1: _Optional[float] = ..., p2: _Optional[float] = ..., p3: _Optional[float] = ...) -> None: ...

class FrameResult(_message.Message):
    __slots__ = ("index", "timestamp_us", "status", "reject_reason", "detail", "face_count", "box", "quality", "pose", "probabilities", "predicted_score", "expected_score", "latency_ms")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_US_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    REJECT_REASON_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    FACE_COUNT_FIELD_NUMBER: _ClassVar[int]
    BOX_FIELD_NUMBER: _ClassVar[int]
    QUALITY_FIELD_NUMBER: _ClassVar[int]
    POSE_FIELD_NUMBER: _ClassVar[int]
    PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_SCORE_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_SCORE_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    index: int
    timestamp_us: int
    status: FrameStatus
    reject_reason: RejectReason
    detail: str
    face_count: int
    box: Box
    quality: Quality
    pose: HeadPose
    probabilities: SeverityProbabilities
    predicted_score: int
    expected_score: float
    latency_ms: float
    def __init__(self, index: _Optional[int] = ..., timestamp_us: _Optional[int] = ..., status: _Optional[_Union[FrameStatus, str]] = ..., reject_reason: _Optional[_Union[RejectReason, str]] = ..., detail: _Optional[str] = ..., face_count: _Optional[int] = ..., box: _Optional[_Union[Box, _Mapping]] = ..., quality: _Optional[_Union[Quality, _Mapping]] = ..., pose: _Optional[_Union[HeadPose, _Mapping]] = ..., probabilities: _Optional[_Union[SeverityProbabilities, _Mapping]] = ..., predicted_score: _Optional[int] = ..., expected_score: _Optional[float] = ..., latency_ms: _Optional[float] = ...) -> None: ...

class RejectCount(_message.Message):
    __slots__ = ("reason", "count")
    REASON_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    reason: RejectReason
    count: int
    def __init__(self, reason: _Optional[_Union[RejectReason, str]] = ..., count: _Optional[int] = ...) -> None: ...

class ScoreInterval(_message.Message):
    __slots__ = ("low", "high", "confidence")
    LOW_FIELD_NUMBER: _ClassVar[int]
    HIGH_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    low: float
    high: float
    confidence: float
    def __init__(self, low: _Optional[float] = ..., high: _Optional[float] = ..., confidence: _Optional[float] = ...) -> None: ...

class SubjectResult(_message.Message):
    __slots__ = ("subject_id", "status", "predicted_score", "expected_score", "probabilities", "expected_score_interval", "frames_received", "frames_analyzed", "frames_skipped", "rejected", "model", "faces_seen_max")
    SUBJECT_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_SCORE_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_SCORE_FIELD_NUMBER: _ClassVar[int]
    PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_SCORE_INTERVAL_FIELD_NUMBER: _ClassVar[int]
    FRAMES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    FRAMES_ANALYZED_FIELD_NUMBER: _ClassVar[int]
    FRAMES_SKIPPED_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    FACES_SEEN_MAX_FIELD_NUMBER: _ClassVar[int]
    subject_id: str
    status: SubjectStatus
    predicted_score: int
    expected_score: float
    probabilities: SeverityProbabilities
    expected_score_interval: ScoreInterval
    frames_received: int
    frames_analyzed: int
    frames_skipped: int
    rejected: _containers.RepeatedCompositeFieldContainer[RejectCount]
    model: ModelRef
    faces_seen_max: int
    def __init__(self, subject_id: _Optional[str] = ..., status: _Optional[_Union[SubjectStatus, str]] = ..., predicted_score: _Optional[int] = ..., expected_score: _Optional[float] = ..., probabilities: _Optional[_Union[SeverityProbabilities, _Mapping]] = ..., expected_score_interval: _Optional[_Union[ScoreInterval, _Mapping]] = ..., frames_received: _Optional[int] = ..., frames_analyzed: _Optional[int] = ..., frames_skipped: _Optional[int] = ..., rejected: _Optional[_Iterable[_Union[RejectCount, _Mapping]]] = ..., model: _Optional[_Union[ModelRef, _Mapping]] = ..., faces_seen_max: _Optional[int] = ...) -> None: ...

class ModelRef(_message.Message):
    __slots__ = ("name", "version", "kind", "sha256")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    kind: str
    sha256: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., kind: _Optional[str] = ..., sha256: _Optional[str] = ...) -> None: ...

class Preprocessing(_message.Message):
    __slots__ = ("input_size", "mean", "std", "channel_order", "box_height_expand", "alignment", "landmark_points")
    INPUT_SIZE_FIELD_NUMBER: _ClassVar[int]
    MEAN_FIELD_NUMBER: _ClassVar[int]
    STD_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_ORDER_FIELD_NUMBER: _ClassVar[int]
    BOX_HEIGHT_EXPAND_FIELD_NUMBER: _ClassVar[int]
    ALIGNMENT_FIELD_NUMBER: _ClassVar[int]
    LANDMARK_POINTS_FIELD_NUMBER: _ClassVar[int]
    input_size: int
    mean: float
    std: float
    channel_order: str
    box_height_expand: float
    alignment: str
    landmark_points: int
    def __init__(self, input_size: _Optional[int] = ..., mean: _Optional[float] = ..., std: _Optional[float] = ..., channel_order: _Optional[str] = ..., box_height_expand: _Optional[float] = ..., alignment: _Optional[str] = ..., landmark_points: _Optional[int] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("model", "class_labels", "preprocessing", "temperature", "architecture", "intended_use", "notices", "arithmetic")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CLASS_LABELS_FIELD_NUMBER: _ClassVar[int]
    PREPROCESSING_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    INTENDED_USE_FIELD_NUMBER: _ClassVar[int]
    NOTICES_FIELD_NUMBER: _ClassVar[int]
    ARITHMETIC_FIELD_NUMBER: _ClassVar[int]
    model: ModelRef
    class_labels: _containers.RepeatedScalarFieldContainer[str]
    preprocessing: Preprocessing
    temperature: float
    architecture: str
    intended_use: str
    notices: _containers.RepeatedScalarFieldContainer[str]
    arithmetic: str
    def __init__(self, model: _Optional[_Union[ModelRef, _Mapping]] = ..., class_labels: _Optional[_Iterable[str]] = ..., preprocessing: _Optional[_Union[Preprocessing, _Mapping]] = ..., temperature: _Optional[float] = ..., architecture: _Optional[str] = ..., intended_use: _Optional[str] = ..., notices: _Optional[_Iterable[str]] = ..., arithmetic: _Optional[str] = ...) -> None: ...
