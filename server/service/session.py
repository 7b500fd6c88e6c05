"""One stream's state: options, tracker, aggregator, bounded analysis backlog.

The reader (the transport's thread) never waits for the model: it counts the
frame, applies the analysis-rate policy and puts the frame into a bounded
backlog. Under a rate limit (``max_analysis_fps`` or the stream's
``min_analysis_interval_ms``) it looks at a reduced grey preview of each frame so
that the sharpest frame of each interval is the one analysed (``selection``).
When the backlog is full the frame is acknowledged as SKIPPED, unless the client
asked for every frame to be analysed, in which case the reader waits for room
(gRPC flow control then slows the sender); it also stops reading while the
client leaves too many answers unread. A worker thread per stream analyses
frames in order (the tracker needs that) and hands faces to the shared batcher
without waiting for results.

A stream ends in one of three ways. finish(): the client half-closed, a limit
was reached, or the stream sat idle; what is queued is analysed and the FINAL
result is sent. cancel(): the client went away; everything stops and is freed.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass

from ..errors import AcroscreenError, Overloaded
from ..logs import in_this_call
from ..metrics import SKIPPED_AT_CAP, SKIPPED_BACKLOG_FULL, SKIPPED_FOR_INTERVAL, SKIPPED_STREAM_ENDED, Metrics
from .aggregator import SubjectAggregator
from .pipeline import FrameAnalyzer
from .priority import lower_current_thread_priority
from .selection import BestFramePicker
from .types import (
    FrameAck,
    FrameInput,
    FramePrediction,
    FrameStatus,
    SessionOptions,
    SubjectResult,
)

StreamEvent = FrameAck | FramePrediction | SubjectResult
_END = object()
# Answers (acks, results, updates) queued for a client that does not read them: the batcher's
# deliveries never wait, but past this many the reader stops reading, and flow control slows the
# sender. Generous (~1 MB a stream), so a client that reads late but does read is not held up.
UNREAD_ANSWERS_HIGH_WATER = 4096


class StreamLimitReached(Overloaded):
    """A per-stream limit was reached: the stream is finished with its final result. No retry
    hint: the same video sent again meets the same limit (a live source opens a new stream)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, retry_after_s=None)


@dataclass(frozen=True, slots=True, kw_only=True)
class StreamLimits:
    max_frames: int = 108_000
    max_duration_s: float = 3600.0
    idle_timeout_s: float = 60.0
    max_analysis_fps: float = 0.0  # per stream; 0 = as many as the backlog takes


class StreamSession:
    def __init__(
        self,
        *,
        options: SessionOptions,
        analyzer: FrameAnalyzer,
        aggregator: SubjectAggregator,
        backlog_size: int,
        update_every_frames: int,
        limits: StreamLimits,
        metrics: Metrics,
        on_close: Callable[[StreamSession], None],
    ) -> None:
        self.options = options
        self._analyzer = analyzer
        self._aggregator = aggregator
        self._limits = limits
        self._metrics = metrics
        self._on_close = on_close
        self._update_every = max(1, update_every_frames)
        # Photographs are each analysed on their own, as ScreenImages does: a face's place in one
        # photograph says nothing about the next, so no face is followed from one to the next.
        self._tracker = None if options.still_images else analyzer.new_tracker()
        self._backlog: queue.Queue[FrameInput | object] = queue.Queue(maxsize=backlog_size)
        self._events: queue.Queue[StreamEvent | object] = queue.Queue()
        self._opened_at = time.monotonic()
        self._last_frame_at = self._opened_at
        self._received = 0
        self._selected = 0
        # Rate policies spread analysis over a video's capture time; photographs are each their own capture.
        interval_us = 0 if options.still_images else max(
            options.min_analysis_interval_ms * 1000, round(1e6 / limits.max_analysis_fps) if limits.max_analysis_fps else 0
        )
        self._picker = BestFramePicker(interval_us) if interval_us else None
        self._outstanding = 0
        self._max_in_flight = 2 * backlog_size  # enough for the batcher to fill batches across streams
        self._pending: set[Future] = set()
        self._outstanding_done = threading.Condition()
        # Held by the reader handing over a frame, by finish(), and by the worker ending an idle stream:
        # so the worker never ends a stream mid hand-over, and the picker (the reader offers, the other
        # two release) never releases a held frame before its ack is queued.
        self._submit_lock = threading.Lock()
        self._finishing = threading.Event()
        self._cancelled = threading.Event()
        self._closed = False
        # Why the server ended the stream before its client closed it (its duration limit met while
        # no frame came, a shutdown): the transport ends the call with it after the final result.
        self.ended_by: AcroscreenError | None = None
        self._worker = threading.Thread(target=in_this_call(self._work), name="acroscreen-stream", daemon=True)
        self._worker.start()

    # ---- reader side -------------------------------------------------------------
    def submit(self, frame: FrameInput) -> None:
        """Take a frame: queue it for analysis, hold it as its interval's best so far, or answer SKIPPED.

        Raises StreamLimitReached when a limit is hit; the caller then finishes the stream, after
        keeping the error (finishing first could end the call before the error is seen). Waits
        while the client leaves too many answers unread, so flow control slows its sending.
        """
        self._wait_for_the_client_to_read()
        with self._submit_lock:  # the worker must not end the stream while a frame is being handed over
            self._take(frame)

    def _wait_for_the_client_to_read(self) -> None:
        while self._events.qsize() >= UNREAD_ANSWERS_HIGH_WATER and not (self._cancelled.is_set() or self._finishing.is_set()):
            self._last_frame_at = time.monotonic()  # the server holds the frames back: the client is not idle
            time.sleep(0.01)

    def _take(self, frame: FrameInput) -> None:
        if self._finishing.is_set() or self._cancelled.is_set():
            return
        if self._received >= self._limits.max_frames:
            raise StreamLimitReached(f"stream limit of {self._limits.max_frames} frames reached")
        if self._expired():
            raise self._duration_limit()
        self._received += 1
        self._last_frame_at = time.monotonic()
        self._aggregator.add_received()
        self._metrics.frames_received.inc()
        if self._picker is None or self._cap_reached():  # no choice to make: no preview either
            self._select(frame, acknowledged=False)
            return
        assert self._tracker is not None  # video streams only: photographs have no analysis interval
        score = self._analyzer.preview_score(frame, self._tracker)
        offered = self._picker.offer(frame, score)  # under the submit lock: see __init__
        if offered.held and self.options.acknowledge_frames:
            self._events.put(FrameAck(index=frame.index, timestamp_us=frame.timestamp_us))
        if offered.passed_over is not None:
            self._skip(offered.passed_over, SKIPPED_FOR_INTERVAL)
        if offered.released is not None:
            self._select(offered.released, acknowledged=self.options.acknowledge_frames)

    def _select(self, frame: FrameInput, *, acknowledged: bool) -> None:
        """Queue a chosen frame for analysis, or answer SKIPPED with the policy that stopped it."""
        if not self._admit(frame):
            return
        waits_for_room = self.options.analyze_every_frame or self.options.still_images
        if not waits_for_room and self._backlog.full():
            self._selected -= 1
            self._skip(frame, SKIPPED_BACKLOG_FULL)
            return
        # The ack is queued before the frame: once queued, a frame may be answered at once (a
        # rejection) by the worker, and that answer must not overtake its ack.
        if self.options.acknowledge_frames and not acknowledged:
            self._events.put(FrameAck(index=frame.index, timestamp_us=frame.timestamp_us))
        self._enqueue(frame, wait=waits_for_room)

    def _admit(self, frame: FrameInput) -> bool:
        """Count a frame against the stream's analysis cap; False (answered SKIPPED) once it is reached."""
        if self._cap_reached():
            self._skip(frame, SKIPPED_AT_CAP)
            return False
        self._selected += 1
        return True

    def _cap_reached(self) -> bool:
        cap = self.options.max_analyzed_frames
        return bool(cap) and self._selected >= cap

    def _skip(self, frame: FrameInput, policy: str) -> None:
        self._aggregator.add_skipped()
        self._metrics.frames_skipped.labels(policy=policy).inc()
        self._events.put(
            FramePrediction(
                index=frame.index,
                timestamp_us=frame.timestamp_us,
                status=FrameStatus.SKIPPED,
                detail=f"not analysed ({policy.replace('_', ' ')})",
                latency_ms=(time.monotonic() - frame.received_at) * 1000.0,
            )
        )

    def _enqueue(self, frame: FrameInput, *, wait: bool) -> None:
        """Queue a frame the backlog has room for, or (``wait``) will have: only the reader queues
        frames, so room seen stays. A full backlog after all means the stream was cancelled
        (cancel() queues its end marker), and then nobody waits for an answer."""
        while not self._cancelled.is_set():
            try:
                self._backlog.put(frame, timeout=0.1 if wait else None, block=wait)
                return
            except queue.Full:
                if not wait:
                    break
        self._count_dropped(1)

    def _take_held(self) -> FrameInput | None:
        """The frame held as the best of the last interval, when the stream ends (submit lock held)."""
        return self._picker.release() if self._picker is not None else None

    def finish(self, ended_by: AcroscreenError | None = None) -> None:
        """Analyse what is queued, then send the final result (idempotent). ``ended_by``: the server
        ends the stream before its client closed it, and the call ends with that error after the
        result; a stream already finishing (half-closed, or a limit met) ends as it was going to."""
        with self._submit_lock:  # not while the worker ends the stream for idling (it takes the held frame then)
            if not self._finishing.is_set():
                self._finishing.set()
                self.ended_by = ended_by
                held = self._take_held()
                if held is not None:
                    self._select(held, acknowledged=self.options.acknowledge_frames)
                self._backlog.put(_END)

    def cancel(self) -> None:
        """The client went away: stop at once and free everything."""
        if self._cancelled.is_set():
            return
        self._cancelled.set()
        with self._outstanding_done:
            pending = list(self._pending)
        for future in pending:
            future.cancel()  # the batcher skips cancelled work
        dropped = 0
        while True:  # what is queued will not be analysed; the worker sees the end at once
            try:
                dropped += self._backlog.get_nowait() is not _END
            except queue.Empty:
                break
        # The frame held as its interval's best so far (under the lock, as the reader offers it; the
        # reader gives the lock up within 0.1 s of the cancel, so the wait is a bound, not a cost).
        if self._submit_lock.acquire(timeout=1.0):
            try:
                dropped += self._take_held() is not None
            finally:
                self._submit_lock.release()
        self._count_dropped(dropped)
        try:
            self._backlog.put_nowait(_END)
        except queue.Full:
            pass  # the reader queued a frame meanwhile: the worker skips it and ends on its next wait
        self._events.put(_END)

    @property
    def backlog_depth(self) -> int:
        return self._backlog.qsize()

    # ---- response side -----------------------------------------------------------
    def events(self) -> Iterator[StreamEvent]:
        """Frame results and subject updates, ending with the final subject result."""
        try:
            while True:
                event = self._events.get()
                if event is _END:
                    return
                yield event  # type: ignore[misc]
        finally:
            self.close()

    def close(self) -> None:
        """Stop the stream and give its slot back; idempotent (events() does it on its way out,
        the transport again for a call that ended before reading them)."""
        if self._closed:
            return
        self._closed = True
        self.cancel()
        self._worker.join(timeout=5.0)
        self._on_close(self)

    # ---- worker side -------------------------------------------------------------
    def _next_frame(self) -> FrameInput | object:
        """The next queued frame; finishes the stream when it idles or outlives its limit."""
        while True:
            try:
                return self._backlog.get(timeout=0.5)
            except queue.Empty:
                if self._cancelled.is_set():
                    return _END
                # Only between the reader's frames: a frame it is handing over is answered too.
                if not self._submit_lock.acquire(blocking=False):
                    continue
                try:
                    expired = self._expired()
                    if self._backlog.empty() and (expired or self._idle()):
                        if expired:  # the client is told, as when a frame arrives past the limit
                            self.ended_by = self._duration_limit()
                        self._finishing.set()
                        held = self._take_held()  # answered: analysed here, or SKIPPED by the cap
                        return held if held is not None and self._admit(held) else _END
                finally:
                    self._submit_lock.release()

    def _idle(self) -> bool:
        return time.monotonic() - self._last_frame_at > self._limits.idle_timeout_s

    def _expired(self) -> bool:
        return time.monotonic() - self._opened_at > self._limits.max_duration_s

    def _duration_limit(self) -> StreamLimitReached:
        return StreamLimitReached(f"stream limit of {self._limits.max_duration_s:.0f} s reached")

    def _work(self) -> None:
        lower_current_thread_priority()
        while True:
            frame = self._next_frame()
            if frame is _END:
                break
            if self._cancelled.is_set():
                self._count_dropped(1)  # taken as the stream was cancelled: never analysed
                continue
            with self._outstanding_done:
                # Bound this stream's share of the model queue, so a slow model
                # pushes back on the backlog (and so on the reader) instead.
                while self._outstanding >= self._max_in_flight and not self._cancelled.is_set():
                    self._outstanding_done.wait(timeout=0.1)
                self._outstanding += 1
            pending = self._analyzer.analyze(frame, self._tracker, self._aggregator, self._deliver)  # type: ignore[arg-type]
            if pending is not None:
                with self._outstanding_done:
                    self._pending.add(pending)
                pending.add_done_callback(self._forget)
                if self._cancelled.is_set():  # cancel() went over the pending ones before this one came
                    pending.cancel()
        with self._outstanding_done:
            while self._outstanding and not self._cancelled.is_set():
                self._outstanding_done.wait(timeout=0.1)
        if self._cancelled.is_set():
            return
        final = self._aggregator.result(final=True)
        self._metrics.subjects_completed.labels(predicted_score=str(final.predicted_score)).inc()
        self._events.put(final)
        self._events.put(_END)

    def _count_dropped(self, frames: int) -> None:
        """Received frames a cancelled stream will not answer: skipped as ``stream_ended``, so the
        server's counters still add up (received = analysed + rejected + skipped)."""
        if frames:
            self._metrics.frames_skipped.labels(policy=SKIPPED_STREAM_ENDED).inc(frames)

    def _forget(self, future: Future) -> None:
        with self._outstanding_done:
            self._pending.discard(future)

    def _deliver(self, prediction: FramePrediction) -> None:
        """Called once per analysed frame, from the worker or the batcher thread."""
        if not self._cancelled.is_set():
            self._events.put(prediction)
            if prediction.status is FrameStatus.ANALYZED and self._aggregator.frames_analyzed % self._update_every == 0:
                self._events.put(self._aggregator.result(final=False))
        with self._outstanding_done:
            self._outstanding -= 1
            self._outstanding_done.notify_all()
