import pytest
from acroscreen.server.runtime.types import RejectReason
from acroscreen.server.service.aggregator import SubjectAggregator
from acroscreen.server.service.types import ModelRef, SubjectStatus

MODEL = ModelRef(name="m", version="1", kind="untrained", sha256="")


def test_quality_weighted_mean_and_expected_score() -> None:
    aggregator = SubjectAggregator("s", MODEL, min_frames_for_score=2)
    aggregator.add_prediction((1.0, 0.0, 0.0), weight=1.0)
    aggregator.add_prediction((0.0, 0.0, 1.0), weight=0.25)
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
    aggregator.add_prediction((0.2, 0.7, 0.1), weight=0.9)
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
        few.add_prediction((0.5, 0.3, 0.2) if i % 2 else (0.3, 0.5, 0.2), 1.0)
    for i in range(64):
        many.add_prediction((0.5, 0.3, 0.2) if i % 2 else (0.3, 0.5, 0.2), 1.0)
    a, b = few.result(final=False), many.result(final=False)
    assert a.status is SubjectStatus.PROVISIONAL
    width = lambda r: r.expected_score_interval.high - r.expected_score_interval.low  # noqa: E731
    assert width(b) < width(a)
