import numpy as np
import pytest
from acroscreen.server.runtime.types import RejectReason
from acroscreen.server.service.aggregator import SubjectAggregator, _t95, integrated_autocorrelation_time
from acroscreen.server.service.types import ModelRef, SubjectStatus

MODEL = ModelRef(name="m", version="1", kind="untrained", sha256="")


def test_quality_weighted_mean_and_expected_score() -> None:
    aggregator = SubjectAggregator("s", MODEL, min_frames_for_score=2)
    aggregator.add_prediction((1.0, 0.0, 0.0), weight=1.0, received_at=0.0)
    aggregator.add_prediction((0.0, 0.0, 1.0), weight=0.25, received_at=1.0)
    result = aggregator.result(final=True)
    assert result.status is SubjectStatus.FINAL
    assert result.probabilities == pytest.approx((0.8, 0.0, 0.2))
    assert result.expected_score == pytest.approx(1 * 0.8 + 3 * 0.2)
    assert result.predicted_score == 1
    interval = result.expected_score_interval
    assert interval is not None and 1.0 <= interval.low <= result.expected_score <= interval.high <= 3.0


def test_too_few_frames_is_insufficient_evidence_and_counts_are_kept() -> None:
    aggregator = SubjectAggregator("s", MODEL, min_frames_for_score=3)
    for _ in range(4):
        aggregator.add_received()
    aggregator.add_skipped()
    aggregator.add_rejected(RejectReason.NO_FACE)
    aggregator.add_rejected(RejectReason.NO_FACE)
    aggregator.add_prediction((0.2, 0.7, 0.1), weight=0.9, received_at=0.0)
    aggregator.add_faces(2)
    result = aggregator.result(final=True)
    assert result.status is SubjectStatus.INSUFFICIENT_EVIDENCE
    assert result.predicted_score == 0
    assert (result.frames_received, result.frames_analyzed, result.frames_skipped) == (4, 1, 1)
    assert result.rejected == {RejectReason.NO_FACE: 2}
    assert result.faces_seen_max == 2


def test_interval_narrows_with_consistent_evidence() -> None:
    few = SubjectAggregator("s", MODEL, 1)
    many = SubjectAggregator("s", MODEL, 1)
    for i in range(4):
        few.add_prediction((0.5, 0.3, 0.2) if i % 2 else (0.3, 0.5, 0.2), 1.0, received_at=i)
    for i in range(64):
        many.add_prediction((0.5, 0.3, 0.2) if i % 2 else (0.3, 0.5, 0.2), 1.0, received_at=i)
    a, b = few.result(final=False), many.result(final=False)
    assert a.status is SubjectStatus.PROVISIONAL
    width = lambda r: r.expected_score_interval.high - r.expected_score_interval.low  # noqa: E731
    assert width(b) < width(a)


def _ar1(rng: np.random.Generator, n: int, phi: float, sd: float) -> np.ndarray:
    """A stationary AR(1) series of mean 0 and marginal standard deviation sd."""
    x = np.empty(n)
    x[0] = rng.normal(0.0, sd)
    noise = rng.normal(0.0, sd * np.sqrt(1.0 - phi * phi), n)
    for t in range(1, n):
        x[t] = phi * x[t - 1] + noise[t]
    return x


def _probabilities_scoring(score: float) -> tuple[float, float, float]:
    """Class probabilities whose expected score is `score` (in [1, 3])."""
    d = score - 2.0
    return (max(0.0, -d), 1.0 - abs(d), max(0.0, d))


def test_autocorrelation_time_of_independent_and_of_correlated_frames() -> None:
    rng = np.random.default_rng(0)
    assert 1.0 <= integrated_autocorrelation_time(rng.normal(size=4000)) < 1.3
    # AR(1) with phi 0.9: tau = (1 + phi) / (1 - phi) = 19
    assert 14 < integrated_autocorrelation_time(_ar1(rng, 20_000, 0.9, 1.0)) < 24
    assert integrated_autocorrelation_time(np.full(50, 2.0)) == 1.0
    assert integrated_autocorrelation_time(np.array([1.0, 3.0, 1.0])) == 1.0  # too few to tell


def test_interval_of_correlated_video_frames_covers_the_mean_as_stated() -> None:
    """Consecutive frames of a clip are correlated (here AR(1), phi 0.8: each frame carries ~1/9 of
    an independent one's evidence). Over 300 simulated clips of 150 frames the 95 % interval covers
    the true mean 90 % of the time (measured); treating the frames as independent covered it 50 %."""
    rng = np.random.default_rng(1)
    covered = 0
    for _ in range(300):
        scores = 2.0 + _ar1(rng, 150, 0.8, 0.2)
        aggregator = SubjectAggregator("s", MODEL, 1)
        for t, score in enumerate(scores):
            aggregator.add_prediction(_probabilities_scoring(float(np.clip(score, 1.0, 3.0))), 1.0, received_at=float(t))
        interval = aggregator.result(final=True).expected_score_interval
        assert interval is not None
        covered += interval.low <= 2.0 <= interval.high
    assert 0.85 <= covered / 300 <= 0.99


def test_three_video_frames_count_as_one_and_three_photographs_as_three() -> None:
    """Below 4 frames the autocorrelation cannot be estimated. Counted as independent, the first
    frames of a video (nearly the same picture) gave an interval that covered the mean about half
    the time (3 frames of AR(1) 0.9: 0.54); they now count as one frame's evidence together."""
    video, photos = SubjectAggregator("s", MODEL, 1), SubjectAggregator("s", MODEL, 1, frames_independent=True)
    for index, score in enumerate((1.9, 2.0, 2.1)):
        for aggregator in (video, photos):
            aggregator.add_prediction(_probabilities_scoring(score), 1.0, received_at=index)
    width = lambda r: r.expected_score_interval.high - r.expected_score_interval.low  # noqa: E731
    assert width(video.result(final=True)) > 1.9  # the whole scale, near enough: one frame says little
    assert 0.3 < width(photos.result(final=True)) < 0.6  # t(2 dof) x sd/sqrt(2) of three photographs
    for index in range(3, 6):  # from 4 frames on the video's own autocorrelation decides
        video.add_prediction(_probabilities_scoring(2.0 + 0.1 * (-1) ** index), 1.0, received_at=index)
    assert width(video.result(final=True)) < 1.0


def test_frames_are_ordered_by_arrival_whatever_order_their_results_come_in() -> None:
    rng = np.random.default_rng(2)
    scores = 2.0 + _ar1(rng, 200, 0.9, 0.2)
    in_order, shuffled = SubjectAggregator("s", MODEL, 1), SubjectAggregator("s", MODEL, 1)
    for t in range(200):
        in_order.add_prediction(_probabilities_scoring(float(scores[t])), 1.0, received_at=float(t))
    for t in rng.permutation(200):
        shuffled.add_prediction(_probabilities_scoring(float(scores[t])), 1.0, received_at=float(t))
    a, b = in_order.result(final=True), shuffled.result(final=True)
    assert a.expected_score == pytest.approx(b.expected_score)
    assert (a.expected_score_interval.low, a.expected_score_interval.high) == pytest.approx(
        (b.expected_score_interval.low, b.expected_score_interval.high))


def test_a_long_stream_re_estimates_its_autocorrelation_rarely(monkeypatch: pytest.MonkeyPatch) -> None:
    """A provisional result comes every few analysed frames, on the thread that delivers model
    results: over 20,000 frames (11 minutes at 30 fps) with one every 10 frames, the O(n log n)
    estimate runs about log(20,000) / log(1.1) times, not 2,000."""
    import acroscreen.server.service.aggregator as aggregator_module

    estimates = []
    estimate = aggregator_module.integrated_autocorrelation_time
    monkeypatch.setattr(aggregator_module, "integrated_autocorrelation_time",
                        lambda series: estimates.append(len(series)) or estimate(series))
    aggregator = SubjectAggregator("s", MODEL, 1)
    for t in range(1, 20_001):
        aggregator.add_prediction(_probabilities_scoring(2.0 + 0.1 * np.sin(t / 7)), 1.0, received_at=float(t))
        if t % 10 == 0:
            aggregator.result(final=False)
    assert len(estimates) < 80
    assert estimates == sorted(estimates) and estimates[-1] >= 20_000 / 1.1
    aggregator.result(final=True)
    assert estimates[-1] == 20_000  # the final result estimates on every frame


def test_the_t_quantile_is_the_exact_one_within_a_percent_and_falls_with_the_degrees_of_freedom() -> None:
    """The expansion gave 11.30 at 1 degree of freedom (exact 12.71): an interval too narrow for a
    subject whose frames count as fewer than two."""
    exact = {1: 12.706, 2: 4.303, 3: 3.182, 5: 2.571, 10: 2.228, 30: 2.042}  # Student's t, 97.5th percentile
    for degrees, quantile in exact.items():
        assert abs(_t95(degrees) - quantile) / quantile < 0.01, degrees
    values = [_t95(nu / 10) for nu in range(10, 400)]
    assert all(a >= b for a, b in zip(values, values[1:]))
