"""Which frames a rate-limited stream analyses: the sharpest of each analysis interval.

Capture time is cut into intervals of 1 / rate from the stream's first frame. Within
an interval the frame with the best preview score is held; the others are passed
over. When a frame of a later interval arrives (or the stream ends), the held frame
is released for analysis. So the analysed frames stay spread in time, one an
interval at most, and each is the best of its interval rather than merely the first.
The cost is a delay of up to one interval before a chosen frame is analysed. A frame
stamped an interval or more before the current one means the sender's clock started again
(a restarted camera or recording): intervals are counted from it anew.
"""

from __future__ import annotations

from dataclasses import dataclass

from .types import FrameInput


@dataclass(frozen=True, slots=True)
class Offered:
    """What offering one frame decided."""

    released: FrameInput | None  # the best frame of an interval that just closed: analyse it
    passed_over: FrameInput | None  # a frame that lost to a sharper one of its interval
    held: bool  # the offered frame is now the interval's candidate


class BestFramePicker:
    """Holds the best-scoring frame of the current interval. Not thread-safe."""

    def __init__(self, interval_us: int) -> None:
        if interval_us <= 0:
            raise ValueError(f"interval_us must be > 0, got {interval_us}")
        self._interval_us = interval_us
        self._origin_us: int | None = None
        self._last_us: int | None = None
        self._slot = -1
        self._held: FrameInput | None = None
        self._held_score = float("-inf")

    def offer(self, frame: FrameInput, score: float) -> Offered:
        """``score``: higher is better; ``-inf`` for a frame that could not be previewed."""
        if self._origin_us is None:
            self._origin_us = frame.timestamp_us
        if self._last_us is not None and frame.timestamp_us <= self._last_us - self._interval_us:
            self._origin_us, self._slot = frame.timestamp_us, -1  # the capture clock started again
        self._last_us = frame.timestamp_us
        # A frame stamped a little before the last (jitter) belongs to the current interval.
        slot = max((frame.timestamp_us - self._origin_us) // self._interval_us, self._slot)
        if slot > self._slot:
            released = self.release()
            self._slot, self._held, self._held_score = slot, frame, score
            return Offered(released=released, passed_over=None, held=True)
        if self._held is None or score > self._held_score:
            loser = self._held
            self._held, self._held_score = frame, score
            return Offered(released=None, passed_over=loser, held=True)
        return Offered(released=None, passed_over=frame, held=False)

    def release(self) -> FrameInput | None:
        """Give up the held frame (the interval closed or the stream ends)."""
        held, self._held, self._held_score = self._held, None, float("-inf")
        return held
