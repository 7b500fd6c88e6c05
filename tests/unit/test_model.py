"""The network's facenet compatibility, its two heads, and the runtime wrapper's contract."""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import pytest
import torch
from acroscreen.server.runtime.model import (
    InceptionResnetV1,
    SeverityModel,
    SeverityNet,
    SeverityOutput,
    center_loss,
    cpu_has_native_bf16,
    load_facenet_backbone,
)
from acroscreen.server.runtime.weights import LoadedWeights, untrained_weights

# Computed from timesler/facenet-pytorch models/inception_resnet_v1.py (commit 0286fa3):
# sha256 of "key:shape:dtype" lines, sorted by key, of its state dict without logits.*,
# which holds 714 entries and 23,482,624 parameters.
FACENET_LAYOUT_SHA256 = "e3c2b8c0c741d9b3a394e8f2961eb3348f2c38896c4bb831cb1617103fe83619"
FACENET_SHAPES = {
    "conv2d_1a.conv.weight": (32, 3, 3, 3),
    "conv2d_4b.bn.running_var": (256,),
    "repeat_1.0.branch2.2.conv.weight": (32, 32, 3, 3),
    "repeat_1.4.conv2d.weight": (256, 96, 1, 1),
    "repeat_2.9.branch1.1.conv.weight": (128, 128, 1, 7),
    "repeat_2.9.branch1.2.conv.weight": (128, 128, 7, 1),
    "mixed_6a.branch1.2.conv.weight": (256, 192, 3, 3),
    "mixed_7a.branch2.2.conv.weight": (256, 256, 3, 3),
    "repeat_3.4.branch1.1.conv.weight": (192, 192, 1, 3),
    "block8.conv2d.weight": (1792, 384, 1, 1),
    "block8.conv2d.bias": (1792,),
    "last_linear.weight": (512, 1792),
    "last_bn.weight": (512,),
    "last_bn.num_batches_tracked": (),
}


def _layout_digest(state: dict[str, torch.Tensor]) -> str:
    lines = "\n".join(f"{k}:{tuple(v.shape)}:{v.dtype}" for k, v in sorted(state.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


@pytest.fixture(scope="module")
def loaded() -> LoadedWeights:
    weights = untrained_weights(seed=0)
    with torch.no_grad():  # distinct logits, so temperature visibly matters
        weights.net.classifier.bias.copy_(torch.tensor([1.0, 0.0, -1.0]))
    return weights


@pytest.fixture(scope="module")
def model(loaded: LoadedWeights) -> SeverityModel:
    return SeverityModel(loaded.net, loaded.card, "cpu", cpu_precision="fp32")  # exact comparisons below


def _crops(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 160, 160, 3), dtype=np.uint8)


def test_backbone_layout_matches_facenet() -> None:
    backbone = InceptionResnetV1()
    state = backbone.state_dict()
    assert len(state) == 714
    assert sum(p.numel() for p in backbone.parameters()) == 23_482_624
    assert {k: tuple(state[k].shape) for k in FACENET_SHAPES} == FACENET_SHAPES
    assert state["last_bn.num_batches_tracked"].dtype == torch.int64
    assert _layout_digest(state) == FACENET_LAYOUT_SHA256
    bn = backbone.conv2d_1a.bn
    assert (bn.eps, bn.momentum, bn.affine) == (0.001, 0.1, True)
    assert (backbone.last_bn.eps, backbone.last_bn.momentum) == (0.001, 0.1)
    assert backbone.conv2d_1a.conv.bias is None and backbone.last_linear.bias is None
    assert [b.scale for b in backbone.repeat_1] == [0.17] * 5
    assert [b.scale for b in backbone.repeat_2] == [0.10] * 10
    assert [b.scale for b in backbone.repeat_3] == [0.20] * 5
    assert not backbone.block8.activate


def test_load_facenet_backbone_drops_logits_and_loads_strictly() -> None:
    source = InceptionResnetV1()
    with torch.no_grad():
        source.last_linear.weight.normal_()
        source.conv2d_1a.bn.running_mean.uniform_()
    checkpoint = source.state_dict() | {"logits.weight": torch.zeros(8631, 512), "logits.bias": torch.zeros(8631)}
    target = InceptionResnetV1()
    load_facenet_backbone(target, checkpoint)
    for key, value in target.state_dict().items():
        assert torch.equal(value, checkpoint[key]), key


def test_load_facenet_backbone_reports_every_mismatch() -> None:
    checkpoint = InceptionResnetV1().state_dict()
    del checkpoint["block8.conv2d.bias"]
    checkpoint["last_linear.weight"] = torch.zeros(128, 1792)
    checkpoint["extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError) as info:
        load_facenet_backbone(InceptionResnetV1(), checkpoint)
    message = str(info.value)
    assert "block8.conv2d.bias" in message
    assert "last_linear.weight: shape (128, 1792), expected (512, 1792)" in message
    assert "extra.weight" in message


def test_severity_net_heads(loaded: LoadedWeights) -> None:
    net = loaded.net.eval()
    x = torch.randn(2, 3, 160, 160)
    with torch.inference_mode():
        out = net(x)
        feature_map = net.backbone(x)
        expected_logits = net.classifier(feature_map).mean(dim=(2, 3))
        expected_embedding = net.backbone.last_bn(net.backbone.last_linear(feature_map.mean(dim=(2, 3))))
    assert isinstance(out, SeverityOutput)
    assert feature_map.shape == (2, 1792, 3, 3)
    assert out.logits.shape == (2, 3) and out.embedding.shape == (2, 512)
    torch.testing.assert_close(out.logits, expected_logits)
    torch.testing.assert_close(out.embedding, expected_embedding)
    state = net.state_dict()
    assert state["classifier.weight"].shape == (3, 1792, 1, 1)
    assert isinstance(net.centers, torch.nn.Parameter) and net.centers.shape == (3, 512)


def test_severity_net_dropout_configurable() -> None:
    net = SeverityNet(dropout=0.4)
    assert net.dropout.p == net.backbone.dropout.p == net.dropout_p == 0.4
    with pytest.raises(ValueError):
        SeverityNet(dropout=1.0)


def test_center_loss_value_and_gradients() -> None:
    embedding = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]], requires_grad=True)
    centers = torch.nn.Parameter(torch.tensor([[0.0, 0.0], [0.0, 0.0], [3.0, 1.0]]))
    labels = torch.tensor([0, 1, 2])
    loss = center_loss(embedding, labels, centers)
    torch.testing.assert_close(loss, torch.tensor((1.0 + 4.0 + 4.0) / 2 / 3))
    loss.backward()
    assert embedding.grad is not None and centers.grad is not None
    assert centers.grad[2].tolist() == pytest.approx([0.0, -2.0 / 3])
    with pytest.raises(ValueError):
        center_loss(embedding, torch.tensor([0, 1]), centers)


def test_predict_shapes_and_probabilities(model: SeverityModel) -> None:
    batch = model.predict(_crops(2))
    assert batch.probabilities.shape == (2, 3) and batch.probabilities.dtype == np.float32
    assert batch.embeddings.shape == (2, 512) and batch.embeddings.dtype == np.float32
    np.testing.assert_allclose(batch.probabilities.sum(axis=1), 1.0, rtol=1e-5)
    assert not batch.probabilities.flags.writeable and not batch.embeddings.flags.writeable


def test_predict_matches_network_with_card_normalisation(loaded: LoadedWeights, model: SeverityModel) -> None:
    crops = _crops(2, seed=1)
    x = torch.from_numpy(crops).permute(0, 3, 1, 2).float().sub(127.5).div(128.0)
    with torch.inference_mode():
        out = loaded.net(x)
    batch = model.predict(crops)
    np.testing.assert_allclose(batch.probabilities, torch.softmax(out.logits, 1).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(batch.embeddings, out.embedding.numpy(), rtol=1e-5, atol=1e-5)


def test_predict_is_deterministic_in_eval_mode(loaded: LoadedWeights) -> None:
    loaded.net.train()
    model = SeverityModel(loaded.net, loaded.card)
    assert not loaded.net.training
    crops = _crops(2, seed=2)
    np.testing.assert_array_equal(model.predict(crops).probabilities, model.predict(crops).probabilities)


def test_temperature_changes_sharpness(loaded: LoadedWeights, model: SeverityModel) -> None:
    crops = _crops(1, seed=3)
    sharp = SeverityModel(loaded.net, dataclasses.replace(loaded.card, temperature=0.5), cpu_precision="fp32").predict(crops)
    soft = SeverityModel(loaded.net, dataclasses.replace(loaded.card, temperature=2.0), cpu_precision="fp32").predict(crops)
    plain = model.predict(crops)
    assert sharp.probabilities.max() > plain.probabilities.max() > soft.probabilities.max()
    logits = np.log(plain.probabilities[0])
    expected = np.exp(logits / 2.0) / np.exp(logits / 2.0).sum()
    np.testing.assert_allclose(soft.probabilities[0], expected, rtol=1e-4)
    np.testing.assert_array_equal(sharp.embeddings, soft.embeddings)


def test_bgr_card_reverses_channels(loaded: LoadedWeights, model: SeverityModel) -> None:
    bgr_card = dataclasses.replace(
        loaded.card, preprocessing=dataclasses.replace(loaded.card.preprocessing, channel_order="BGR")
    )
    crops = _crops(1, seed=4)
    flipped = SeverityModel(loaded.net, bgr_card, cpu_precision="fp32").predict(crops[..., ::-1])
    np.testing.assert_allclose(flipped.probabilities, model.predict(crops).probabilities, rtol=1e-5)


@pytest.mark.parametrize(
    "crops",
    [
        np.zeros((1, 160, 160, 3), np.float32),
        np.zeros((1, 160, 160, 4), np.uint8),
        np.zeros((1, 128, 128, 3), np.uint8),
        np.zeros((160, 160, 3), np.uint8),
        [[0]],
    ],
    ids=["float32", "four-channels", "wrong-size", "no-batch-axis", "not-an-array"],
)
def test_predict_rejects_bad_input(model: SeverityModel, crops: object) -> None:
    with pytest.raises(ValueError):
        model.predict(crops)  # type: ignore[arg-type]


def test_predict_accepts_read_only_and_empty_input(model: SeverityModel) -> None:
    crops = _crops(1, seed=5)
    crops.flags.writeable = False
    assert model.predict(crops).probabilities.shape == (1, 3)
    empty = model.predict(np.zeros((0, 160, 160, 3), np.uint8))
    assert empty.probabilities.shape == (0, 3) and empty.embeddings.shape == (0, 512)


def test_predict_checks_output_batch_size(loaded: LoadedWeights, monkeypatch: pytest.MonkeyPatch) -> None:
    model = SeverityModel(loaded.net, loaded.card)
    real_forward = loaded.net.forward

    def dropping_forward(x: torch.Tensor) -> SeverityOutput:
        out = real_forward(x)
        return SeverityOutput(out.logits[:1], out.embedding[:1])

    monkeypatch.setattr(loaded.net, "forward", dropping_forward)
    with pytest.raises(RuntimeError, match="batch of 2 crops"):
        model.predict(_crops(2))


def test_warmup_and_device_validation(loaded: LoadedWeights, model: SeverityModel) -> None:
    model.warmup()
    with pytest.raises(ValueError):
        SeverityModel(loaded.net, loaded.card, "meta")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            SeverityModel(loaded.net, loaded.card, "cuda")


def test_cpu_bf16_matches_fp32_and_auto_follows_the_cpu(loaded: LoadedWeights, model: SeverityModel) -> None:
    crops = _crops(4, seed=7)
    bf16 = SeverityModel(loaded.net, loaded.card, cpu_precision="bf16")
    assert bf16.precision == "bf16" and model.precision == "fp32"
    np.testing.assert_allclose(bf16.predict(crops).probabilities, model.predict(crops).probabilities, atol=2e-2)
    auto = SeverityModel(loaded.net, loaded.card)
    assert auto.precision == ("bf16" if cpu_has_native_bf16() else "fp32")
    with pytest.raises(ValueError, match="cpu_precision"):
        SeverityModel(loaded.net, loaded.card, cpu_precision="int4")


def test_non_finite_probabilities_are_an_error_not_a_score() -> None:
    """A network that computes NaN (as CUDA graphs did once, replaying freed weights) fails its batch."""
    broken = untrained_weights(0)
    with torch.no_grad():
        broken.net.classifier.bias[1] = float("nan")
    model = SeverityModel(broken.net, broken.card, "cpu", cpu_precision="fp32")
    with pytest.raises(RuntimeError, match="non-finite probabilities for 2 crops"):
        model.predict(_crops(2))


def test_graph_batch_sizes_and_buckets() -> None:
    from acroscreen.server.runtime.cuda_graphs import bucket_for, powers_of_two_up_to

    assert powers_of_two_up_to(16) == (1, 2, 4, 8, 16) and powers_of_two_up_to(24) == (1, 2, 4, 8, 16, 24)
    assert powers_of_two_up_to(1) == (1,)
    sizes = (1, 2, 4, 8, 16)
    assert [bucket_for(n, sizes) for n in (1, 2, 3, 5, 9, 16, 40)] == [1, 2, 4, 8, 16, 16, 16]
    with pytest.raises(ValueError):
        bucket_for(0, sizes)


def test_cpu_model_ignores_graph_sizes(loaded: LoadedWeights) -> None:
    model = SeverityModel(loaded.net, loaded.card, "cpu", cpu_precision="fp32", graph_batch_sizes=(1, 2, 4))
    assert model.graph_batch_sizes == ()
    assert model.predict(_crops(3)).probabilities.shape == (3, 3)


@pytest.mark.gpu
def test_cuda_graphs_match_eager_for_padded_and_chunked_batches() -> None:
    """Needs a CUDA device (marked gpu): graph replays equal eager fp16 for 1, 3 (padded) and 40 (chunked) rows."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    eager = SeverityModel(untrained_weights(0).net, untrained_weights(0).card, "cuda")
    graphs = SeverityModel(untrained_weights(0).net, untrained_weights(0).card, "cuda", graph_batch_sizes=(1, 2, 4, 8, 16))
    assert graphs.graph_batch_sizes == (1, 2, 4, 8, 16)
    for rows in (1, 3, 40):
        crops = _crops(rows, seed=rows)
        expected, got = eager.predict(crops), graphs.predict(crops)
        np.testing.assert_allclose(got.probabilities, expected.probabilities, atol=5e-3)
        np.testing.assert_allclose(got.embeddings, expected.embeddings, atol=2e-2 * np.abs(expected.embeddings).max())


@pytest.mark.gpu
def test_cuda_matches_cpu_within_fp16_tolerance() -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    crops = _crops(8, seed=6)
    cpu = SeverityModel(untrained_weights(0).net, untrained_weights(0).card, "cpu").predict(crops)
    gpu_model = SeverityModel(untrained_weights(0).net, untrained_weights(0).card, "cuda")
    gpu_model.warmup()
    gpu = gpu_model.predict(crops)
    np.testing.assert_allclose(gpu.probabilities, cpu.probabilities, atol=5e-3)
    np.testing.assert_allclose(gpu.embeddings, cpu.embeddings, atol=2e-2 * np.abs(cpu.embeddings).max())
