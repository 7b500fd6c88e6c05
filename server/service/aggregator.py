"""Per-subject evidence: combines frame predictions into one subject result.

The subject's probabilities are the quality-weighted mean of the frames'
probabilities; the expected score is Σ k·p_k of that mean (equal to the
weighted mean of the frames' expected scores). The interval is a Student-t
interval for that mean: the frames' weighted variance over an effective number of
frames, Kish's (for the weights) divided by the integrated autocorrelation time of
the frames' expected scores in arrival order, since consecutive video frames repeat
much of the same evidence (photographs do not). On simulated clips it covers the
mean at close to its 95 % where a clip spans many correlation times (0.90 for 150
frames of AR(1) 0.8, 0.96 for independent frames) and less for a clip only a few
correlation times long (0.72 for 16 frames of AR(1) 0.8), where counting the
frames as independent covered 0.50 and 0.41. Below 4 frames the autocorrelation
cannot be estimated: photographs (``frames_independent``) count as independent,
the first few frames of a video as one frame's evidence together, so their interval
is the mean ± 1 score point, clipped to 1–3 (counted as independent, 3 frames of
AR(1) 0.9 covered 0.54). A
spread of the evidence, not a clinical bound.

Running sums keep a result O(1) however long the stream (a provisional one is
made every few analysed frames, on the thread that delivers model results); the
autocorrelation time, O(n log n), is estimated again only when the frames have
grown by a tenth since, and for the final result.
"""

from __future__ import annotations

import collections
import math
import threading
from array import array

import numpy as np

from ..runtime.types import RejectReason
from .types import ModelRef, ScoreInterval, SubjectResult, SubjectStatus

_Z95 = 1.959964
_REESTIMATE_GROWTH = 1.1  # estimate the autocorrelation time again once the frames grew by this factor


_T95_ONE, _T95_TWO = 12.7062, 4.3027  # exact, for 1 and 2 degrees of freedom


def _t95(degrees_of_freedom: float) -> float:
    """Student's t quantile for a two-sided 95 % interval, by its expansion about the normal quantile
    (Abramowitz & Stegun 26.7.5, four terms): within 1 % of the exact value from 2 degrees of freedom.
    Below 2 (where the expansion falls short: 11.30 for 1 against 12.71) linear in 1/ν between the
    exact values at 1 and 2, which errs wide."""
    nu = max(degrees_of_freedom, 1.0)
    if nu < 2.0:
        return _T95_TWO + (_T95_ONE - _T95_TWO) * (2.0 / nu - 1.0)
    z = _Z95
    terms = (
        (z**3 + z) / 4,
        (5 * z**5 + 16 * z**3 + 3 * z) / 96,
        (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384,
        (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160,
    )
    return z + sum(term / nu ** (power + 1) for power, term in enumerate(terms))


MIN_FRAMES_FOR_AUTOCORRELATION = 4


def integrated_autocorrelation_time(series: np.ndarray) -> float:
    """τ = 1 + 2 Σ ρ_k of an ordered series, at least 1: how many frames carry one frame's worth
    of independent evidence. The autocorrelations are summed in pairs while a pair stays positive,
    made non-increasing (Geyer 1992's initial monotone sequence, the estimator behind MCMC effective
    sample sizes); noise in the long lags would otherwise swamp the sum."""
    n = len(series)
    if n < MIN_FRAMES_FOR_AUTOCORRELATION:
        return 1.0
    centred = np.asarray(series, dtype=np.float64) - float(np.mean(series))
    size = 1 << (2 * n - 1).bit_length()  # zero-padded: a linear, not circular, correlation
    spectrum = np.fft.rfft(centred, size)
    autocovariance = np.fft.irfft(spectrum * np.conj(spectrum), size)[:n]
    if autocovariance[0] <= 1e-12 * n:
        return 1.0  # no spread at all: nothing to correct
    pairs = (autocovariance[: 2 * (n // 2)] / autocovariance[0]).reshape(-1, 2).sum(axis=1)
    ended = np.flatnonzero(pairs <= 0.0)
    positive = pairs[: ended[0] if ended.size else len(pairs)]
    tau = -1.0 + 2.0 * float(np.minimum.accumulate(positive).sum()) if positive.size else 1.0
    return min(max(1.0, tau), float(n))


class SubjectAggregator:
    """Thread-safe: the reader and the analysis workers of a stream all report here."""

    def __init__(self, subject_id: str, model: ModelRef, min_frames_for_score: int, *, frames_independent: bool = False) -> None:
        """frames_independent: the frames are separate photographs, not consecutive video frames."""
        self._subject_id = subject_id
        self._frames_independent = frames_independent
        self._model = model
        self._min_frames = max(1, min_frames_for_score)
        self._lock = threading.Lock()
        self._received = 0
        self._skipped = 0
        self._rejected: collections.Counter[RejectReason] = collections.Counter()
        self._analyzed = 0
        self._weight_sum = 0.0
        self._weight_square_sum = 0.0
        self._weighted_probabilities = [0.0, 0.0, 0.0]
        self._weighted_score_square_sum = 0.0
        self._arrivals = array("d")  # per analysed frame: its arrival and expected score, for the autocorrelation
        self._scores = array("d")
        self._correlation_time = 1.0
        self._correlation_frames = 0  # how many frames the autocorrelation time was estimated on
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

    def add_prediction(self, probabilities: tuple[float, float, float], weight: float, *, received_at: float) -> None:
        """weight: the frame's quality in (0, 1], with a floor that keeps poor-but-accepted frames
        counted; received_at: when the frame arrived (monotonic), which orders the frames for the
        autocorrelation (results may come back out of order)."""
        weight = max(weight, 1e-3)
        score = probabilities[0] + 2.0 * probabilities[1] + 3.0 * probabilities[2]
        with self._lock:
            self._analyzed += 1
            self._weight_sum += weight
            self._weight_square_sum += weight * weight
            for k in range(3):
                self._weighted_probabilities[k] += weight * probabilities[k]
            self._weighted_score_square_sum += weight * score * score
            self._arrivals.append(received_at)
            self._scores.append(score)

    @property
    def frames_analyzed(self) -> int:
        with self._lock:
            return self._analyzed

    def result(self, *, final: bool) -> SubjectResult:
        with self._lock:
            analyzed = self._analyzed
            if analyzed:
                combined = tuple(p / self._weight_sum for p in self._weighted_probabilities)
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
                expected_score_interval=self._interval(expected, final=final) if analyzed else None,
                frames_received=self._received,
                frames_analyzed=analyzed,
                frames_skipped=self._skipped,
                rejected=dict(self._rejected),
                model=self._model,
                faces_seen_max=self._faces_seen_max,
            )

    def _interval(self, mean: float, *, final: bool) -> ScoreInterval:
        """Called with the lock held."""
        variance = max(0.0, self._weighted_score_square_sum / self._weight_sum - mean * mean)
        effective_n = self._weight_sum**2 / self._weight_square_sum / self._autocorrelation_time(final=final)
        # The spread around the frames' own mean understates their variance by (n_eff - 1) / n_eff: Bessel.
        half = _t95(effective_n - 1.0) * math.sqrt(variance / (effective_n - 1.0)) if effective_n > 1 else 1.0
        return ScoreInterval(low=max(1.0, mean - half), high=min(3.0, mean + half), confidence=0.95)

    def _autocorrelation_time(self, *, final: bool) -> float:
        analyzed = self._analyzed
        if analyzed < MIN_FRAMES_FOR_AUTOCORRELATION and not self._frames_independent:
            return float(analyzed)  # too few video frames to tell how alike they are: one frame's worth
        if final or analyzed >= _REESTIMATE_GROWTH * self._correlation_frames:
            order = np.argsort(np.array(self._arrivals), kind="stable")
            self._correlation_time = integrated_autocorrelation_time(np.array(self._scores)[order])
            self._correlation_frames = analyzed
        return self._correlation_time
