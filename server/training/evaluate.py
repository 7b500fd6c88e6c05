"""Evaluation of severity predictions, per frame and per subject.

Two inputs: a model run over a data set (`--model M DATA`), or a CSV of
predictions (`--predictions FILE.csv` with columns actual, predicted and
optionally subject_id, p1, p2, p3). The metrics are plain numpy so they can be
checked by hand; plots are drawn with OpenCV, not matplotlib.

Conventions: scores are 1..3; confusion matrices have rows = actual score and
columns = predicted score. A subject's prediction is the argmax of its frames'
mean probabilities, or, without probabilities, the majority vote (ties go to the
higher score: a screen should rather over- than under-call). Macro-F1 averages over
the scores that occur in actual or predicted (scikit-learn's convention); quadratic
kappa is None (null in JSON) where it is undefined, when every actual and predicted
score is one and the same (scikit-learn gives NaN), rather than a misleading 0.
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from ..runtime.weights import LoadedWeights
    from .crops import CropSet

SCORES = (1, 2, 3)
ECE_BINS = 10


@dataclass(frozen=True, slots=True)
class ClassMetrics:
    score: int
    precision: float
    recall: float
    f1: float
    support: int


@dataclass(frozen=True, slots=True)
class Metrics:
    """Metrics of one level (frames or subjects); calibration fields are None without probabilities."""

    count: int
    confusion: list[list[int]]  # rows = actual score 1..3, columns = predicted score 1..3
    per_class: list[ClassMetrics]
    accuracy: float
    macro_f1: float  # over the scores present in actual or predicted
    quadratic_kappa: float | None  # None: undefined (one score only, in actual and predicted alike)
    false_negative_rate: float  # actual 2 or 3 predicted 1, over all actual 2 or 3
    expected_score_mae: float | None
    expected_calibration_error: float | None


@dataclass(frozen=True, slots=True)
class EvaluationReport:
    frames: Metrics
    subjects: Metrics | None  # None when no subject ids were given
    source: str


@dataclass(frozen=True, slots=True, eq=False)
class Predictions:
    """Parallel arrays: actual and predicted scores (1..3), optional subjects and N×3 probabilities,
    and the arithmetic the model computed them in (None when read from a CSV)."""

    actual: np.ndarray
    predicted: np.ndarray
    subjects: np.ndarray | None = None
    probabilities: np.ndarray | None = None
    arithmetic: str | None = None


def confusion_matrix(actual: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """3×3 counts, rows = actual, columns = predicted."""
    matrix = np.zeros((3, 3), dtype=np.int64)
    np.add.at(matrix, (np.asarray(actual) - 1, np.asarray(predicted) - 1), 1)
    return matrix


def _ratio(numerator: float, denominator: float) -> float:
    return float(numerator / denominator) if denominator else 0.0


def quadratic_weighted_kappa(matrix: np.ndarray) -> float | None:
    """Cohen's kappa with weights (i - j)² / (K - 1)²; 1 is perfect, 0 is chance.

    None when chance disagreement is 0 (0/0: all actual and predicted scores are one and the
    same, or there are none), where kappa is undefined.
    """
    matrix = np.asarray(matrix, dtype=np.float64)
    k = matrix.shape[0]
    i, j = np.indices((k, k))
    weights = (i - j) ** 2 / (k - 1) ** 2
    expected = np.outer(matrix.sum(1), matrix.sum(0)) / max(matrix.sum(), 1.0)
    denominator = (weights * expected).sum()
    return float(1.0 - (weights * matrix).sum() / denominator) if denominator else None


def expected_calibration_error(probabilities: np.ndarray, actual: np.ndarray, bins: int = ECE_BINS) -> float:
    """Top-label ECE: |accuracy - confidence| per equal-width confidence bin, weighted by bin size."""
    confidence, accuracy = _top_label(probabilities, actual)
    index = np.minimum((confidence * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        mask = index == b
        if mask.any():
            total += mask.mean() * abs(accuracy[mask].mean() - confidence[mask].mean())
    return float(total)


def _top_label(probabilities: np.ndarray, actual: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    probabilities = np.asarray(probabilities, dtype=np.float64)
    return probabilities.max(1), (probabilities.argmax(1) + 1 == np.asarray(actual)).astype(np.float64)


def compute_metrics(actual: np.ndarray, predicted: np.ndarray, probabilities: np.ndarray | None = None) -> Metrics:
    """All metrics of one level from parallel score arrays (and optional N×3 probabilities)."""
    actual, predicted = np.asarray(actual, dtype=np.int64), np.asarray(predicted, dtype=np.int64)
    if actual.shape != predicted.shape or actual.ndim != 1:
        raise ValueError(f"actual and predicted must be equal-length vectors, got {actual.shape} and {predicted.shape}")
    if not np.isin(actual, SCORES).all() or not np.isin(predicted, SCORES).all():
        raise ValueError("scores must be 1, 2 or 3")
    matrix = confusion_matrix(actual, predicted)
    per_class = []
    for k, score in enumerate(SCORES):
        precision = _ratio(matrix[k, k], matrix[:, k].sum())
        recall = _ratio(matrix[k, k], matrix[k, :].sum())
        f1 = _ratio(2 * precision * recall, precision + recall)
        per_class.append(ClassMetrics(score, precision, recall, f1, int(matrix[k, :].sum())))
    present = (matrix.sum(0) + matrix.sum(1)) > 0  # scores in actual or predicted: macro-F1 averages these
    present_f1 = [c.f1 for c, p in zip(per_class, present, strict=True) if p]
    diseased = actual >= 2
    mae = ece = None
    if probabilities is not None:
        probabilities = np.asarray(probabilities, dtype=np.float64)
        if probabilities.shape != (len(actual), 3):
            raise ValueError(f"probabilities must be N×3, got {probabilities.shape}")
        mae = float(np.abs(probabilities @ np.array(SCORES, dtype=np.float64) - actual).mean()) if len(actual) else 0.0
        ece = expected_calibration_error(probabilities, actual) if len(actual) else 0.0
    return Metrics(
        count=len(actual),
        confusion=matrix.tolist(),
        per_class=per_class,
        accuracy=_ratio(np.trace(matrix), matrix.sum()),
        macro_f1=float(np.mean(present_f1)) if present_f1 else 0.0,
        quadratic_kappa=quadratic_weighted_kappa(matrix),
        false_negative_rate=_ratio((predicted[diseased] == 1).sum(), diseased.sum()),
        expected_score_mae=mae,
        expected_calibration_error=ece,
    )


def aggregate_subjects(predictions: Predictions) -> Predictions:
    """One row per subject: mean probabilities → argmax, else majority vote (ties → higher score).

    A subject's actual score is its frames' majority actual score (normally all equal).
    """
    if predictions.subjects is None:
        raise ValueError("subject ids are needed to aggregate per subject")
    names = sorted(set(predictions.subjects.tolist()))
    actual, predicted, probs = [], [], []
    for name in names:
        mask = predictions.subjects == name
        actual.append(_majority(predictions.actual[mask]))
        if predictions.probabilities is not None:
            mean = predictions.probabilities[mask].mean(0)
            probs.append(mean)
            predicted.append(int(mean.argmax()) + 1)
        else:
            predicted.append(_majority(predictions.predicted[mask]))
    return Predictions(
        actual=np.array(actual, dtype=np.int64),
        predicted=np.array(predicted, dtype=np.int64),
        subjects=np.array(names),
        probabilities=np.array(probs) if probs else None,
    )


def _majority(scores: np.ndarray) -> int:
    counts = np.bincount(np.asarray(scores, dtype=np.int64), minlength=4)[1:]
    return int(np.flatnonzero(counts == counts.max()).max()) + 1


def evaluate_predictions(predictions: Predictions, source: str) -> EvaluationReport:
    frames = compute_metrics(predictions.actual, predictions.predicted, predictions.probabilities)
    subjects = None
    if predictions.subjects is not None:
        per_subject = aggregate_subjects(predictions)
        subjects = compute_metrics(per_subject.actual, per_subject.predicted, per_subject.probabilities)
    return EvaluationReport(frames=frames, subjects=subjects, source=source)


def read_predictions_csv(path: Path) -> Predictions:
    """Columns actual, predicted; optional subject_id and p1, p2, p3 (all three or none).

    A subject_id column that is blank in every row means no subject ids (not one subject '').
    """
    with Path(path).open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        columns = set(reader.fieldnames or ())
        missing = {"actual", "predicted"} - columns
        if missing:
            raise ValueError(f"{path}: missing column(s) {sorted(missing)}")
        has_probs = {"p1", "p2", "p3"} <= columns
        rows = list(reader)
    actual = np.array([int(r["actual"]) for r in rows], dtype=np.int64)
    predicted = np.array([int(r["predicted"]) for r in rows], dtype=np.int64)
    subjects = np.array([r["subject_id"] for r in rows]) if "subject_id" in columns else None
    if subjects is not None and not any(s.strip() for s in subjects.tolist()):
        subjects = None
    probs = np.array([[float(r[f"p{k}"]) for k in SCORES] for r in rows]).reshape(-1, 3) if has_probs else None
    return Predictions(actual=actual, predicted=predicted, subjects=subjects, probabilities=probs)


def predict_with_model(model_path: Path, data: Path, cache: Path | None = None, device: str | None = None,
                       batch_size: int = 64) -> Predictions:
    """Run the weights file over DATA (folder, CSV manifest or crop cache .npz) through the serving preprocessing."""
    from ..runtime.weights import load_weights
    from .crops import load_or_build_crops

    loaded = load_weights(model_path)
    crops = load_or_build_crops(data, cache, preprocessing=asdict(loaded.card.preprocessing))
    return predict_crops(loaded, crops, device, batch_size)


def predict_crops(loaded: LoadedWeights, crops: CropSet, device: str | None = None,
                  batch_size: int = 64) -> Predictions:
    """Run loaded weights over crops already made with their preprocessing."""
    import torch

    from ..runtime.model import SeverityModel

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = SeverityModel(loaded.net, loaded.card, device=device, int8_scales=loaded.int8_scales)
    probs = np.concatenate([
        model.predict(crops.pixels[i:i + batch_size]).probabilities for i in range(0, len(crops), batch_size)
    ]) if len(crops) else np.zeros((0, 3), np.float32)
    return Predictions(
        actual=crops.scores.astype(np.int64), predicted=probs.argmax(1) + 1, subjects=crops.subjects,
        probabilities=probs, arithmetic=model.precision,
    )


def report_dict(report: EvaluationReport) -> dict[str, object]:
    return asdict(report)


def format_report(report: EvaluationReport, *, row: str = "frame") -> str:
    """A human-readable report; confusion matrix rows are the actual scores. ``row`` names what one
    prediction is (a clip screened as a whole is one row, not a frame)."""
    lines = [f"evaluation of {report.source}"]
    for title, metrics in ((f"per {row}", report.frames), ("per subject", report.subjects)):
        if metrics is None:
            continue
        lines.append(f"\n{title} (n = {metrics.count})")
        lines.append("confusion matrix (rows = actual score, columns = predicted score)")
        lines.append("          pred 1  pred 2  pred 3")
        for score, row in zip(SCORES, metrics.confusion, strict=True):
            lines.append(f"actual {score}  " + "".join(f"{v:>7d} " for v in row))
        lines.append("score  precision  recall    f1  support")
        for c in metrics.per_class:
            lines.append(f"{c.score:>5}  {c.precision:>9.3f}  {c.recall:>6.3f}  {c.f1:.3f}  {c.support:>7}")
        kappa = "undefined" if metrics.quadratic_kappa is None else f"{metrics.quadratic_kappa:.3f}"
        lines.append(f"accuracy {metrics.accuracy:.3f}   macro-F1 {metrics.macro_f1:.3f}   quadratic kappa {kappa}")
        lines.append(f"false-negative rate (actual 2/3 called 1) {metrics.false_negative_rate:.3f}")
        if metrics.expected_score_mae is not None:
            lines.append(f"expected-score MAE {metrics.expected_score_mae:.3f}   "
                         f"ECE ({ECE_BINS} bins) {metrics.expected_calibration_error:.3f}")
    return "\n".join(lines)


def draw_confusion(matrix: np.ndarray, title: str, cell: int = 110) -> np.ndarray:
    """A confusion-matrix PNG image (BGR): rows = actual, columns = predicted, shaded by row share."""
    import cv2

    matrix = np.asarray(matrix)
    margin, top = 110, 70
    size = 3 * cell
    image = np.full((top + size + 60, margin + size + 20, 3), 255, np.uint8)
    rows = matrix.sum(1, keepdims=True).clip(min=1)
    for i in range(3):
        for j in range(3):
            share = matrix[i, j] / rows[i, 0]
            shade = int(255 - 200 * share)
            x0, y0 = margin + j * cell, top + i * cell
            cv2.rectangle(image, (x0, y0), (x0 + cell, y0 + cell), (255, shade, shade), -1)
            cv2.rectangle(image, (x0, y0), (x0 + cell, y0 + cell), (80, 80, 80), 1)
            colour = (255, 255, 255) if share > 0.6 else (0, 0, 0)
            cv2.putText(image, str(int(matrix[i, j])), (x0 + 12, y0 + cell // 2 + 10),
                        cv2.FONT_HERSHEY_SIMPLEX, 0.9, colour, 2, cv2.LINE_AA)
        cv2.putText(image, f"actual {i + 1}", (8, top + i * cell + cell // 2 + 6),
                    cv2.FONT_HERSHEY_SIMPLEX, 0.55, (0, 0, 0), 1, cv2.LINE_AA)
        cv2.putText(image, f"pred {i + 1}", (margin + i * cell + 22, top + size + 30),
                    cv2.FONT_HERSHEY_SIMPLEX, 0.55, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(image, title, (8, 30), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(image, "rows = actual, columns = predicted", (8, 55), cv2.FONT_HERSHEY_SIMPLEX, 0.45,
                (60, 60, 60), 1, cv2.LINE_AA)
    return image


def draw_reliability(probabilities: np.ndarray, actual: np.ndarray, title: str, bins: int = ECE_BINS) -> np.ndarray:
    """A reliability diagram (BGR): per confidence bin, accuracy bar against the diagonal."""
    import cv2

    confidence, accuracy = _top_label(probabilities, actual)
    index = np.minimum((confidence * bins).astype(int), bins - 1)
    side, left, top = 400, 60, 50
    image = np.full((top + side + 50, left + side + 20, 3), 255, np.uint8)

    def x_of(v: float) -> int:
        return int(left + v * side)

    def y_of(v: float) -> int:
        return int(top + (1.0 - v) * side)

    for b in range(bins):
        mask = index == b
        if not mask.any():
            continue
        acc = accuracy[mask].mean()
        cv2.rectangle(image, (x_of(b / bins) + 2, y_of(acc)), (x_of((b + 1) / bins) - 2, y_of(0)), (200, 120, 40), -1)
        cv2.putText(image, str(int(mask.sum())), (x_of(b / bins) + 4, y_of(0) - 5), cv2.FONT_HERSHEY_SIMPLEX,
                    0.35, (255, 255, 255), 1, cv2.LINE_AA)
    cv2.rectangle(image, (x_of(0), y_of(1)), (x_of(1), y_of(0)), (0, 0, 0), 1)
    cv2.line(image, (x_of(0), y_of(0)), (x_of(1), y_of(1)), (0, 0, 200), 1, cv2.LINE_AA)
    for v in (0.0, 0.5, 1.0):
        cv2.putText(image, f"{v:.1f}", (x_of(v) - 10, y_of(0) + 18), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1)
        cv2.putText(image, f"{v:.1f}", (left - 35, y_of(v) + 5), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1)
    cv2.putText(image, "confidence (top probability)", (left + 90, top + side + 40), cv2.FONT_HERSHEY_SIMPLEX,
                0.45, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(image, f"{title}: accuracy per bin", (8, 30), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (0, 0, 0), 1,
                cv2.LINE_AA)
    return image


def write_plots(report: EvaluationReport, predictions: Predictions, folder: Path) -> list[Path]:
    """Confusion matrices (frames, subjects) and, with probabilities, a reliability diagram."""
    import cv2

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, metrics in (("frames", report.frames), ("subjects", report.subjects)):
        if metrics is not None:
            path = folder / f"confusion_{name}.png"
            cv2.imwrite(str(path), draw_confusion(np.array(metrics.confusion), f"{name}: n = {metrics.count}"))
            written.append(path)
    if predictions.probabilities is not None and len(predictions.actual):
        path = folder / "reliability_frames.png"
        cv2.imwrite(str(path), draw_reliability(predictions.probabilities, predictions.actual, "frames"))
        written.append(path)
    return written


def write_predictions_csv(predictions: Predictions, path: Path) -> None:
    """The CSV that `--predictions` reads back (a subject_id column only when there are subject ids)."""
    with Path(path).open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        has_probs = predictions.probabilities is not None
        has_subjects = predictions.subjects is not None
        writer.writerow(["actual", "predicted"] + (["subject_id"] if has_subjects else [])
                        + (["p1", "p2", "p3"] if has_probs else []))
        for i in range(len(predictions.actual)):
            subject = [predictions.subjects[i]] if predictions.subjects is not None else []
            probs = [f"{p:.6f}" for p in predictions.probabilities[i]] if has_probs else []
            writer.writerow([int(predictions.actual[i]), int(predictions.predicted[i]), *subject, *probs])


def run_evaluate(
    *, model: Path | None = None, data: Path | None = None, predictions: Path | None = None,
    as_json: bool = False, plots: Path | None = None, cache: Path | None = None, device: str | None = None,
    save_predictions: Path | None = None,
) -> EvaluationReport:
    """Body of `acroscreen evaluate`: exactly one of (model and data) or predictions; prints the report."""
    if (predictions is None) == (model is None):
        raise ValueError("give either --model M DATA or --predictions FILE.csv")
    if predictions is not None:
        preds, source = read_predictions_csv(predictions), str(predictions)
    else:
        if data is None:
            raise ValueError("--model needs a DATA folder, CSV manifest or crop cache")
        preds = predict_with_model(model, data, cache, device)
        source = f"{model} on {data} ({preds.arithmetic})"
    report = evaluate_predictions(preds, source)
    if save_predictions is not None:
        write_predictions_csv(preds, save_predictions)
    if plots is not None:
        write_plots(report, preds, plots)
    print(json.dumps(report_dict(report)) if as_json else format_report(report), flush=True)
    return report
