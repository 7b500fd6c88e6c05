"""Model files: card metadata, roundtrip fidelity, stable hashes and clear refusals."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from acroscreen.server.runtime.model import (
    InceptionResnetV1,
    SeverityModel,
    SeverityNet,
    load_facenet_backbone,
)
from acroscreen.server.runtime.card import METADATA_PREFIX, ModelCard, Preprocessing, card_to_metadata
from acroscreen.server.runtime.weights import (
    LoadedWeights,
    ModelLoadError,
    load_weights,
    read_card,
    read_facenet_checkpoint,
    save_weights,
    untrained_weights,
)
from safetensors import safe_open
from safetensors.torch import save_file

CARD = ModelCard(
    name="acroscreen-phantom",
    version="2024.1",
    kind="phantom-demo",
    preprocessing=Preprocessing(box_height_expand=0.2),
    temperature=1.5,
    training_summary=json.dumps({"epochs": 3, "data": "phantom faces"}),
    notices=("Synthetic data only.", "Not for diagnosis — ünïcode survives."),
)


@pytest.fixture(scope="module")
def source() -> LoadedWeights:
    weights = untrained_weights(seed=0)
    weights.net.backbone.conv2d_1a.bn.num_batches_tracked.fill_(12345)
    return LoadedWeights(weights.net, CARD, "")


@pytest.fixture(scope="module")
def saved(source: LoadedWeights, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    path = tmp_path_factory.mktemp("weights") / "model.safetensors"
    return path, save_weights(path, source.net, source.card)


def _tensors_and_metadata(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(path, "pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}, f.metadata()


def _crops(n: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, 160, 160, 3), dtype=np.uint8)


def test_roundtrip_keeps_predictions_card_and_integers(source: LoadedWeights, saved: tuple[Path, str]) -> None:
    path, sha = saved
    loaded = load_weights(path)
    assert loaded.card == CARD
    assert loaded.sha256 == sha == hashlib.sha256(path.read_bytes()).hexdigest()
    assert all(t.dtype in (torch.float32, torch.int64) for t in loaded.net.state_dict().values())
    tracked = loaded.net.backbone.conv2d_1a.bn.num_batches_tracked
    assert tracked.dtype == torch.int64 and tracked.item() == 12345
    crops = _crops(2)
    before = SeverityModel(source.net, source.card).predict(crops)
    after = SeverityModel(loaded.net, loaded.card).predict(crops)
    np.testing.assert_allclose(after.probabilities, before.probabilities, atol=1e-4)
    scale = np.abs(before.embeddings).max()
    np.testing.assert_allclose(after.embeddings, before.embeddings, atol=5e-3 * scale)


def test_file_stores_fp16_floats_int_buffers_and_every_card_field(saved: tuple[Path, str]) -> None:
    tensors, metadata = _tensors_and_metadata(saved[0])
    assert tensors["backbone.last_linear.weight"].dtype == torch.float16
    assert tensors["backbone.conv2d_1a.bn.num_batches_tracked"].dtype == torch.int64
    for card_field in dataclasses.fields(ModelCard):
        assert METADATA_PREFIX + card_field.name in metadata
    assert metadata == card_to_metadata(CARD)
    assert json.loads(metadata["acroscreen.preprocessing"])["box_height_expand"] == 0.2
    assert read_card(saved[0]) == CARD


def test_same_model_saves_to_same_bytes(source: LoadedWeights, saved: tuple[Path, str], tmp_path: Path) -> None:
    assert save_weights(tmp_path / "again.safetensors", source.net, source.card) == saved[1]
    assert load_weights(saved[0]).sha256 == load_weights(saved[0]).sha256 == saved[1]


def test_float32_save_is_exact(source: LoadedWeights, tmp_path: Path) -> None:
    path = tmp_path / "fp32.safetensors"
    save_weights(path, source.net, source.card, dtype=torch.float32)
    reloaded = load_weights(path).net.state_dict()
    for key, value in source.net.state_dict().items():
        assert torch.equal(reloaded[key], value), key


def test_load_builds_net_with_card_dropout(tmp_path: Path) -> None:
    path = tmp_path / "d.safetensors"
    save_weights(path, SeverityNet(dropout=0.3), dataclasses.replace(CARD, dropout=0.3))
    net = load_weights(path).net
    assert net.dropout_p == net.dropout.p == net.backbone.dropout.p == 0.3
    assert not net.training


def test_save_refuses_card_that_disagrees_with_net(source: LoadedWeights, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="dropout"):
        save_weights(tmp_path / "x.safetensors", source.net, dataclasses.replace(CARD, dropout=0.5))
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "content",
    [b"", b"not a safetensors file at all", b"\xff" * 64],
    ids=["empty", "text", "garbage"],
)
def test_unreadable_file_raises_model_load_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(ModelLoadError, match="bad.safetensors"):
        load_weights(path)


def test_truncated_and_missing_files_raise_model_load_error(saved: tuple[Path, str], tmp_path: Path) -> None:
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(saved[0].read_bytes()[:-1000])
    with pytest.raises(ModelLoadError, match="not a valid safetensors file"):
        load_weights(truncated)
    with pytest.raises(ModelLoadError, match="cannot read"):
        load_weights(tmp_path / "absent.safetensors")


def _rewrite(saved: Path, target: Path, tensors: dict[str, torch.Tensor] | None = None, **metadata: str) -> Path:
    original, original_metadata = _tensors_and_metadata(saved)
    save_file(original | (tensors or {}), target, metadata=original_metadata | metadata)
    return target


def test_wrong_shape_raises_architecture_mismatch(saved: tuple[Path, str], tmp_path: Path) -> None:
    path = _rewrite(saved[0], tmp_path / "shape.safetensors", {"classifier.weight": torch.zeros(4, 1792, 1, 1)})
    with pytest.raises(ModelLoadError, match=r"architecture mismatch: classifier\.weight: shape \(4, 1792, 1, 1\)"):
        load_weights(path)


def test_extra_key_float_counter_and_nan_are_refused(saved: tuple[Path, str], tmp_path: Path) -> None:
    cases = {
        "unexpected keys": {"logits.weight": torch.zeros(3, 512)},
        "num_batches_tracked: dtype": {"backbone.last_bn.num_batches_tracked": torch.tensor(1.0)},
        "non-finite": {"centers": torch.full((3, 512), float("nan"))},
    }
    for expected, tensors in cases.items():
        path = _rewrite(saved[0], tmp_path / "case.safetensors", tensors)
        with pytest.raises(ModelLoadError, match=expected):
            load_weights(path)


def test_missing_or_bad_metadata_raises_model_load_error(saved: tuple[Path, str], tmp_path: Path) -> None:
    tensors, _ = _tensors_and_metadata(saved[0])
    bare = tmp_path / "bare.safetensors"
    save_file(tensors, bare)
    with pytest.raises(ModelLoadError, match="bad model card"):
        load_weights(bare)
    with pytest.raises(ModelLoadError):
        read_card(bare)
    for key, value in {"kind": "oracle", "temperature": "zero", "labels": '["a"]', "architecture": "resnet50"}.items():
        path = _rewrite(saved[0], tmp_path / "meta.safetensors", **{METADATA_PREFIX + key: value})
        with pytest.raises(ModelLoadError, match=key):
            load_weights(path)


def test_card_validation() -> None:
    with pytest.raises(ValueError, match="kind"):
        ModelCard(name="m", version="1", kind="diagnostic")
    with pytest.raises(ValueError, match="temperature"):
        ModelCard(name="m", version="1", kind="clinical", temperature=0.0)
    with pytest.raises(ValueError, match="training_summary"):
        ModelCard(name="m", version="1", kind="clinical", training_summary="[1, 2]")
    with pytest.raises(ValueError, match="channel_order"):
        Preprocessing(channel_order="RGBA")
    assert ModelCard(name="m", version="1", kind="clinical").preprocessing == Preprocessing()


def test_untrained_weights_are_seeded_and_leave_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    first, again, other = untrained_weights(7), untrained_weights(7), untrained_weights(8)
    assert torch.equal(torch.rand(1), expected_next)
    assert first.card.kind == "untrained" and first.sha256 == ""
    weight = "backbone.conv2d_1a.conv.weight"
    assert torch.equal(first.net.state_dict()[weight], again.net.state_dict()[weight])
    assert not torch.equal(first.net.state_dict()[weight], other.net.state_dict()[weight])


def test_facenet_checkpoint_loads_with_weights_only(tmp_path: Path) -> None:
    source = InceptionResnetV1()
    path = tmp_path / "20180402-114759-vggface2.pt"
    torch.save(source.state_dict() | {"logits.weight": torch.zeros(16, 512), "logits.bias": torch.zeros(16)}, path)
    target = InceptionResnetV1()
    load_facenet_backbone(target, read_facenet_checkpoint(path))
    assert torch.equal(target.last_linear.weight, source.last_linear.weight)


def test_facenet_checkpoint_refuses_pickled_objects(tmp_path: Path) -> None:
    pickled = tmp_path / "pickled.pt"
    torch.save({"layer": Path("x")}, pickled)  # an arbitrary class: weights_only must refuse it
    with pytest.raises(ModelLoadError, match="cannot load"):
        read_facenet_checkpoint(pickled)
    not_tensors = tmp_path / "ints.pt"
    torch.save({"a": 1}, not_tensors)
    with pytest.raises(ModelLoadError, match="not a state dict"):
        read_facenet_checkpoint(not_tensors)


def test_card_defaults_are_the_serving_crop() -> None:
    """Untrained weights must ask for the same crop the server and training make."""
    from acroscreen.server.runtime.preprocess import PreprocessSettings

    default = Preprocessing()
    for name, value in PreprocessSettings().card_fields().items():
        assert getattr(default, name) == value, name
