"""Train several configurations of the phantom-demo model at once on one GPU and keep the best.

One training process leaves a H100/H200 mostly idle (the paper's network at batch 128
is launch-bound: ~1.4-1.8k images/s whatever the GPU), so variants run side by side,
each in its own process. The one with the best accuracy on the validation crops of
the full training data (whole identities, never in any variant's training split) is
kept; holdout phantoms and holdout phantom clips are only reported, never used to choose.
Those validation people are drawn once, from --train, and passed to every variant
(TrainConfig.val_groups), so a variant trained on other caches (more people) keeps them out
of its training split too.

Called by scripts/device_train.sh (which sets up imports on a machine without an
acroscreen install). A variant is NAME:key=value,key=value with TrainConfig fields,
plus `train=a.npz+b.npz` to train on other crop caches than --train.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def load_all(paths: list[Path]):
    """One CropSet from several caches made with the same preprocessing."""
    from acroscreen.server.training.crops import CropSet, load_crops

    parts = [load_crops(p) for p in paths]
    if any(p.preprocessing != parts[0].preprocessing for p in parts):
        raise ValueError("crop caches were made with different preprocessing")
    return CropSet(np.concatenate([p.pixels for p in parts]), np.concatenate([p.scores for p in parts]),
                   np.concatenate([p.subjects for p in parts]), np.concatenate([p.paths for p in parts]),
                   parts[0].preprocessing, sum(p.rejected for p in parts))


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    name, _, rest = text.partition(":")
    fields = dict(item.split("=", 1) for item in rest.split(",") if item)
    if {"seed", "val_fraction", "val_groups"} & fields.keys():
        raise ValueError(f"{name}: variants share one validation split; seed, val_fraction and val_groups are fixed")
    return name, fields


def train_one(args: argparse.Namespace, name: str, fields: dict[str, str]) -> None:
    from acroscreen.server.training.train import TrainConfig, train

    files = [Path(p) for p in fields.pop("train", "+".join(map(str, args.train))).split("+")]
    types = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
    overrides = {k: (Path(v) if "Path" in str(types[k]) else float(v) if "float" in str(types[k]) else int(v))
                 for k, v in fields.items()}
    config = TrainConfig(data=files[0], out=args.work / name / "phantom-demo.safetensors", max_minutes=args.minutes,
                         max_samples=args.max_samples, batch_size=args.batch, patience=args.patience,
                         log_every=args.log_every, int8_calibration_crops=0,  # calibrate the one kept, on a CPU
                         val_groups=validation_people(_subjects(args.train)), **overrides)
    train(config, load_all(files))


def validation_people(subjects: np.ndarray) -> tuple[str, ...]:
    """The shared validation people: TrainConfig's default split (seed, val_fraction) of the --train subjects."""
    from acroscreen.server.training.train import TrainConfig, split_by_group, split_group

    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    mask = split_by_group(subjects, defaults["val_fraction"], defaults["seed"])
    return tuple(sorted({split_group(s) for s in subjects[mask].tolist()}))


def _subjects(paths: list[Path]) -> np.ndarray:
    """The caches' subjects only: no pixels decoded."""
    subjects = []
    for path in paths:
        with np.load(path, allow_pickle=False) as z:
            subjects.append(z["subjects"])
    return np.concatenate(subjects)


def validation_crops(args: argparse.Namespace):
    """Validation rows of the full training data: the people every variant validated on and never trained on."""
    from acroscreen.server.training.train import rows_of

    crops = load_all(args.train)
    return crops.subset(rows_of(crops.subjects, validation_people(crops.subjects)))


def accuracy(weights: Path, crops) -> float:
    from acroscreen.server.runtime.weights import load_weights
    from acroscreen.server.training.evaluate import predict_crops

    predictions = predict_crops(load_weights(weights), crops, batch_size=256)
    return float((predictions.predicted == predictions.actual).mean())


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--train", type=lambda s: [Path(p) for p in s.split(",")], required=True)
    parser.add_argument("--holdout", type=Path, required=True)
    parser.add_argument("--clips", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--minutes", type=float, default=4.5)
    parser.add_argument("--max-samples", type=int, default=600_000)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--patience", type=int, default=25)
    parser.add_argument("--log-every", type=int, default=20)
    parser.add_argument("--variant", action="append", default=[])
    parser.add_argument("--only", help="train this variant in this process")
    args = parser.parse_args()
    variants = dict(parse_variant(v) for v in (args.variant or ["base:"]))
    if args.only:
        train_one(args, args.only, variants[args.only])
        return 0

    from acroscreen.server.runtime.weights import load_weights
    from acroscreen.server.training.evaluate import (
        evaluate_predictions,
        format_report,
        predict_with_model,
    )

    started = time.monotonic()
    children = {}
    for name in variants:
        (args.work / name).mkdir(parents=True, exist_ok=True)
        log = (args.work / f"{name}.log").open("w")
        children[name] = subprocess.Popen([sys.executable, __file__, *sys.argv[1:], "--only", name],
                                          stdout=log, stderr=subprocess.STDOUT)
    failed = [name for name, child in children.items() if child.wait() != 0]
    print(f"{len(variants)} variants trained side by side in {time.monotonic() - started:.0f} s; failed: {failed}",
          flush=True)
    val = validation_crops(args)
    results = {}
    for name, fields in variants.items():
        weights = args.work / name / "phantom-demo.safetensors"
        if name in failed:
            continue
        result = {"variant": fields, "common_validation_accuracy": accuracy(weights, val),
                  "training_summary": json.loads(load_weights(weights).card.training_summary)}
        for label, data in (("holdout", args.holdout), ("holdout_clips", args.clips)):
            if data is not None and data.is_file():
                report = evaluate_predictions(predict_with_model(weights, data), f"{name} on {data}")
                print(format_report(report), flush=True)
                result[label] = {"per_frame": report.frames.accuracy,
                                 "per_subject": report.subjects.accuracy if report.subjects else None,
                                 "subject_confusion": report.subjects.confusion if report.subjects else None}
        results[name] = result
        print(name, json.dumps(result), flush=True)
    best = max(results, key=lambda n: results[n]["common_validation_accuracy"])
    print(f"best by validation ({len(val)} crops): {best}", flush=True)
    (args.out / "variants.json").write_text(json.dumps({"best": best, "results": results}, indent=1))
    (args.work / "best").symlink_to(args.work / best)
    return 0


if __name__ == "__main__":
    sys.exit(main())
