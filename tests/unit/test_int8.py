"""Int8 CPU inference: the shipped scales on real faces, their binding to the weights, calibration."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from acroscreen.client.cli import main as cli_main
from acroscreen.server.main import DEFAULT_WEIGHTS
from acroscreen.server.runtime import int8
from acroscreen.server.runtime.int8 import (
    Int8Error,
    int8_available,
    quantize,
    read_scales,
    scales_path,
)
from acroscreen.server.runtime.model import SeverityModel, cpu_has_native_bf16
from acroscreen.server.runtime.preprocess import FacePreprocessor, PreprocessSettings
from acroscreen.server.runtime.weights import (
    ModelLoadError,
    load_weights,
    save_weights,
    untrained_weights,
)
from acroscreen.server.training.crops import CropSet, save_crops

pytestmark = pytest.mark.skipif(not int8_available(), reason="this PyTorch build has no x86 int8 quantization")


@pytest.fixture(scope="module")
def face_crops(shared_data: Path) -> np.ndarray:
    """Model-ready crops of 24 real photographs, one per identity, made by the serving preprocessor."""
    card = load_weights(DEFAULT_WEIGHTS, with_int8_scales=False).card
    preprocessor = FacePreprocessor(PreprocessSettings.from_card_preprocessing(card.preprocessing))
    crops = []
    for folder in sorted((shared_data / "faces" / "identities").iterdir()):
        for path in sorted(folder.glob("*.jpg"))[:1]:
            _, crop = preprocessor.crop_image(cv2.imread(str(path)))
            if crop is not None:
                crops.append(crop.pixels)
        if len(crops) == 24:
            break
    assert len(crops) == 24
    return np.stack(crops)


def test_shipped_scales_keep_the_float_predictions_on_real_faces(face_crops: np.ndarray) -> None:
    loaded = load_weights(DEFAULT_WEIGHTS)
    assert loaded.int8_scales is not None and loaded.int8_scales.weights_sha256 == loaded.sha256
    float32 = SeverityModel(loaded.net, loaded.card, cpu_precision="fp32")
    before = float32.predict(face_crops).probabilities
    int8 = SeverityModel(loaded.net, loaded.card, cpu_precision="int8", int8_scales=loaded.int8_scales)
    assert int8.precision == "int8"
    quantized = int8.predict(face_crops).probabilities
    # Quantizing the shared network must not have touched the float one, nor left attributes on it.
    np.testing.assert_array_equal(float32.predict(face_crops).probabilities, before)
    assert not [name for name, module in loaded.net.named_modules() if hasattr(module, "qconfig")]
    change = np.abs(quantized - before)
    assert change.mean() < 0.02 and change.max() < 0.15, (change.mean(), change.max())
    assert (quantized.argmax(1) == before.argmax(1)).sum() >= 22
    np.testing.assert_allclose(quantized.sum(1), 1.0, atol=1e-5)


def test_seven_bit_activations_where_the_cpu_lacks_vnni_keep_the_float_predictions(
    face_crops: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    """x86 without VNNI sums uint8 × int8 products in saturating 16 bits: with 8-bit activations
    the demo model's probabilities moved by up to 0.31 on an AVX2 EPYC. 7-bit ones are exact
    enough on any x86, so this holds whatever CPU runs it."""
    monkeypatch.setattr(int8, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    assert int8.reduced_range()
    loaded = load_weights(DEFAULT_WEIGHTS)
    before = SeverityModel(loaded.net, loaded.card, cpu_precision="fp32").predict(face_crops).probabilities
    seven_bit = SeverityModel(loaded.net, loaded.card, cpu_precision="int8", int8_scales=loaded.int8_scales)
    change = np.abs(seven_bit.predict(face_crops).probabilities - before)
    assert change.mean() < 0.01 and change.max() < 0.1, (change.mean(), change.max())
    for flag in ("avx512_vnni", "avx_vnni", "amx_int8"):
        monkeypatch.setattr(int8, "cpu_flags", lambda flag=flag: frozenset({"avx2", flag}))
        assert not int8.reduced_range()


def test_auto_takes_int8_only_with_scales() -> None:
    loaded = load_weights(DEFAULT_WEIGHTS)
    assert SeverityModel(loaded.net, loaded.card, int8_scales=loaded.int8_scales).precision == "int8"
    bare = untrained_weights()
    assert SeverityModel(bare.net, bare.card).precision == ("bf16" if cpu_has_native_bf16() else "fp32")
    with pytest.raises(ValueError, match="int8 scales"):
        SeverityModel(bare.net, bare.card, cpu_precision="int8")


def test_scales_are_bound_to_their_weights_and_graph(tmp_path: Path) -> None:
    shipped = scales_path(DEFAULT_WEIGHTS)
    other = tmp_path / "other.safetensors"
    bare = untrained_weights()
    sha256 = save_weights(other, bare.net, bare.card)
    scales_path(other).write_bytes(shipped.read_bytes())  # a stale file beside different weights
    with pytest.raises(ModelLoadError, match="calibrated for weights sha256"):
        load_weights(other)
    assert load_weights(other, with_int8_scales=False).int8_scales is None

    foreign = dataclasses.replace(read_scales(shipped, load_weights(DEFAULT_WEIGHTS).sha256), weights_sha256=sha256)
    trimmed = dataclasses.replace(foreign, activations=dict(list(foreign.activations.items())[1:]))
    with pytest.raises(Int8Error, match="1 activations without a scale"):
        quantize(bare.net, trimmed, 160)

    scales_path(other).write_text("{not json", encoding="utf-8")
    with pytest.raises(ModelLoadError, match="not a readable int8 scales file"):
        load_weights(other)
    scales_path(other).write_text(json.dumps({"format": "something-else"}), encoding="utf-8")
    with pytest.raises(ModelLoadError, match="format"):
        load_weights(other)


def test_calibrate_command_writes_scales_the_loader_uses(
    face_crops: np.ndarray, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    weights = tmp_path / "model.safetensors"
    bare = untrained_weights(seed=3)
    save_weights(weights, bare.net, bare.card)
    n = len(face_crops)
    crops = CropSet(
        pixels=face_crops, scores=np.ones(n, np.int8), subjects=np.array([f"s{i}" for i in range(n)]),
        paths=np.array([f"p{i}.jpg" for i in range(n)]), preprocessing=dataclasses.asdict(bare.card.preprocessing),
    )
    save_crops(crops, tmp_path / "crops.npz")

    assert cli_main(["calibrate-int8", str(tmp_path / "crops.npz"), "--model", str(weights), "--crops", "16"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["calibration_crops"] == 16 and report["check_crops"] == n - 16
    assert report["scales_file"] == str(scales_path(weights))
    assert 0.0 <= report["mean_abs_probability_change"] <= report["max_abs_probability_change"] <= 1.0

    loaded = load_weights(weights)
    assert loaded.int8_scales is not None and loaded.int8_scales.calibration.startswith("16 crops of crops.npz")
    model = SeverityModel(loaded.net, loaded.card, int8_scales=loaded.int8_scales)
    assert model.precision == "int8"
    probabilities = model.predict(face_crops[:4]).probabilities
    assert probabilities.shape == (4, 3) and np.all(np.isfinite(probabilities))
