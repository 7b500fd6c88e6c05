"""Evaluation metrics against values worked out by hand; CSV mode, JSON output and plots."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from acroscreen.server.training.evaluate import (
    EvaluationReport,
    Predictions,
    aggregate_subjects,
    compute_metrics,
    confusion_matrix,
    expected_calibration_error,
    quadratic_weighted_kappa,
    format_report,
    read_predictions_csv,
    report_dict,
    run_evaluate,
    write_predictions_csv,
)

# Rows = actual: actual 1 → (2, 1, 0), actual 2 → (1, 1, 0), actual 3 → (0, 1, 2).
ACTUAL = np.array([1, 1, 1, 2, 2, 3, 3, 3])
PREDICTED = np.array([1, 1, 2, 2, 1, 3, 3, 2])


def test_confusion_matrix_rows_are_actual() -> None:
    assert confusion_matrix(ACTUAL, PREDICTED).tolist() == [[2, 1, 0], [1, 1, 0], [0, 1, 2]]


def test_metrics_match_hand_computation() -> None:
    m = compute_metrics(ACTUAL, PREDICTED)
    assert m.accuracy == pytest.approx(5 / 8)
    assert [c.precision for c in m.per_class] == pytest.approx([2 / 3, 1 / 3, 1.0])
    assert [c.recall for c in m.per_class] == pytest.approx([2 / 3, 1 / 2, 2 / 3])
    assert [c.f1 for c in m.per_class] == pytest.approx([2 / 3, 0.4, 0.8])
    assert [c.support for c in m.per_class] == [3, 2, 3]
    assert m.macro_f1 == pytest.approx((2 / 3 + 0.4 + 0.8) / 3)
    # One of the five actual 2/3 was called 1.
    assert m.false_negative_rate == pytest.approx(1 / 5)
    # Weighted disagreement 0.75 observed vs 2.75 expected by chance (see the module's numbers).
    assert m.quadratic_kappa == pytest.approx(8 / 11)
    assert m.expected_score_mae is None and m.expected_calibration_error is None


def test_kappa_extremes() -> None:
    assert quadratic_weighted_kappa(np.diag([3, 2, 4])) == pytest.approx(1.0)
    # Predictions independent of the truth: observed equals expected disagreement.
    assert quadratic_weighted_kappa(np.ones((3, 3))) == pytest.approx(0.0)


def test_scores_absent_from_actual_and_predicted_do_not_count() -> None:
    """Macro-F1 averages the scores present (scikit-learn's convention); kappa of one score alone is undefined."""
    assert compute_metrics(np.array([1, 1, 2, 2]), np.array([1, 1, 2, 2])).macro_f1 == pytest.approx(1.0)
    # Score 1: precision 1, recall 1/2; score 2: precision 2/3, recall 1; score 3 appears nowhere.
    assert compute_metrics(np.array([1, 1, 2, 2]), np.array([1, 2, 2, 2])).macro_f1 == pytest.approx((2 / 3 + 0.8) / 2)
    # Score 3 predicted but never actual still counts (its F1 is 0).
    assert compute_metrics(np.array([1, 2]), np.array([1, 3])).macro_f1 == pytest.approx(1 / 3)
    single = compute_metrics(np.array([2, 2, 2]), np.array([2, 2, 2]))
    assert single.macro_f1 == pytest.approx(1.0) and single.quadratic_kappa is None
    assert quadratic_weighted_kappa(np.diag([0, 5, 0])) is None
    report = EvaluationReport(frames=single, subjects=None, source="one score")
    assert json.loads(json.dumps(report_dict(report)))["frames"]["quadratic_kappa"] is None
    assert "quadratic kappa undefined" in format_report(report)


def test_calibration_metrics() -> None:
    confident = [[0.95, 0.03, 0.02]] * 4  # bin 9, all correct: gap 0.05
    unsure = [[0.55, 0.45, 0.0]] * 4  # bin 5, half correct: gap 0.05
    probs = np.array(confident + unsure)
    actual = np.array([1, 1, 1, 1, 1, 1, 2, 2])
    assert expected_calibration_error(probs, actual) == pytest.approx(0.05)
    m = compute_metrics(np.array([3]), np.array([3]), np.array([[0.1, 0.2, 0.7]]))
    assert m.expected_score_mae == pytest.approx(0.4)  # expected score 2.6 for an actual 3


def test_subject_aggregation() -> None:
    by_probability = aggregate_subjects(Predictions(
        actual=np.array([2, 2, 1]), predicted=np.array([1, 3, 1]), subjects=np.array(["a", "a", "b"]),
        probabilities=np.array([[0.6, 0.3, 0.1], [0.0, 0.4, 0.6], [0.9, 0.1, 0.0]]),
    ))
    assert by_probability.predicted.tolist() == [2, 1]  # a: mean (0.3, 0.35, 0.35) → first max, score 2
    by_vote = aggregate_subjects(Predictions(
        actual=np.array([3, 3, 3, 3]), predicted=np.array([1, 3, 1, 3]), subjects=np.array(["s"] * 4),
    ))
    assert by_vote.predicted.tolist() == [3]  # a tie goes to the higher score
    assert by_vote.actual.tolist() == [3]


def _write_csv(path: Path, with_probs: bool) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["actual", "predicted", "subject_id"] + (["p1", "p2", "p3"] if with_probs else []))
        for i, (a, p) in enumerate(zip(ACTUAL, PREDICTED, strict=True)):
            probs = [0.1, 0.1, 0.1]
            probs[p - 1] = 0.8
            writer.writerow([a, p, f"s{a}-{i % 2}"] + (probs if with_probs else []))


def test_csv_mode_json_and_plots(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "preds.csv"
    _write_csv(path, with_probs=True)
    report = run_evaluate(predictions=path, as_json=True, plots=tmp_path / "plots")
    printed = json.loads(capsys.readouterr().out)
    assert printed["frames"]["confusion"] == [[2, 1, 0], [1, 1, 0], [0, 1, 2]]
    assert printed["frames"]["accuracy"] == pytest.approx(5 / 8)
    assert printed["frames"]["expected_calibration_error"] == pytest.approx(abs(0.8 - 5 / 8))
    assert printed["subjects"]["count"] == 6
    assert report.subjects is not None and report.subjects.count == 6
    for name in ("confusion_frames.png", "confusion_subjects.png", "reliability_frames.png"):
        image = cv2.imread(str(tmp_path / "plots" / name))
        assert image is not None and image.shape[0] > 100


def test_csv_without_probabilities_prints_text(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "preds.csv"
    _write_csv(path, with_probs=False)
    assert read_predictions_csv(path).probabilities is None
    report = run_evaluate(predictions=path)
    out = capsys.readouterr().out
    assert "rows = actual score" in out and "false-negative rate" in out
    assert report.frames.expected_score_mae is None


def test_bad_input_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        run_evaluate()
    with pytest.raises(ValueError):
        compute_metrics(np.array([0, 1]), np.array([1, 1]))
    bad = tmp_path / "bad.csv"
    bad.write_text("actual\n1\n")
    with pytest.raises(ValueError, match="predicted"):
        read_predictions_csv(bad)


def test_predictions_csv_round_trip_with_and_without_subjects(tmp_path: Path) -> None:
    """No subject ids are written as no column, and read back as none (not one subject '' of every row)."""
    path = tmp_path / "p.csv"
    write_predictions_csv(Predictions(actual=np.array([1, 2, 3]), predicted=np.array([1, 2, 2])), path)
    assert path.read_text().splitlines()[0] == "actual,predicted"
    back = read_predictions_csv(path)
    assert back.subjects is None and back.predicted.tolist() == [1, 2, 2]
    path.write_text("actual,predicted,subject_id\n1,1,\n2,2, \n")  # an all-blank column from older files
    assert read_predictions_csv(path).subjects is None
    write_predictions_csv(Predictions(actual=np.array([1, 2]), predicted=np.array([1, 2]),
                                      subjects=np.array(["a", "b"]),
                                      probabilities=np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1]])), path)
    back = read_predictions_csv(path)
    assert back.subjects is not None and back.subjects.tolist() == ["a", "b"]
    assert back.probabilities is not None and back.probabilities[1, 1] == pytest.approx(0.8)
