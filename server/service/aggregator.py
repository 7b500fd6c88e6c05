"""Per-subject evidence: combines frame predictions into one subject result.

The subject's probabilities are the quality-weighted mean of the frames'
probabilities; the expected score is Σ k·p_k of that mean (equal to the
weighted mean of the frames' expected scores). The interval is a normal
approximation over frames with Kish's effective sample size. Consecutive
video frames are correlated, so the interval is optimistic for long clips of
few distinct views; it is a spread of the evidence, not a clinical bound.
"""

from __future__ import annotations

import collections
import math
import threading

from ..runtime.types import RejectReason
from .types import ModelRef, ScoreInterval, SubjectResult, SubjectStatus

_Z95 = 1.959964


class SubjectAggregator:
    """Thread-safe: the reader and the analysis workers of a stream all report here."""

    def __init__(self, subject_id: str, model: ModelRef, min_frames_for_score: int) -> None:
        self._subject_id = subject_id
        self._model = model
        self._min_frames = max(1, min_frames_for_score)
        self._lock = threading.Lock()
        self._received = 0
        self._skipped = 0
        self._rejected: collections.Counter[RejectReason] = collections.Counter()
        self._weights: list[float] = []
        self._probabilities: list[tuple[float, float, float]] = []
        self._faces_seen_max = 0

    def add_received(self) -> None:
        with self._lock:
            self._received += 1

    def add_skipped(self) -> None:
        with self._lock:
            self._skipped += 1

    def add_rejected(self, reason: RejectReason) -> None:
        with self._lock:
            self._rejected[reason] += 1

    def add_faces(self, count: int) -> None:
        with self._lock:
            self._faces_seen_max = max(self._faces_seen_max, count)

    def add_prediction(self, probabilities: tuple[float, float, float], weight: float) -> None:
        """weight: the frame's quality in (0, 1]; a floor keeps poor-but-accepted frames counted."""
        with self._lock:
            self._probabilities.append(probabilities)
            self._weights.append(max(weight, 1e-3))

    @property
    def frames_analyzed(self) -> int:
        with self._lock:
            return len(self._probabilities)

    def result(self, *, final: bool) -> SubjectResult:
        with self._lock:
            analyzed = len(self._probabilities)
            total_weight = sum(self._weights)
            if analyzed:
                combined = tuple(
                    sum(w * p[k] for w, p in zip(self._weights, self._probabilities)) / total_weight for k in range(3)
                )
            else:
                combined = (0.0, 0.0, 0.0)
            expected = sum((k + 1) * combined[k] for k in range(3))
            enough = analyzed >= self._min_frames
            if not enough:
                status = SubjectStatus.INSUFFICIENT_EVIDENCE
            else:
                status = SubjectStatus.FINAL if final else SubjectStatus.PROVISIONAL
            return SubjectResult(
                subject_id=self._subject_id,
                status=status,
                predicted_score=(max(range(3), key=lambda k: combined[k]) + 1) if enough else 0,
                expected_score=expected if analyzed else 0.0,
                probabilities=combined,  # type: ignore[arg-type]
                expected_score_interval=self._interval(expected) if analyzed else None,
                frames_received=self._received,
                frames_analyzed=analyzed,
                frames_skipped=self._skipped,
                rejected=dict(self._rejected),
                model=self._model,
                faces_seen_max=self._faces_seen_max,
            )

    def _interval(self, mean: float) -> ScoreInterval:
        scores = [sum((k + 1) * p[k] for k in range(3)) for p in self._probabilities]
        total = sum(self._weights)
        variance = sum(w * (s - mean) ** 2 for w, s in zip(self._weights, scores)) / total
        effective_n = total**2 / sum(w * w for w in self._weights)
        half = _Z95 * math.sqrt(variance / effective_n) if effective_n > 1 else 1.0
        return ScoreInterval(low=max(1.0, mean - half), high=min(3.0, mean + half), confidence=0.95)
