"""Resuming from a checkpoint continues the run it stopped (on a tiny stand-in network, CPU)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from acroscreen.server.runtime.model import EMBEDDING_SIZE, SeverityOutput
from acroscreen.server.training import train as train_module
from acroscreen.server.training.crops import CropSet, training_preprocessing
from acroscreen.server.training.train import TrainConfig, train


class TinyNet(torch.nn.Module):
    """SeverityNet's interface (logits, embedding, centers, dropout) in a few hundred weights."""

    def __init__(self, dropout: float = 0.2) -> None:
        super().__init__()
        self.dropout_p = dropout
        self.conv = torch.nn.Conv2d(3, 4, kernel_size=3, stride=4)
        self.bn = torch.nn.BatchNorm2d(4)
        self.dropout = torch.nn.Dropout(dropout)
        self.embed = torch.nn.Linear(4, EMBEDDING_SIZE)
        self.classifier = torch.nn.Linear(EMBEDDING_SIZE, 3)
        self.centers = torch.nn.Parameter(torch.zeros(3, EMBEDDING_SIZE))

    def forward(self, x: torch.Tensor) -> SeverityOutput:
        embedding = self.embed(self.dropout(self.bn(self.conv(x)).relu().mean(dim=(2, 3))))
        return SeverityOutput(self.classifier(embedding), embedding)


@pytest.fixture
def crops(monkeypatch: pytest.MonkeyPatch) -> Iterator[CropSet]:
    monkeypatch.setattr(train_module, "SeverityNet", TinyNet)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: a second thread only adds hand-offs (seconds on a busy machine)
    subjects = np.array([f"p{i}-L{k}" for i in range(6) for k in (1, 2, 3)])
    pixels = np.random.default_rng(0).integers(0, 256, (len(subjects), 16, 16, 3), dtype=np.uint8)
    try:
        yield CropSet(pixels, np.array([int(s[-1]) for s in subjects], np.int8), subjects, subjects,
                      training_preprocessing())
    finally:
        torch.set_num_threads(threads)


def _config(tmp_path: Path, name: str, **changes: object) -> TrainConfig:
    fields: dict[str, object] = dict(
        data=tmp_path / "crops.npz", out=tmp_path / f"{name}.safetensors", checkpoint=tmp_path / f"{name}.ckpt",
        batch_size=4, max_samples=4 * 7, val_fraction=0.2, checkpoint_every=2, log_every=100, device="cpu",
        int8_calibration_crops=0,
    )
    return TrainConfig(**{**fields, **changes})  # type: ignore[arg-type]


def _stop_at_first_checkpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    save = train_module._save_checkpoint

    def save_then_stop(*args: object, **kwargs: object) -> None:
        save(*args, **kwargs)  # type: ignore[arg-type]
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "_save_checkpoint", save_then_stop)


def test_a_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(
        tmp_path: Path, crops: CropSet, monkeypatch: pytest.MonkeyPatch) -> None:
    """Batch order (stopped inside an epoch), augmentation and dropout carry on where they were."""
    straight = train(_config(tmp_path, "straight"), crops)
    with monkeypatch.context() as patch:
        _stop_at_first_checkpoint(patch)
        with pytest.raises(KeyboardInterrupt):
            train(_config(tmp_path, "resumed"), crops)
    assert torch.load(tmp_path / "resumed.ckpt", weights_only=True)["state"]["step"] == 2
    resumed = train(_config(tmp_path, "resumed"), crops)
    assert straight.steps == resumed.steps == 7
    a = torch.load(tmp_path / "straight.ckpt", weights_only=True)
    b = torch.load(tmp_path / "resumed.ckpt", weights_only=True)
    assert a["net"].keys() == b["net"].keys()
    for name in a["net"]:
        torch.testing.assert_close(b["net"][name], a["net"][name], rtol=0, atol=0, msg=name)


def test_a_resumed_run_keeps_the_schedule_fitted_to_the_wall_clock(
        tmp_path: Path, crops: CropSet, monkeypatch: pytest.MonkeyPatch) -> None:
    """max_minutes: the schedule fitted before the stop stands; a fresh time budget does not refit it."""
    fits: list[int] = []

    def fit(config: TrainConfig, limit: int, step: int, *rest: object) -> int:
        fits.append(step)
        return step + 4

    monkeypatch.setattr(train_module, "_fit_schedule", fit)
    config = _config(tmp_path, "capped", max_samples=4 * 100, max_minutes=60.0, log_every=1, checkpoint_every=4)
    with monkeypatch.context() as patch:
        _stop_at_first_checkpoint(patch)
        with pytest.raises(KeyboardInterrupt):
            train(config, crops)
    assert fits == [3]  # the schedule was fitted to 3 + 4 = 7 steps, then the run stopped at step 4
    assert train(config, crops).steps == 7 and fits == [3]
