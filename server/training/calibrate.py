"""`acroscreen calibrate-int8`: measure the activation scales for int8 CPU inference.

The scales come from crops made with the model's own preprocessing (training crops, never
holdout or patient data kept for the purpose), and are written beside the weights, where the
server finds them. Crops not used for calibration then check the int8 model against float32.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .crops import CropSet

CHECK_CROPS = 512
BATCH = 32


@dataclass(frozen=True, kw_only=True)
class CalibrationReport:
    """What calibration used and how far int8 moved the predictions on the crops it did not use."""

    scales_file: str
    calibration_crops: int
    check_crops: int
    argmax_agreement: float
    mean_abs_probability_change: float
    max_abs_probability_change: float


def run_calibrate(*, model: Path, data: Path, out: Path | None = None, cache: Path | None = None,
                  crops: int = 512, seed: int = 0) -> CalibrationReport:
    """Body of `acroscreen calibrate-int8`: crops of DATA made with the model's preprocessing."""
    from ..runtime.weights import read_card
    from .crops import load_or_build_crops

    crop_set = load_or_build_crops(data, cache, preprocessing=asdict(read_card(model).preprocessing))
    report = calibrate_weights(model, crop_set, f"{Path(data).name}", out=out, crops=crops, seed=seed)
    print(json.dumps(asdict(report)), flush=True)
    return report


def calibrate_weights(model: Path, crop_set: CropSet, source: str, *, out: Path | None = None,
                      crops: int = 512, seed: int = 0) -> CalibrationReport:
    """Write the int8 scales of a weights file measured on ``crops`` of ``crop_set`` (drawn with
    ``seed``), and check the int8 model against float32 on up to 512 of the others."""
    from ..runtime.int8 import calibrate, scales_path, write_scales
    from ..runtime.model import SeverityModel
    from ..runtime.weights import load_weights

    if crops < 1:
        raise ValueError("--crops must be at least 1")
    if not len(crop_set):
        raise ValueError(f"{source}: no usable face crops to calibrate on")
    loaded = load_weights(model, with_int8_scales=False)  # a stale scales file is what this replaces
    card = loaded.card
    order = np.random.default_rng(seed).permutation(len(crop_set))
    used, check = order[:crops], order[crops:crops + CHECK_CROPS]
    reference = SeverityModel(loaded.net, card, "cpu", "fp32")
    batches = (reference.input_tensor(crop_set.pixels[used[i:i + BATCH]]) for i in range(0, len(used), BATCH))
    scales = calibrate(loaded.net, batches, f"{len(used)} crops of {source} (seed {seed})", loaded.sha256)
    target = out or scales_path(model)
    write_scales(target, scales)
    int8 = SeverityModel(loaded.net, card, "cpu", "int8", int8_scales=scales)  # as the server will run it
    changes, agree = [], []
    for i in range(0, len(check), BATCH):
        pixels = crop_set.pixels[check[i:i + BATCH]]
        p_float, p_int8 = reference.predict(pixels).probabilities, int8.predict(pixels).probabilities
        changes.append(np.abs(p_int8 - p_float).max(1))
        agree.append(p_int8.argmax(1) == p_float.argmax(1))
    change = np.concatenate(changes) if changes else np.zeros(0)
    return CalibrationReport(
        scales_file=str(target), calibration_crops=len(used), check_crops=len(check),
        argmax_agreement=float(np.concatenate(agree).mean()) if agree else float("nan"),
        mean_abs_probability_change=float(change.mean()) if len(change) else float("nan"),
        max_abs_probability_change=float(change.max()) if len(change) else float("nan"),
    )
