"""The severity network and the runtime wrapper the batcher calls.

The backbone is Inception-ResNet-V1 with parameter names and shapes identical to
facenet-pytorch's ``InceptionResnetV1`` (MIT, timesler/facenet-pytorch), so a published
CASIA-WebFace or VGGFace2 checkpoint initialises it. On top sit the paper's two heads: a
softmax branch (dropout, 1x1 conv to the classes, global average pooling) and a
center-loss branch (facenet's own embedding head, 512-d) with trainable class centers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch
from torch import nn

from ..config import CPU_PRECISIONS
from .cpu import cpu_flags

if TYPE_CHECKING:
    from acroscreen.server.runtime.card import ModelCard
    from acroscreen.server.runtime.int8 import Int8Scales

log = logging.getLogger(__name__)

NUM_CLASSES = 3
EMBEDDING_SIZE = 512
FEATURE_CHANNELS = 1792
DEFAULT_DROPOUT = 0.2


class BasicConv2d(nn.Module):
    """Conv without bias, BatchNorm (TensorFlow's eps), ReLU."""

    def __init__(
        self,
        in_planes: int,
        out_planes: int,
        kernel_size: int | tuple[int, int],
        stride: int,
        padding: int | tuple[int, int] = 0,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            in_planes, out_planes, kernel_size=kernel_size, stride=stride, padding=padding, bias=False
        )
        self.bn = nn.BatchNorm2d(out_planes, eps=0.001, momentum=0.1, affine=True)
        self.relu = nn.ReLU(inplace=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(x)))


class _Residual(nn.Module):
    """Shared forward of the residual Inception blocks: concat branches, project, scale, add."""

    scale: float
    activate: bool
    conv2d: nn.Conv2d
    relu: nn.ReLU

    def _branches(self, x: torch.Tensor) -> list[torch.Tensor]:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2d(torch.cat(self._branches(x), 1)) * self.scale + x
        return self.relu(out) if self.activate else out


class Block35(_Residual):
    """Inception-ResNet-A (35x35 grid in the original 299 input)."""

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self.scale, self.activate = scale, True
        self.branch0 = BasicConv2d(256, 32, kernel_size=1, stride=1)
        self.branch1 = nn.Sequential(
            BasicConv2d(256, 32, kernel_size=1, stride=1),
            BasicConv2d(32, 32, kernel_size=3, stride=1, padding=1),
        )
        self.branch2 = nn.Sequential(
            BasicConv2d(256, 32, kernel_size=1, stride=1),
            BasicConv2d(32, 32, kernel_size=3, stride=1, padding=1),
            BasicConv2d(32, 32, kernel_size=3, stride=1, padding=1),
        )
        self.conv2d = nn.Conv2d(96, 256, kernel_size=1, stride=1)
        self.relu = nn.ReLU(inplace=False)

    def _branches(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [self.branch0(x), self.branch1(x), self.branch2(x)]


class Block17(_Residual):
    """Inception-ResNet-B."""

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self.scale, self.activate = scale, True
        self.branch0 = BasicConv2d(896, 128, kernel_size=1, stride=1)
        self.branch1 = nn.Sequential(
            BasicConv2d(896, 128, kernel_size=1, stride=1),
            BasicConv2d(128, 128, kernel_size=(1, 7), stride=1, padding=(0, 3)),
            BasicConv2d(128, 128, kernel_size=(7, 1), stride=1, padding=(3, 0)),
        )
        self.conv2d = nn.Conv2d(256, 896, kernel_size=1, stride=1)
        self.relu = nn.ReLU(inplace=False)

    def _branches(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [self.branch0(x), self.branch1(x)]


class Block8(_Residual):
    """Inception-ResNet-C; the last one (``no_relu``) feeds both heads un-rectified."""

    def __init__(self, scale: float = 1.0, no_relu: bool = False) -> None:
        super().__init__()
        self.scale, self.activate = scale, not no_relu
        self.branch0 = BasicConv2d(1792, 192, kernel_size=1, stride=1)
        self.branch1 = nn.Sequential(
            BasicConv2d(1792, 192, kernel_size=1, stride=1),
            BasicConv2d(192, 192, kernel_size=(1, 3), stride=1, padding=(0, 1)),
            BasicConv2d(192, 192, kernel_size=(3, 1), stride=1, padding=(1, 0)),
        )
        self.conv2d = nn.Conv2d(384, 1792, kernel_size=1, stride=1)
        self.relu = nn.ReLU(inplace=False)

    def _branches(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [self.branch0(x), self.branch1(x)]


class Mixed6a(nn.Module):
    """Reduction-A: 256 -> 896 channels, half the grid."""

    def __init__(self) -> None:
        super().__init__()
        self.branch0 = BasicConv2d(256, 384, kernel_size=3, stride=2)
        self.branch1 = nn.Sequential(
            BasicConv2d(256, 192, kernel_size=1, stride=1),
            BasicConv2d(192, 192, kernel_size=3, stride=1, padding=1),
            BasicConv2d(192, 256, kernel_size=3, stride=2),
        )
        self.branch2 = nn.MaxPool2d(3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat((self.branch0(x), self.branch1(x), self.branch2(x)), 1)


class Mixed7a(nn.Module):
    """Reduction-B: 896 -> 1792 channels, half the grid."""

    def __init__(self) -> None:
        super().__init__()
        self.branch0 = nn.Sequential(
            BasicConv2d(896, 256, kernel_size=1, stride=1),
            BasicConv2d(256, 384, kernel_size=3, stride=2),
        )
        self.branch1 = nn.Sequential(
            BasicConv2d(896, 256, kernel_size=1, stride=1),
            BasicConv2d(256, 256, kernel_size=3, stride=2),
        )
        self.branch2 = nn.Sequential(
            BasicConv2d(896, 256, kernel_size=1, stride=1),
            BasicConv2d(256, 256, kernel_size=3, stride=1, padding=1),
            BasicConv2d(256, 256, kernel_size=3, stride=2),
        )
        self.branch3 = nn.MaxPool2d(3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat((self.branch0(x), self.branch1(x), self.branch2(x), self.branch3(x)), 1)


class InceptionResnetV1(nn.Module):
    """facenet-pytorch's backbone without its ``logits`` layer.

    ``forward`` returns the 1792-channel map after ``block8`` (3x3 for a 160 input), which
    the softmax branch needs; ``embed`` is facenet's embedding head on that map.
    """

    def __init__(self, dropout: float = DEFAULT_DROPOUT) -> None:
        super().__init__()
        self.conv2d_1a = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.conv2d_2a = BasicConv2d(32, 32, kernel_size=3, stride=1)
        self.conv2d_2b = BasicConv2d(32, 64, kernel_size=3, stride=1, padding=1)
        self.maxpool_3a = nn.MaxPool2d(3, stride=2)
        self.conv2d_3b = BasicConv2d(64, 80, kernel_size=1, stride=1)
        self.conv2d_4a = BasicConv2d(80, 192, kernel_size=3, stride=1)
        self.conv2d_4b = BasicConv2d(192, 256, kernel_size=3, stride=2)
        self.repeat_1 = nn.Sequential(*(Block35(scale=0.17) for _ in range(5)))
        self.mixed_6a = Mixed6a()
        self.repeat_2 = nn.Sequential(*(Block17(scale=0.10) for _ in range(10)))
        self.mixed_7a = Mixed7a()
        self.repeat_3 = nn.Sequential(*(Block8(scale=0.20) for _ in range(5)))
        self.block8 = Block8(no_relu=True)
        self.avgpool_1a = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.last_linear = nn.Linear(FEATURE_CHANNELS, EMBEDDING_SIZE, bias=False)
        self.last_bn = nn.BatchNorm1d(EMBEDDING_SIZE, eps=0.001, momentum=0.1, affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool_3a(self.conv2d_2b(self.conv2d_2a(self.conv2d_1a(x))))
        x = self.conv2d_4b(self.conv2d_4a(self.conv2d_3b(x)))
        x = self.mixed_6a(self.repeat_1(x))
        x = self.mixed_7a(self.repeat_2(x))
        return self.block8(self.repeat_3(x))

    def embed(self, feature_map: torch.Tensor) -> torch.Tensor:
        """GAP, dropout, linear, BatchNorm: the raw (not L2-normalised) 512-d feature."""
        pooled = torch.flatten(self.avgpool_1a(feature_map), 1)
        return self.last_bn(self.last_linear(self.dropout(pooled)))


def check_state_dict(module: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Raise ``ValueError`` listing every missing/unexpected key and shape or kind mismatch.

    ``load_state_dict`` stops at the first problem and silently casts floats into integer
    buffers; this reports everything at once and keeps integer buffers integer.
    """
    expected = module.state_dict()
    problems: list[str] = []
    missing = sorted(expected.keys() - state_dict.keys())
    unexpected = sorted(state_dict.keys() - expected.keys())
    if missing:
        problems.append(f"missing keys {missing}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected}")
    for key in sorted(expected.keys() & state_dict.keys()):
        got, want = state_dict[key], expected[key]
        if not isinstance(got, torch.Tensor):
            problems.append(f"{key}: not a tensor ({type(got).__name__})")
        elif got.shape != want.shape:
            problems.append(f"{key}: shape {tuple(got.shape)}, expected {tuple(want.shape)}")
        elif got.is_floating_point() != want.is_floating_point():
            problems.append(f"{key}: dtype {got.dtype}, expected {want.dtype}")
    if problems:
        raise ValueError("; ".join(problems))


def load_facenet_backbone(backbone: InceptionResnetV1, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Load a facenet-pytorch ``InceptionResnetV1`` state dict, dropping its ``logits.*``.

    The logits classify the pretraining identities (8631 or 10575 of them), meaningless here.
    Everything else must match exactly (``ValueError`` otherwise).
    """
    kept = {k: v for k, v in state_dict.items() if not k.startswith("logits.")}
    check_state_dict(backbone, kept)
    backbone.load_state_dict(kept, strict=True)


class SeverityOutput(NamedTuple):
    """What the network returns: class logits (N x 3) and the center-loss feature (N x 512)."""

    logits: torch.Tensor
    embedding: torch.Tensor


class SeverityNet(nn.Module):
    """Backbone plus the paper's softmax branch and center-loss branch.

    Input: float N x 3 x 160 x 160, RGB, already normalised as (x - 127.5) / 128.
    Class index i is severity score i + 1.
    """

    def __init__(self, dropout: float = DEFAULT_DROPOUT) -> None:
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.dropout_p = dropout
        self.backbone = InceptionResnetV1(dropout=dropout)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Conv2d(FEATURE_CHANNELS, NUM_CLASSES, kernel_size=1)
        self.centers = nn.Parameter(torch.zeros(NUM_CLASSES, EMBEDDING_SIZE))

    def forward(self, x: torch.Tensor) -> SeverityOutput:
        feature_map = self.backbone(x)
        logits = self.classifier(self.dropout(feature_map)).mean(dim=(2, 3))
        return SeverityOutput(logits=logits, embedding=self.backbone.embed(feature_map))


def center_loss(embedding: torch.Tensor, labels: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """Wen et al. (2016): half the squared distance to the own class center, batch mean.

    ``labels`` are class indices (0..2, i.e. score - 1). Training passes ``centers`` detached,
    so the gradient reaches the embedding only: as in Wen et al., the centers are moved by
    their own update rule (`training.train.update_centers`, rate α), not by the optimiser.
    """
    if embedding.ndim != 2 or labels.shape != (embedding.shape[0],):
        raise ValueError(
            f"embedding must be N x D and labels N, got {tuple(embedding.shape)} and {tuple(labels.shape)}"
        )
    return 0.5 * (embedding - centers[labels]).pow(2).sum(dim=1).mean()


@dataclass(frozen=True, eq=False)
class SeverityBatch:
    """One batch of results, row i for crop i; arrays are read-only."""

    probabilities: np.ndarray  # N x 3 float32, rows sum to 1; column i is score i + 1
    embeddings: np.ndarray  # N x 512 float32, raw center-loss feature (not L2-normalised)


class SeverityModel:
    """Runs a loaded ``SeverityNet`` on uint8 RGB crops, as the card prescribes.

    Not thread-safe: meant for a single caller thread (the batcher, which owns the device).
    It takes ownership of ``net``: moves it to ``device``, puts it in eval mode and freezes it.
    On CUDA it runs fp16 with channels_last: autocast, or fp16 weights replayed from CUDA
    graphs when ``graph_batch_sizes`` are given (``cuda_graphs``). On CPU ``cpu_precision`` picks fp32,
    bf16 autocast, or int8 (``runtime.int8``, from the weights' stored ``int8_scales``); ``auto``
    takes int8 where scales exist and PyTorch has its x86 int8 kernels (on a Zen 4 2.9x the faces/s
    of bf16, 99.7 % of holdout predictions unchanged), else bf16 where the CPU computes it natively
    (AVX512-BF16 or AMX; 1.65x fp32 there), else fp32, where bf16 would be emulated and slower.
    """

    def __init__(
        self,
        net: SeverityNet,
        card: ModelCard,
        device: str | torch.device = "cpu",
        cpu_precision: str = "auto",
        graph_batch_sizes: Sequence[int] = (),
        int8_scales: Int8Scales | None = None,
    ) -> None:
        self.device = torch.device(device)
        if self.device.type not in ("cpu", "cuda"):
            raise ValueError(f"device must be cpu or cuda, got {self.device}")
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {self.device} requested but CUDA is not available")
        if cpu_precision not in CPU_PRECISIONS:
            raise ValueError(f"cpu_precision must be one of {CPU_PRECISIONS}, got {cpu_precision!r}")
        self.card = card
        self._cuda = self.device.type == "cuda"
        if cpu_precision == "int8" and not self._cuda and int8_scales is None:
            raise ValueError("cpu_precision int8 needs the weights' int8 scales (acroscreen calibrate-int8)")
        if self._cuda:
            self.precision = "fp16"
        elif cpu_precision == "auto":
            self.precision = _auto_cpu_precision(int8_scales)
        else:
            self.precision = cpu_precision
        memory_format = torch.channels_last if self._cuda else torch.preserve_format
        net = net.to(self.device, memory_format=memory_format).eval().requires_grad_(False)
        size = card.preprocessing.input_size
        self._crop_shape = (size, size, 3)
        self._forward: Callable[[torch.Tensor], SeverityOutput] = net
        if self.precision == "int8":
            from .int8 import quantize

            self._forward = quantize(net, int8_scales, size)  # type: ignore[arg-type]
        self.graph_batch_sizes: tuple[int, ...] = ()
        if self._cuda and graph_batch_sizes:
            from .cuda_graphs import CapturedForward

            try:
                self._forward = CapturedForward(net.half(), graph_batch_sizes, size)
                self.graph_batch_sizes = self._forward.sizes
            except RuntimeError as exc:  # a driver or library that cannot capture: eager still works
                log.warning("CUDA graph capture failed, running eagerly: %s", exc)

    def predict(self, crops: np.ndarray) -> SeverityBatch:
        """Probabilities (softmax of logits / temperature) and embeddings for N crops.

        ``crops``: uint8, N x S x S x 3, RGB, S = the card's input size. ``ValueError`` on
        anything else; ``RuntimeError`` if the network returns a different number of rows or
        non-finite probabilities.
        """
        if not isinstance(crops, np.ndarray) or crops.dtype != np.uint8:
            raise ValueError(f"crops must be a uint8 numpy array, got {getattr(crops, 'dtype', type(crops))}")
        if crops.ndim != 4 or crops.shape[1:] != self._crop_shape:
            raise ValueError(f"crops must be N x {' x '.join(map(str, self._crop_shape))}, got {crops.shape}")
        n = crops.shape[0]
        if n == 0:
            empty = np.zeros((0, NUM_CLASSES), np.float32)
            return _frozen_batch(empty, np.zeros((0, EMBEDDING_SIZE), np.float32))
        if self._cuda:
            autocast = torch.autocast("cuda", dtype=torch.float16)
        elif self.precision == "bf16":
            autocast = torch.autocast("cpu", dtype=torch.bfloat16)
        else:
            autocast = nullcontext()
        with torch.inference_mode(), autocast:
            out = self._forward(self.input_tensor(crops))
            if out.logits.shape != (n, NUM_CLASSES) or out.embedding.shape != (n, EMBEDDING_SIZE):
                raise RuntimeError(
                    f"model returned logits {tuple(out.logits.shape)} and embeddings "
                    f"{tuple(out.embedding.shape)} for a batch of {n} crops"
                )
            probs = torch.softmax(out.logits.float() / self.card.temperature, dim=1)
            probabilities, embeddings = _to_numpy(probs), _to_numpy(out.embedding.float())
        if not np.isfinite(probabilities).all():  # never a NaN score: the frames fail instead
            raise RuntimeError(f"model returned non-finite probabilities for {n} crops")
        return _frozen_batch(probabilities, embeddings)

    def warmup(self) -> None:
        """Run one dummy batch so cuDNN autotuning and allocations happen before traffic."""
        self.predict(np.zeros((1, *self._crop_shape), np.uint8))

    def input_tensor(self, crops: np.ndarray) -> torch.Tensor:
        """The network's normalised float input for uint8 RGB crops, as the card prescribes."""
        # Writable and contiguous: torch.from_numpy warns on read-only arrays.
        x = torch.from_numpy(np.require(crops, requirements=["C", "W"])).to(self.device)
        if self.card.preprocessing.channel_order == "BGR":
            x = x.flip(-1)
        # NHWC viewed as NCHW is channels_last already; CPU wants it contiguous.
        x = x.permute(0, 3, 1, 2).float()
        x = (x - self.card.preprocessing.mean) / self.card.preprocessing.std
        return x.contiguous(memory_format=torch.channels_last if self._cuda else torch.contiguous_format)


def _auto_cpu_precision(int8_scales: Int8Scales | None) -> str:
    if int8_scales is not None:
        from .int8 import int8_available

        if int8_available():
            return "int8"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (x86 AVX512-BF16 or AMX-BF16)."""
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.cpu().numpy().astype(np.float32, copy=False)


def _frozen_batch(probabilities: np.ndarray, embeddings: np.ndarray) -> SeverityBatch:
    probabilities.flags.writeable = False
    embeddings.flags.writeable = False
    return SeverityBatch(probabilities=probabilities, embeddings=embeddings)
