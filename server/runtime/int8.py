"""Static int8 inference on x86 CPUs: the network quantized from stored activation scales.

Static quantization needs each activation's scale, which only real faces reveal, and the
server has no faces to look at when it starts. So the scales are measured once, offline,
on training crops (``acroscreen calibrate-int8``), and stored beside the weights as
``<weights stem>.int8.json``, bound to the weights file by its sha256. At start-up the
network is quantized from those numbers: no data, the same int8 model every time.

Weights are int8 per output channel (symmetric), activations uint8 per tensor, run by
PyTorch's x86 (fbgemm/oneDNN) kernels through FX graph-mode quantization. Without VNNI those
kernels sum pairs of uint8 × int8 products in 16 bits, which saturate beyond 7-bit activations,
so there the stored scales are widened to 7 bits (``reduced_range``), as PyTorch's own fbgemm
defaults do. Concatenations
stay in float: a quantized ``cat`` rescales every branch to the first branch's scale and
clips the rest, which moved probabilities by up to 0.1 on the demo model.
PyTorch marks ``torch.ao.quantization`` deprecated; its warnings are silenced here, once,
while the model is built, and ``int8_available()`` says whether this build still has it.
"""

from __future__ import annotations

import importlib
import json
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import fx, nn

from .cpu import cpu_flags

FORMAT = "acroscreen-int8-scales-v1"
SUFFIX = ".int8.json"
_ENGINES = ("x86", "fbgemm")
_QUIET = (
    r"torch\.ao\.quantization is deprecated",
    r"torch\.quantize_per_tensor, torch\.quantize_per_channel and other quantized tensor creation",
)


class Int8Error(ValueError):
    """Int8 scales that cannot be used: unreadable, for other weights, or for another graph."""


@dataclass(frozen=True, kw_only=True)
class Int8Scales:
    """Per activation (keyed by the FX node it observes): the uint8 scale and zero point."""

    weights_sha256: str
    activations: Mapping[str, tuple[float, int]]
    calibration: str

    def to_json(self) -> str:
        """One activation a line, so a recalibration reads as a diff."""
        head = {"format": FORMAT, "weights_sha256": self.weights_sha256, "calibration": self.calibration,
                "torch": torch.__version__}
        lines = [f"  {json.dumps(name)}: [{scale!r}, {zero}]" for name, (scale, zero) in sorted(self.activations.items())]
        return json.dumps(head, indent=1)[:-2] + ',\n "activations": {\n' + ",\n".join(lines) + "\n }\n}\n"


def scales_path(weights_path: str | Path) -> Path:
    """Where the int8 scales of a weights file live: beside it, ``<stem>.int8.json``."""
    path = Path(weights_path)
    return path.with_name(path.stem + SUFFIX)


def read_scales(path: str | Path, weights_sha256: str) -> Int8Scales:
    """Read and check a scales file against the weights it must belong to; ``Int8Error`` otherwise."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        if data.get("format") != FORMAT:
            raise Int8Error(f"{path}: format {data.get('format')!r}, expected {FORMAT!r}")
        activations = {str(k): (float(v[0]), int(v[1])) for k, v in data["activations"].items()}
        scales = Int8Scales(
            weights_sha256=str(data["weights_sha256"]), activations=activations, calibration=str(data["calibration"])
        )
    except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
        raise Int8Error(f"{path}: not a readable int8 scales file: {exc}") from exc
    if scales.weights_sha256 != weights_sha256:
        raise Int8Error(
            f"{path} was calibrated for weights sha256 {scales.weights_sha256[:12]}…, not these "
            f"({weights_sha256[:12]}…): run `acroscreen calibrate-int8` again, or remove it"
        )
    return scales


def write_scales(path: str | Path, scales: Int8Scales) -> None:
    Path(path).write_text(scales.to_json(), encoding="utf-8")


def int8_available() -> bool:
    """Whether this PyTorch build still has FX quantization and an x86 int8 engine."""
    if not any(engine in torch.backends.quantized.supported_engines for engine in _ENGINES):
        return False
    with _quiet():
        try:
            importlib.import_module("torch.ao.quantization.quantize_fx")
        except ImportError:
            return False
    return True


def calibrate(net: nn.Module, batches: Iterable[torch.Tensor], calibration: str, weights_sha256: str) -> Int8Scales:
    """Observe activations over normalised float batches (histogram observers, which ignore
    outliers) and return their scales."""
    from torch.ao.quantization.observer import HistogramObserver

    with _quiet():
        prepared = _prepared(net, HistogramObserver)
        with torch.inference_mode():
            for batch in batches:
                prepared(batch)
        activations = {}
        for observed, name in _observers(prepared).items():
            scale, zero_point = prepared.get_submodule(name).calculate_qparams()
            activations[observed] = (float(scale), int(zero_point))
    _forget_prepared_modules(net)
    return Int8Scales(weights_sha256=weights_sha256, activations=activations, calibration=calibration)


def reduced_range() -> bool:
    """Whether activations must be 7-bit on this CPU: x86 without VNNI (AVX2 ``vpmaddubsw`` adds
    two uint8 × int8 products into a saturating int16). Measured on an AVX2 EPYC with the demo
    weights, 96 real faces: 8-bit activations moved probabilities by up to 0.31 (mean 0.013),
    7-bit by up to 0.035 (mean 0.002), at the same 86 faces/s."""
    return not cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"}


def quantize(net: nn.Module, scales: Int8Scales, input_size: int, *, seven_bit: bool | None = None) -> fx.GraphModule:
    """The int8 network for ``net`` with the stored scales; ``Int8Error`` if they do not fit its graph.

    ``seven_bit``: activations over 0..127, each stored scale widened to cover the same range
    (None: as this CPU needs, ``reduced_range()``)."""
    if seven_bit is None:
        seven_bit = reduced_range()
    top = 127 if seven_bit else 255
    from torch.ao.quantization.observer import FixedQParamsObserver, MinMaxObserver
    from torch.ao.quantization.quantize_fx import convert_fx

    with _quiet():
        prepared = _prepared(net, MinMaxObserver)
        observers = _observers(prepared)
        missing = sorted(set(observers) - set(scales.activations))
        extra = sorted(set(scales.activations) - set(observers))
        if missing or extra:
            raise Int8Error(
                f"int8 scales do not fit this network's graph ({len(missing)} activations without a scale, "
                f"e.g. {missing[:2]}; {len(extra)} unknown, e.g. {extra[:2]}): calibrate again"
            )
        for observed, name in observers.items():
            scale, zero_point = scales.activations[observed]
            scale, zero_point = scale * 255 / top, round(zero_point * top / 255)
            setattr(prepared, name, FixedQParamsObserver(scale, zero_point, dtype=torch.quint8, quant_min=0, quant_max=top))
        quantized = convert_fx(prepared)
        with torch.inference_mode():  # the first run emits the once-per-process deprecation warnings
            quantized(torch.zeros(1, 3, input_size, input_size))
    _forget_prepared_modules(net)
    return quantized


class _FloatCat(nn.Module):
    """``torch.cat`` as a leaf module left unquantized, so FX dequantizes the branches before it."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        return torch.cat(tensors, self.dim)


def _with_float_cats(net: nn.Module) -> fx.GraphModule:
    graph_module = fx.symbolic_trace(net.eval())
    for index, node in enumerate([n for n in graph_module.graph.nodes if n.op == "call_function" and n.target is torch.cat]):
        name = f"float_cat_{index}"
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        graph_module.add_submodule(name, _FloatCat(dim))
        with graph_module.graph.inserting_after(node):
            replacement = graph_module.graph.call_module(name, tuple(node.args[0]))
        node.replace_all_uses_with(replacement)
        graph_module.graph.erase_node(node)
    graph_module.recompile()
    return graph_module


def _prepared(net: nn.Module, activation_observer: type) -> fx.GraphModule:
    from torch.ao.quantization import QConfig, QConfigMapping
    from torch.ao.quantization.fx.custom_config import PrepareCustomConfig
    from torch.ao.quantization.observer import PerChannelMinMaxObserver
    from torch.ao.quantization.quantize_fx import prepare_fx

    torch.backends.quantized.engine = next(e for e in _ENGINES if e in torch.backends.quantized.supported_engines)
    qconfig = QConfig(
        activation=activation_observer.with_args(dtype=torch.quint8, quant_min=0, quant_max=255),
        weight=PerChannelMinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_channel_symmetric),
    )
    mapping = QConfigMapping().set_global(qconfig).set_object_type(_FloatCat, None)
    custom = PrepareCustomConfig().set_non_traceable_module_classes([_FloatCat])
    example = (torch.zeros(1, 3, 160, 160),)  # only shapes' ranks matter to FX
    return prepare_fx(_with_float_cats(net), mapping, example, prepare_custom_config=custom)


def _observers(prepared: fx.GraphModule) -> dict[str, str]:
    """The attribute names of the activation observers, by the name of the node whose output they observe."""
    return {
        node.args[0].name: node.target
        for node in prepared.graph.nodes
        if node.op == "call_module" and node.target.startswith("activation_post_process")
    }


def _forget_prepared_modules(net: nn.Module) -> None:
    """Undo what preparing left behind, so the float network can be freed once the int8 one
    replaced it: FX quantization memoises a device lookup per module (``functools.cache``) and
    sets a ``qconfig`` on every layer of the network it traced."""
    from torch.ao.quantization.fx import utils

    utils.assert_and_get_unique_device.cache_clear()
    for module in net.modules():
        module.__dict__.pop("qconfig", None)


class _quiet(warnings.catch_warnings):
    """Silence PyTorch's deprecation notices for the FX quantization API, and nothing else."""

    def __enter__(self) -> None:
        super().__enter__()
        for message in _QUIET:
            warnings.filterwarnings("ignore", message=message)
