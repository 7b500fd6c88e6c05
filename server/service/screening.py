"""The data plane: everything the transport calls, with no gRPC in sight."""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future

from ..errors import AcroscreenError, Cancelled, InvalidRequest, NotReady, Overloaded
from ..metrics import Metrics
from .aggregator import SubjectAggregator
from .pipeline import FrameAnalyzer
from .session import StreamLimits, StreamSession
from .types import FrameInput, FramePrediction, ModelInfo, SessionOptions, SubjectResult

MAX_SUBJECT_ID_LENGTH = 128


class CallSlots:
    """Calls of one kind under way, in all and per caller, capped at `limit` and `per_caller`
    (0: no per-caller cap); a refusal is Overloaded with the wait a client should retry after.
    Not locked itself: its owner's lock guards it (the service's; admission's in the transport)."""

    def __init__(self, *, noun: str, state: str, limit: int, per_caller: int, retry_after_s: float,
                 caller_retry_after_s: float) -> None:
        self._noun, self._state = noun, state
        self._limit, self._per_caller = limit, per_caller
        self._retry_after_s, self._caller_retry_after_s = retry_after_s, caller_retry_after_s
        self._callers: collections.Counter[str] = collections.Counter()
        self.count = 0

    def take(self, principal: str) -> None:
        self.check(principal)
        self.count += 1
        self._callers[principal] += 1

    def check(self, principal: str) -> None:
        """Overloaded if `take(principal)` would be refused now."""
        if self.count >= self._limit:
            raise Overloaded(f"{self._limit} {self._noun} are {self._state}; try again later",
                             retry_after_s=self._retry_after_s)
        if self._per_caller and self._callers[principal] >= self._per_caller:
            raise Overloaded(f"this caller already has {self._per_caller} {self._noun} {self._state}",
                             retry_after_s=self._caller_retry_after_s)

    def give_back(self, principal: str) -> None:
        self.count -= 1
        self._callers[principal] -= 1
        if not self._callers[principal]:
            del self._callers[principal]


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
        self._limits = limits
        self._stream_slots = CallSlots(noun="streams", state="open", limit=max_streams,
                                        per_caller=max_streams_per_principal, retry_after_s=2.0,
                                        caller_retry_after_s=5.0)
        # A ScreenImages call lasts seconds, not minutes like a stream: its refusals say retry sooner.
        self._image_slots = CallSlots(noun="ScreenImages calls", state="under way", limit=max_streams,
                                       per_caller=max_streams_per_principal, retry_after_s=1.0,
                                       caller_retry_after_s=1.0)
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
            return self._image_slots.count

    def open_stream(self, options: SessionOptions, principal: str) -> StreamSession:
        """principal: who is calling (a token hash), for the per-caller quota."""
        _check_options(options)
        with self._lock:
            if not self._accepting:
                raise NotReady("the server is shutting down")
            self._stream_slots.take(principal)
            session = StreamSession(
                options=options,
                analyzer=self._analyzer,
                # A photo set is scored from one photograph, as ScreenImages scores it.
                aggregator=SubjectAggregator(options.subject_id, self._model_info.model,
                                             1 if options.still_images else self._min_frames,
                                             frames_independent=options.still_images),
                backlog_size=self._backlog,
                update_every_frames=options.update_every_frames or self._update_every,
                limits=self._limits,
                metrics=self._metrics,
                on_close=self._closed,
            )
            self._sessions[session] = principal
            self._metrics.active_streams.set(len(self._sessions))
        return session

    def _closed(self, session: StreamSession) -> None:
        with self._lock:
            principal = self._sessions.pop(session, None)
            if principal is not None:
                self._stream_slots.give_back(principal)
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
        check_image_count(len(frames))
        self._admit_image_call(principal)
        try:
            return self._analyze_images(options, frames, on_call_end)
        finally:
            self._end_image_call(principal)

    def _admit_image_call(self, principal: str) -> None:
        with self._lock:
            if not self._accepting:
                raise NotReady("the server is shutting down")
            self._image_slots.take(principal)

    def _end_image_call(self, principal: str) -> None:
        with self._lock:
            self._image_slots.give_back(principal)

    def _analyze_images(
        self,
        options: SessionOptions,
        frames: Sequence[FrameInput],
        on_call_end: Callable[[Callable[[], None]], bool],
    ) -> SubjectResult:
        aggregator = SubjectAggregator(options.subject_id, self._model_info.model, min_frames_for_score=1,
                                       frames_independent=True)
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

    def end_streams(self, reason: AcroscreenError) -> None:
        """End every open stream with its final result, then ``reason`` (a shutdown past its grace)."""
        with self._lock:
            sessions = list(self._sessions)
        for session in sessions:
            session.finish(ended_by=reason)

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


# A few photographs a request: each is analysed before the call answers, so a request of a
# million empty images (2 bytes each on the wire) held a handler for minutes. Larger sets go as a
# still-image stream, whose frames count against the stream limits.
MAX_IMAGES_PER_REQUEST = 64


def check_image_count(count: int) -> None:
    """Refuse a ScreenImages request of more than MAX_IMAGES_PER_REQUEST images (before they are read)."""
    if count > MAX_IMAGES_PER_REQUEST:
        raise InvalidRequest(
            f"{count} images in one request; at most {MAX_IMAGES_PER_REQUEST}: send a larger set as a stream of still images"
        )


def _check_options(options: SessionOptions) -> None:
    if len(options.subject_id) > MAX_SUBJECT_ID_LENGTH:
        raise InvalidRequest(f"subject_id longer than {MAX_SUBJECT_ID_LENGTH} characters")
