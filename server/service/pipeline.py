"""One frame's way through the compute stages: decode → face analysis → crop → batcher.

Results are delivered through a callback, synchronously for frames rejected
before the model and from the batcher thread for analysed ones, so a stream's
worker never waits on the model.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from typing import Protocol

import numpy as np

from ..errors import INFERENCE_FAILED, AcroscreenError, ModelError, Overloaded
from ..metrics import SKIPPED_STREAM_ENDED, Metrics
from ..runtime.decode import PREVIEW_SCALE, DecodeLimits, decode_preview_grey, decode_scaled
from ..runtime.preprocess import FaceAnalysis, FacePreprocessor, scene_thumbnail
from ..runtime.quality import preview_sharpness
from ..runtime.tracking import FaceTracker
from ..runtime.types import FrameRejected, RejectReason
from .aggregator import SubjectAggregator
from .types import FrameInput, FramePrediction, FrameStatus

log = logging.getLogger(__name__)

Probabilities = tuple[float, float, float]
Deliver = Callable[[FramePrediction], None]


class ModelQueue(Protocol):
    """Where crops go for the model: the in-process `DynamicBatcher` or a worker's `ModelProcessClient`."""

    def submit(self, item: np.ndarray, owner: Hashable = None) -> Future[Probabilities]: ...


class FrameAnalyzer:
    """Shared by all streams; per-stream state lives in the tracker and aggregator passed in."""

    def __init__(
        self,
        *,
        preprocessor: FacePreprocessor,
        batcher: ModelQueue,
        decode_limits: DecodeLimits,
        metrics: Metrics,
    ) -> None:
        self._preprocessor = preprocessor
        self._batcher = batcher
        self._decode_limits = decode_limits
        self._metrics = metrics

    def new_tracker(self) -> FaceTracker:
        return self._preprocessor.settings.new_tracker()

    def preview_score(self, frame: FrameInput, tracker: FaceTracker) -> float:
        """How sharp the frame looks where the face was last seen; -inf when it cannot be read.

        Called by a stream's reader while its worker may be updating the tracker: only
        the subject reference is read, which is replaced whole, never changed in place.
        """
        started = time.monotonic()
        try:
            preview = decode_preview_grey(frame.image, self._decode_limits)
        except FrameRejected:
            return float("-inf")  # the frame loses to any readable one; analysed, it is rejected with its reason
        except Exception:  # noqa: BLE001 — a bug here must not cost the stream
            log.exception("preview of a frame failed")
            return float("-inf")
        finally:
            self._metrics.stage_seconds.labels(stage="preview").observe(time.monotonic() - started)
        subject = tracker.subject
        return preview_sharpness(preview, subject.box if subject is not None else None, PREVIEW_SCALE)

    def analyze(
        self, frame: FrameInput, tracker: FaceTracker | None, aggregator: SubjectAggregator, deliver: Deliver
    ) -> Future[Probabilities] | None:
        """Analyse one frame; `deliver` is called exactly once with its outcome.

        Returns the pending model result when the face went to the model (the
        caller may cancel it), None when the frame was settled without it.
        """
        stage = self._metrics.stage_seconds
        analysis: FaceAnalysis | None = None
        try:
            # Every thumbnail of a stream comes from the cheap reduced grey decode, so a stream
            # waiting for its next face search settles most frames without a full decode.
            scene = functools.cache(lambda: scene_thumbnail(decode_preview_grey(frame.image, self._decode_limits)))
            if tracker is not None and tracker.last_miss is not None:
                started = time.monotonic()
                analysis = self._preprocessor.deferred_search(tracker, scene)
                stage.labels(stage="scene_check").observe(time.monotonic() - started)
                if analysis is not None:
                    assert analysis.rejection is not None
                    raise FrameRejected(analysis.rejection, analysis.detail)
            started = time.monotonic()
            # A large followed face lets the frame decode smaller (keyframes decode in full).
            reduction = self._preprocessor.settings.decode_reduction(tracker)
            decoded = decode_scaled(frame.image, self._decode_limits, reduction)
            image = decoded.pixels
            stage.labels(stage="decode").observe(time.monotonic() - started)
            started = time.monotonic()
            analysis = self._preprocessor.analyze(image, tracker, decoded.scale, scene)
            stage.labels(stage="face_analysis").observe(time.monotonic() - started)
            for name, seconds in analysis.stage_seconds:
                stage.labels(stage=name).observe(seconds)
            if analysis.detection is not None:
                aggregator.add_faces(analysis.detection.face_count)
                self._metrics.faces_detected.inc(analysis.detection.face_count)
            if analysis.rejection is not None:
                raise FrameRejected(analysis.rejection, analysis.detail)
            crop = self._preprocessor.crop(image, analysis)  # warped during analysis, timed there as "warp"
            future = self._batcher.submit(crop.pixels, owner=aggregator)  # one aggregator per stream
        except FrameRejected as rejected:
            deliver(self._rejected(frame, aggregator, rejected.reason, rejected.detail, analysis))
            return None
        except Overloaded as overloaded:
            deliver(self._rejected(frame, aggregator, RejectReason.OVERLOADED, str(overloaded), analysis))
            return None
        except ModelError as error:
            deliver(self._rejected(frame, aggregator, RejectReason.INFERENCE_FAILED, str(error), analysis))
            return None
        except Exception:  # noqa: BLE001 — a bug must cost one frame, never the stream
            log.exception("analysis of a frame failed")
            deliver(self._rejected(frame, aggregator, RejectReason.INFERENCE_FAILED, "analysis failed (internal error)", analysis))
            return None
        accepted = analysis
        future.add_done_callback(lambda done: deliver(self._completed(frame, aggregator, accepted, done)))
        return future

    def _completed(
        self, frame: FrameInput, aggregator: SubjectAggregator, analysis: FaceAnalysis, done: Future[Probabilities]
    ) -> FramePrediction:
        if done.cancelled():  # its stream ended (client gone, deadline): no one waits for it, and the model did not fail
            self._metrics.frames_skipped.labels(policy=SKIPPED_STREAM_ENDED).inc()
            return self._rejected(frame, aggregator, RejectReason.INFERENCE_FAILED, "cancelled", analysis, counted=False)
        error = done.exception()
        if isinstance(error, Overloaded):  # shed from the full inference queue
            return self._rejected(frame, aggregator, RejectReason.OVERLOADED, str(error), analysis)
        if error is not None:  # only our own errors are worded for clients; the batcher logged the cause
            detail = str(error) if isinstance(error, AcroscreenError) else INFERENCE_FAILED
            return self._rejected(frame, aggregator, RejectReason.INFERENCE_FAILED, detail, analysis)
        probabilities = done.result()
        quality = analysis.quality
        aggregator.add_prediction(
            probabilities, quality.score if quality is not None else 1.0, received_at=frame.received_at
        )
        self._metrics.frames_analyzed.inc()
        latency = time.monotonic() - frame.received_at
        self._metrics.stage_seconds.labels(stage="end_to_end").observe(latency)
        return FramePrediction(
            index=frame.index,
            timestamp_us=frame.timestamp_us,
            status=FrameStatus.ANALYZED,
            face_count=analysis.detection.face_count if analysis.detection else 0,
            box=analysis.detection.box if analysis.detection else None,
            quality=analysis.quality,
            pose=analysis.pose,
            probabilities=probabilities,
            latency_ms=latency * 1000.0,
        )

    def _rejected(
        self,
        frame: FrameInput,
        aggregator: SubjectAggregator,
        reason: RejectReason,
        detail: str,
        analysis: FaceAnalysis | None,
        *,
        counted: bool = True,
    ) -> FramePrediction:
        """The rejection answer; ``counted`` False for a frame no one will see (already counted as skipped)."""
        if counted:
            aggregator.add_rejected(reason)
            self._metrics.frames_rejected.labels(reason=reason.value).inc()
        detection = analysis.detection if analysis is not None else None
        return FramePrediction(
            index=frame.index,
            timestamp_us=frame.timestamp_us,
            status=FrameStatus.REJECTED,
            reject_reason=reason,
            detail=detail,
            face_count=detection.face_count if detection else 0,
            box=detection.box if detection else None,
            quality=analysis.quality if analysis is not None else None,
            pose=analysis.pose if analysis is not None else None,
            latency_ms=(time.monotonic() - frame.received_at) * 1000.0,
        )


def model_batch_runner(predict: Callable[..., object]) -> Callable[[Sequence[np.ndarray]], list[Probabilities]]:
    """Adapt the model's batch predict (uint8 N×S×S×3 RGB → .probabilities N×3) to the batcher."""

    def run(crops: Sequence[np.ndarray]) -> list[Probabilities]:
        probabilities = predict(np.stack(crops)).probabilities  # type: ignore[attr-defined]
        return [(float(p[0]), float(p[1]), float(p[2])) for p in probabilities]

    return run
