"""The data plane: everything the transport calls, with no gRPC in sight."""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future

from ..errors import Cancelled, InvalidRequest, NotReady, Overloaded
from ..metrics import Metrics
from .aggregator import SubjectAggregator
from .pipeline import FrameAnalyzer
from .session import StreamLimits, StreamSession
from .types import FrameInput, FramePrediction, ModelInfo, SessionOptions, SubjectResult

MAX_SUBJECT_ID_LENGTH = 128
# Seconds a refused ScreenImages call is told to wait: such a call lasts seconds, not minutes like a stream.
_IMAGES_RETRY_AFTER_S = 1.0


class ScreeningService:
    """Opens streams and runs ScreenImages calls, each kind capped at `max_streams` at once (and at
    `max_streams_per_principal` per caller when set), so a flood of either is refused with Overloaded
    at once instead of piling up its photographs, and never crowds out the other kind or health checks."""

    def __init__(
        self,
        *,
        analyzer: FrameAnalyzer,
        model_info: ModelInfo,
        metrics: Metrics,
        max_streams: int,
        max_streams_per_principal: int,
        limits: StreamLimits,
        analysis_backlog: int,
        update_every_frames: int,
        min_frames_for_score: int,
    ) -> None:
        self._analyzer = analyzer
        self._model_info = model_info
        self._metrics = metrics
        self._max_streams = max_streams
        self._max_per_principal = max_streams_per_principal
        self._limits = limits
        self._per_principal: collections.Counter[str] = collections.Counter()
        self._image_calls = 0
        self._image_calls_per_principal: collections.Counter[str] = collections.Counter()
        self._backlog = analysis_backlog
        self._update_every = update_every_frames
        self._min_frames = min_frames_for_score
        self._lock = threading.Lock()
        self._sessions: dict[StreamSession, str] = {}
        self._accepting = True
        self._idle = threading.Condition(self._lock)
        metrics.queue_depth.labels(queue="analysis").set_function(self._backlog_depth)

    def _backlog_depth(self) -> int:
        with self._lock:
            return sum(session.backlog_depth for session in self._sessions)

    @property
    def model_info(self) -> ModelInfo:
        return self._model_info

    @property
    def active_streams(self) -> int:
        with self._lock:
            return len(self._sessions)

    @property
    def active_image_calls(self) -> int:
        with self._lock:
            return self._image_calls

    def open_stream(self, options: SessionOptions, principal: str) -> StreamSession:
        """principal: who is calling (a token hash), for the per-caller quota."""
        _check_options(options)
        with self._lock:
            if not self._accepting:
                raise NotReady("the server is shutting down")
            if len(self._sessions) >= self._max_streams:
                raise Overloaded(f"{self._max_streams} streams are open; try again later", retry_after_s=2.0)
            if self._max_per_principal and self._per_principal[principal] >= self._max_per_principal:
                raise Overloaded(
                    f"this caller already has {self._max_per_principal} streams open", retry_after_s=5.0
                )
            session = StreamSession(
                options=options,
                analyzer=self._analyzer,
                aggregator=SubjectAggregator(options.subject_id, self._model_info.model, self._min_frames),
                backlog_size=self._backlog,
                update_every_frames=options.update_every_frames or self._update_every,
                limits=self._limits,
                metrics=self._metrics,
                on_close=self._closed,
            )
            self._sessions[session] = principal
            self._per_principal[principal] += 1
            self._metrics.active_streams.set(len(self._sessions))
        return session

    def _closed(self, session: StreamSession) -> None:
        with self._lock:
            principal = self._sessions.pop(session, None)
            if principal is not None:
                self._per_principal[principal] -= 1
                if not self._per_principal[principal]:
                    del self._per_principal[principal]
            self._metrics.active_streams.set(len(self._sessions))
            self._idle.notify_all()

    def screen_images(
        self,
        options: SessionOptions,
        frames: Sequence[FrameInput],
        principal: str,
        on_call_end: Callable[[Callable[[], None]], bool],
    ) -> SubjectResult:
        """Analyse every photograph (no rate policy) and return the final subject result.

        principal: who is calling (a token hash), for the per-caller quota. on_call_end(callback)
        runs callback once the call has ended, returning False if it already has. The call ending
        before the result is made means the caller went away or its deadline passed: then no further
        photograph is analysed, faces waiting for the model give up their places, and Cancelled is
        raised at once (nobody is left to read a result).
        """
        _check_options(options)
        if not frames:
            raise InvalidRequest("ScreenImages needs at least one image")
        self._admit_image_call(principal)
        try:
            return self._analyze_images(options, frames, on_call_end)
        finally:
            self._end_image_call(principal)

    def _admit_image_call(self, principal: str) -> None:
        with self._lock:
            if not self._accepting:
                raise NotReady("the server is shutting down")
            if self._image_calls >= self._max_streams:
                raise Overloaded(
                    f"{self._max_streams} ScreenImages calls are under way; try again later",
                    retry_after_s=_IMAGES_RETRY_AFTER_S,
                )
            if self._max_per_principal and self._image_calls_per_principal[principal] >= self._max_per_principal:
                raise Overloaded(
                    f"this caller already has {self._max_per_principal} ScreenImages calls under way",
                    retry_after_s=_IMAGES_RETRY_AFTER_S,
                )
            self._image_calls += 1
            self._image_calls_per_principal[principal] += 1

    def _end_image_call(self, principal: str) -> None:
        with self._lock:
            self._image_calls -= 1
            self._image_calls_per_principal[principal] -= 1
            if not self._image_calls_per_principal[principal]:
                del self._image_calls_per_principal[principal]

    def _analyze_images(
        self,
        options: SessionOptions,
        frames: Sequence[FrameInput],
        on_call_end: Callable[[Callable[[], None]], bool],
    ) -> SubjectResult:
        aggregator = SubjectAggregator(options.subject_id, self._model_info.model, min_frames_for_score=1)
        # Released once per answered photograph, and once when the call ends: the wait below
        # wakes for either, so an abandoned call is noticed at once without polling.
        progress = threading.Semaphore(0)
        abandoned = threading.Event()

        def abandon() -> None:
            abandoned.set()
            progress.release()

        if not on_call_end(abandon):
            abandon()

        def deliver(_: FramePrediction) -> None:
            progress.release()

        answers_due = 0
        waiting: list[Future] = []
        for frame in frames:
            if abandoned.is_set():
                break
            aggregator.add_received()
            self._metrics.frames_received.inc()
            answers_due += 1
            future = self._analyzer.analyze(frame, None, aggregator, deliver)
            if future is not None:
                waiting.append(future)
        while answers_due and not abandoned.is_set():
            progress.acquire()
            answers_due -= 1  # or the call ended, and the loop stops on that
        if abandoned.is_set():
            for future in waiting:
                future.cancel()  # the batcher skips them, and a full queue reuses their places
            raise Cancelled("the caller went away before every image was analysed")
        result = aggregator.result(final=True)
        self._metrics.subjects_completed.labels(predicted_score=str(result.predicted_score)).inc()
        return result

    def stop_accepting(self) -> None:
        with self._lock:
            self._accepting = False

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait until every open stream has ended; False if the time ran out."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while self._sessions:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._idle.wait(remaining)
        return True


def _check_options(options: SessionOptions) -> None:
    if len(options.subject_id) > MAX_SUBJECT_ID_LENGTH:
        raise InvalidRequest(f"subject_id longer than {MAX_SUBJECT_ID_LENGTH} characters")
