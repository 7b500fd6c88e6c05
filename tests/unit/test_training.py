"""Training on a handful of phantom crops: the loss falls, the config is saved, the weights load."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT.parent / "shared" / "data"
IDENTITIES = ("Eileen_Collins", "Akbar_Hashemi_Rafsanjani", "Alberto_Ruiz_Gallardon")
needs_data = pytest.mark.skipif(not (DATA / "faces" / "identities").is_dir(),
                                reason=f"shared test data not found at {DATA}")


def test_training_loop_imports_neither_dlib_nor_the_cascade() -> None:
    code = ("import sys, acroscreen.server.training.train, acroscreen.server.training.evaluate; "
            "assert 'dlib' not in sys.modules; "
            "assert not any(m.endswith('runtime.detect') for m in sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_split_keeps_people_together() -> None:
    from acroscreen.server.training.train import split_by_group, split_group

    assert split_group("Jane_Doe-L3") == "Jane_Doe" and split_group("patient-7") == "patient-7"
    subjects = np.array([f"p{i}-L{k}" for i in range(10) for k in (1, 2, 3)])
    val = split_by_group(subjects, 0.3, seed=0)
    val_people = {s.split("-")[0] for s in subjects[val]}
    train_people = {s.split("-")[0] for s in subjects[~val]}
    assert len(val_people) == 3 and not val_people & train_people


def test_device_train_variants_never_train_on_the_shared_validation_people(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A variant trained on more caches (more people) keeps the common validation people out of training."""
    import argparse
    import importlib.util

    from acroscreen.server.training import train as train_module
    from acroscreen.server.training.crops import CropSet, save_crops, training_preprocessing
    from acroscreen.server.training.train import split_group

    spec = importlib.util.spec_from_file_location("device_train", ROOT / "scripts" / "device_train.py")
    assert spec is not None and spec.loader is not None
    device_train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(device_train)

    def cache(path: Path, people: list[str]) -> Path:
        subjects = np.array([f"{person}-L{k}" for person in people for k in (1, 2, 3)])
        save_crops(CropSet(np.zeros((len(subjects), 2, 2, 3), np.uint8), np.array([int(s[-1]) for s in subjects]),
                           subjects, subjects, training_preprocessing()), path)
        return path

    common = cache(tmp_path / "a.npz", [f"p{i:02d}" for i in range(40)])
    more = cache(tmp_path / "b.npz", [f"q{i:02d}" for i in range(10)])
    calls = []
    monkeypatch.setattr(train_module, "train", lambda config, crops: calls.append((config, crops)))
    args = argparse.Namespace(train=[common], work=tmp_path, minutes=1.0, max_samples=8, batch=4, patience=1,
                              log_every=1)
    device_train.train_one(args, "more", {"train": f"{common}+{more}"})
    (config, crops), = calls
    assert len(crops) == 150
    shared = {split_group(s) for s in device_train.validation_crops(args).subjects.tolist()}
    trained = {split_group(s) for s in crops.subjects[~train_module.validation_mask(crops.subjects, config)].tolist()}
    assert len(shared) == 6 and not shared & trained
    assert len(trained) == 44  # every other person, the new ones included, is trained on


def test_temperature_fit_recovers_a_known_temperature() -> None:
    import torch
    from acroscreen.server.training.train import fit_temperature

    generator = torch.Generator().manual_seed(0)
    true_logits = torch.randn(4000, 3, generator=generator) * 2.0
    labels = torch.multinomial(torch.softmax(true_logits, 1), 1, generator=generator).squeeze(1)
    assert fit_temperature(true_logits * 3.0, labels) == pytest.approx(3.0, rel=0.1)


@pytest.fixture(scope="module")
def phantom_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from acroscreen.server.training.phantom import run_phantom

    if not (DATA / "faces" / "identities").is_dir():
        pytest.skip(f"shared test data not found at {DATA}")
    root = tmp_path_factory.mktemp("phantoms")
    for name in IDENTITIES:
        (root / "identities" / name).mkdir(parents=True)
        source = DATA / "faces" / "identities" / name / "1.jpg"
        (root / "identities" / name / "1.jpg").write_bytes(source.read_bytes())
    run_phantom(root / "identities", root / "data", per_image=1, split="all")
    return root


@needs_data
def test_a_few_steps_reduce_the_loss_and_write_loadable_weights(phantom_data: Path) -> None:
    from acroscreen.server.runtime.int8 import int8_available
    from acroscreen.server.runtime.weights import load_weights
    from acroscreen.server.training.crops import load_or_build_crops
    from acroscreen.server.training.train import TrainConfig, train

    out = phantom_data / "model" / "m.safetensors"
    cache = phantom_data / "crops.npz"
    config = TrainConfig(
        data=phantom_data / "data", out=out, cache=cache, batch_size=4, max_samples=4 * 6, lr=3e-4,
        dropout=0.0, brightness=0.0, saturation=0.0, noise_std=0.0, shift_px=0, val_fraction=0.34,
        log_every=1, eval_every=3, workers=1, device="cpu",
    )
    crops = load_or_build_crops(config.data, cache, workers=1)
    assert len(crops) >= 6 and cache.is_file()
    result = train(config, crops)
    assert len(result.losses) == 6
    assert np.mean(result.losses[-2:]) < np.mean(result.losses[:2])

    saved = json.loads(out.with_suffix(".config.json").read_text())
    assert saved["batch_size"] == 4 and saved["center_weight"] == config.center_weight
    loaded = load_weights(out)
    assert loaded.card.kind == "phantom-demo"
    assert loaded.card.preprocessing.input_size == crops.pixels.shape[1]
    assert loaded.card.temperature == pytest.approx(result.temperature)
    summary = json.loads(loaded.card.training_summary)
    assert summary["steps"] == 6 and summary["training_crops"] + summary["validation_crops"] == len(crops)
    # The cache is reused, not rebuilt, for the same images and preprocessing.
    assert load_or_build_crops(config.data, cache).paths.tolist() == crops.paths.tolist()
    # Int8 scales from the training crops, bound to the new file.
    if int8_available():
        assert loaded.int8_scales is not None and loaded.int8_scales.weights_sha256 == loaded.sha256
        assert "training split" in loaded.int8_scales.calibration


@needs_data
def test_with_ema_the_saved_weights_are_the_average_and_resume_keeps_it(phantom_data: Path) -> None:
    """`ema_decay`: validation and the saved file use the averaged weights, which the checkpoint carries."""
    import torch
    from acroscreen.server.runtime.weights import load_weights
    from acroscreen.server.training.crops import load_or_build_crops
    from acroscreen.server.training.train import TrainConfig, train

    crops = load_or_build_crops(phantom_data / "data", phantom_data / "crops.npz", workers=1)
    checkpoint = phantom_data / "ema.ckpt"
    config = TrainConfig(data=phantom_data / "data", out=phantom_data / "ema.safetensors", batch_size=4,
                         max_samples=4 * 4, eval_every=4, ema_decay=0.5, val_fraction=0.34, workers=1,
                         device="cpu", checkpoint=checkpoint, checkpoint_every=2, int8_calibration_crops=0)
    train(config, crops)
    saved = torch.load(checkpoint, weights_only=True)
    averaged = {k.removeprefix("module."): v for k, v in saved["averaged"].items()}
    written = load_weights(config.out)
    assert json.loads(written.card.training_summary)["ema_decay"] == 0.5
    weights = [k for k, v in written.net.state_dict().items() if v.ndim > 1 and k != "centers"]
    raw_differs = 0
    for name in weights:
        value = written.net.state_dict()[name].float()
        torch.testing.assert_close(value, averaged[name].half().float())
        raw_differs += not torch.equal(saved["net"][name].half().float(), value)
    assert raw_differs > len(weights) // 2  # the raw weights are not what was saved

    # Resuming at the end loads the average too: nothing left to train, the same file comes out.
    train(config, crops)
    again = load_weights(config.out).net.state_dict()
    assert all(torch.equal(again[name], written.net.state_dict()[name]) for name in weights)


@needs_data
def test_fine_tuning_starts_from_the_given_weights(phantom_data: Path) -> None:
    """`init_weights`: every parameter comes from the file (checked with lr 0), and its preprocessing must match."""
    import dataclasses

    import torch
    from acroscreen.server.runtime.weights import load_weights, save_weights, untrained_weights
    from acroscreen.server.training.crops import load_or_build_crops
    from acroscreen.server.training.train import TrainConfig, train

    crops = load_or_build_crops(phantom_data / "data", phantom_data / "crops.npz", workers=1)
    source = untrained_weights(seed=3)
    card = dataclasses.replace(source.card, preprocessing=type(source.card.preprocessing)(**crops.preprocessing))
    start = phantom_data / "start.safetensors"
    save_weights(start, source.net, card)
    config = TrainConfig(data=phantom_data / "data", out=phantom_data / "tuned.safetensors", init_weights=start,
                         batch_size=4, max_samples=4, lr=0.0, val_fraction=0.34, workers=1, device="cpu",
                         int8_calibration_crops=0)
    train(config, crops)
    tuned = load_weights(config.out).net.state_dict()
    started = load_weights(start).net.state_dict()
    weights = [name for name, value in started.items() if value.ndim > 1 and name != "centers"]
    assert weights and all(torch.equal(tuned[name], started[name]) for name in weights)

    other = dataclasses.replace(card, preprocessing=dataclasses.replace(card.preprocessing, box_height_expand=0.1))
    save_weights(start, source.net, other)
    with pytest.raises(ValueError, match="trained with"):
        train(config, crops)


@needs_data
def test_68_point_training_crops_and_evaluation_follow_the_models_preprocessing(phantom_data: Path) -> None:
    """`landmark_points=68` trains on "frontal-3d-v1" crops; `evaluate --model` crops as the model's card says."""
    import dataclasses

    from acroscreen.server.runtime.weights import save_weights, untrained_weights
    from acroscreen.server.training.crops import load_or_build_crops, training_preprocessing
    from acroscreen.server.training.evaluate import predict_with_model

    five = load_or_build_crops(phantom_data / "data", phantom_data / "crops.npz", workers=1)
    sixty_eight = load_or_build_crops(phantom_data / "data", phantom_data / "crops68.npz", workers=1,
                                      preprocessing=training_preprocessing(68))
    assert sixty_eight.preprocessing["alignment"] == "frontal-3d-v1"
    assert sixty_eight.preprocessing["landmark_points"] == 68
    assert five.preprocessing["alignment"] == "similarity-eyes-v1"
    assert len(sixty_eight) == len(five) and not np.array_equal(sixty_eight.pixels, five.pixels)
    with pytest.raises(ValueError, match="made with"):
        load_or_build_crops(phantom_data / "crops.npz", preprocessing=training_preprocessing(68))

    source = untrained_weights(seed=5)
    card = dataclasses.replace(source.card, preprocessing=type(source.card.preprocessing)(**sixty_eight.preprocessing))
    model = phantom_data / "model68.safetensors"
    save_weights(model, source.net, card)
    predictions = predict_with_model(model, phantom_data / "crops68.npz", device="cpu")
    assert len(predictions.actual) == len(sixty_eight)
    with pytest.raises(ValueError, match="made with"):
        predict_with_model(model, phantom_data / "crops.npz", device="cpu")


@needs_data
def test_face_descriptors_of_crops_tell_people_apart_and_belong_to_their_crops(phantom_data: Path) -> None:
    """The distillation targets: dlib's descriptors of one person's phantoms (three levels) lie closer
    together than two people's; they are read back only for the crops they were made for."""
    from acroscreen.server.training.crops import load_or_build_crops
    from acroscreen.server.training.descriptors import load_descriptors, write_descriptors

    crops = load_or_build_crops(phantom_data / "data", phantom_data / "crops.npz", workers=1)
    stored = write_descriptors(crops, phantom_data / "descriptors.npz", processes=1)
    descriptors = load_descriptors(stored, crops)
    assert descriptors.shape == (len(crops), 128)
    people = np.array([s.rsplit("-L", 1)[0] for s in crops.subjects])
    distance = np.linalg.norm(descriptors[:, None] - descriptors[None], axis=2)
    same = (people[:, None] == people[None]) & ~np.eye(len(people), dtype=bool)
    assert distance[same].max() < distance[people[:, None] != people[None]].min()
    with pytest.raises(ValueError, match="other crops"):
        load_descriptors(stored, crops.subset(np.arange(len(crops))[::-1]))


@needs_data
def test_distillation_trains_a_head_that_is_not_saved(phantom_data: Path) -> None:
    """`distill`: the loss gets the descriptor term, the checkpoint keeps the head, the weights file does not."""
    import torch
    from acroscreen.server.runtime.weights import load_weights
    from acroscreen.server.training.crops import load_or_build_crops
    from acroscreen.server.training.descriptors import write_descriptors
    from acroscreen.server.training.train import TrainConfig, train

    crops = load_or_build_crops(phantom_data / "data", phantom_data / "crops.npz", workers=1)
    stored = phantom_data / "descriptors.npz"
    if not stored.is_file():
        write_descriptors(crops, stored, processes=1)
    checkpoint = phantom_data / "distill.ckpt"
    config = TrainConfig(data=phantom_data / "data", out=phantom_data / "distilled.safetensors", batch_size=4,
                         max_samples=4 * 6, lr=3e-4, dropout=0.0, brightness=0.0, saturation=0.0, noise_std=0.0,
                         shift_px=0, val_fraction=0.34, log_every=1, eval_every=3, workers=1, device="cpu",
                         distill=stored, distill_weight=5.0, checkpoint=checkpoint, int8_calibration_crops=0)
    result = train(config, crops)
    assert np.mean(result.losses[-2:]) < np.mean(result.losses[:2])
    assert torch.load(checkpoint, weights_only=True)["distill_head"]["weight"].shape == (128, 512)
    written = load_weights(config.out)  # strict: the serving architecture, no head
    assert json.loads(written.card.training_summary)["distill_weight"] == 5.0
