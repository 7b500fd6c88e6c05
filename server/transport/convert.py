"""Proto ↔ domain conversion. The only place that knows both shapes."""

from __future__ import annotations

import time

from acroscreen.v1 import screening_pb2 as pb

from ..errors import InvalidRequest
from ..runtime.types import (
    Box,
    EncodedImage,
    HeadPose,
    ImageEncoding,
    PixelFormat,
    Quality,
    RejectReason,
)
from ..service.types import (
    FrameAck,
    FrameInput,
    FramePrediction,
    FrameStatus,
    ModelInfo,
    ModelRef,
    SessionOptions,
    SubjectResult,
    SubjectStatus,
)

_PIXEL_FORMATS = {
    pb.PIXEL_FORMAT_BGR24: PixelFormat.BGR24,
    pb.PIXEL_FORMAT_RGB24: PixelFormat.RGB24,
    pb.PIXEL_FORMAT_GRAY8: PixelFormat.GRAY8,
}
_REJECT_REASONS = {reason: pb.RejectReason.Value("REJECT_REASON_" + reason.name) for reason in RejectReason}
_FRAME_STATUS = {status: pb.FrameStatus.Value("FRAME_STATUS_" + status.name) for status in FrameStatus}
_SUBJECT_STATUS = {status: pb.SubjectStatus.Value("SUBJECT_STATUS_" + status.name) for status in SubjectStatus}


def session_options(message: pb.SessionOptions) -> SessionOptions:
    return SessionOptions(
        subject_id=message.subject_id,
        max_analyzed_frames=message.max_analyzed_frames,
        min_analysis_interval_ms=message.min_analysis_interval_ms,
        analyze_every_frame=message.analyze_every_frame,
        update_every_frames=message.update_every_frames,
        acknowledge_frames=message.acknowledge_frames,
        still_images=message.still_images,
    )


def frame_input(message: pb.Frame) -> FrameInput:
    """Never raises for bad pixels: those become per-frame rejections downstream."""
    which = message.WhichOneof("image")
    if which == "jpeg":
        image = EncodedImage(ImageEncoding.JPEG, message.jpeg)
    elif which == "png":
        image = EncodedImage(ImageEncoding.PNG, message.png)
    elif which == "raw":
        raw = message.raw
        image = EncodedImage(
            ImageEncoding.RAW, raw.data, raw.width, raw.height, _PIXEL_FORMATS.get(raw.format)
        )
    else:
        image = EncodedImage(ImageEncoding.RAW, b"")
    return FrameInput(
        index=message.index, timestamp_us=message.timestamp_us, image=image, received_at=time.monotonic()
    )


def first_options(request: pb.ScreenRequest) -> SessionOptions:
    if request.WhichOneof("payload") != "options":
        raise InvalidRequest("the first message of a stream must carry options")
    return session_options(request.options)


def frame_of(request: pb.ScreenRequest) -> FrameInput:
    which = request.WhichOneof("payload")
    if which == "options":
        raise InvalidRequest("options may only be sent once, as the first message")
    if which != "frame":
        raise InvalidRequest("a request must carry options or a frame")
    return frame_input(request.frame)


def frame_result(prediction: FramePrediction) -> pb.ScreenResponse:
    message = pb.FrameResult(
        index=prediction.index,
        timestamp_us=prediction.timestamp_us,
        status=_FRAME_STATUS[prediction.status],
        reject_reason=_REJECT_REASONS[prediction.reject_reason] if prediction.reject_reason else 0,
        detail=prediction.detail,
        face_count=prediction.face_count,
        predicted_score=prediction.predicted_score,
        expected_score=prediction.expected_score,
        latency_ms=prediction.latency_ms,
    )
    if prediction.box is not None:
        message.box.CopyFrom(_box(prediction.box))
    if prediction.quality is not None:
        message.quality.CopyFrom(_quality(prediction.quality))
    if prediction.pose is not None:
        message.pose.CopyFrom(_pose(prediction.pose))
    if prediction.probabilities is not None:
        message.probabilities.CopyFrom(_probabilities(prediction.probabilities))
    return pb.ScreenResponse(frame_result=message)


def frame_ack(ack: FrameAck) -> pb.ScreenResponse:
    return pb.ScreenResponse(frame_ack=pb.FrameAck(index=ack.index, timestamp_us=ack.timestamp_us))


def subject_result(result: SubjectResult) -> pb.SubjectResult:
    message = pb.SubjectResult(
        subject_id=result.subject_id,
        status=_SUBJECT_STATUS[result.status],
        predicted_score=result.predicted_score,
        expected_score=result.expected_score,
        probabilities=_probabilities(result.probabilities),
        frames_received=result.frames_received,
        frames_analyzed=result.frames_analyzed,
        frames_skipped=result.frames_skipped,
        rejected=[
            pb.RejectCount(reason=_REJECT_REASONS[reason], count=count)
            for reason, count in sorted(result.rejected.items(), key=lambda item: item[0].name)
        ],
        faces_seen_max=result.faces_seen_max,
    )
    if result.expected_score_interval is not None:
        interval = result.expected_score_interval
        message.expected_score_interval.CopyFrom(
            pb.ScoreInterval(low=interval.low, high=interval.high, confidence=interval.confidence)
        )
    if result.model is not None:
        message.model.CopyFrom(_model_ref(result.model))
    return message


def model_info(info: ModelInfo) -> pb.ModelInfo:
    p = info.preprocessing
    return pb.ModelInfo(
        model=_model_ref(info.model),
        class_labels=list(info.class_labels),
        preprocessing=pb.Preprocessing(
            input_size=p.input_size,
            mean=p.mean,
            std=p.std,
            channel_order=p.channel_order,
            box_height_expand=p.box_height_expand,
            alignment=p.alignment,
            landmark_points=p.landmark_points,
        ),
        temperature=info.temperature,
        arithmetic=info.arithmetic,
        architecture=info.architecture,
        intended_use=info.intended_use,
        notices=list(info.notices),
    )


def _model_ref(ref: ModelRef) -> pb.ModelRef:
    return pb.ModelRef(name=ref.name, version=ref.version, kind=ref.kind, sha256=ref.sha256)


def _box(box: Box) -> pb.Box:
    return pb.Box(x=box.x, y=box.y, width=box.width, height=box.height)


def _quality(quality: Quality) -> pb.Quality:
    return pb.Quality(
        score=quality.score,
        sharpness=quality.sharpness,
        exposure=quality.exposure,
        face_size=quality.face_size,
        pose=quality.pose,
        confidence=quality.confidence,
    )


def _pose(pose: HeadPose) -> pb.HeadPose:
    return pb.HeadPose(yaw_deg=pose.yaw_deg, pitch_deg=pose.pitch_deg, roll_deg=pose.roll_deg)


def _probabilities(probabilities: tuple[float, float, float]) -> pb.SeverityProbabilities:
    return pb.SeverityProbabilities(p1=probabilities[0], p2=probabilities[1], p3=probabilities[2])
