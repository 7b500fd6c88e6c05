"""Model files: safetensors weights plus the model card in the file's metadata.

The card travels inside the weights file so the server rebuilds its preprocessing,
labels and temperature from the file alone, and every result can name the model.
Files are never unpickled; facenet ``.pt`` checkpoints load with ``weights_only=True``.
A ``<stem>.int8.json`` beside the file (``runtime.int8``) adds the scales for int8 CPU inference.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from acroscreen.server.runtime.model import SeverityNet, check_state_dict
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from .card import ARCHITECTURE, ModelCard, card_from_metadata, card_to_metadata, parse_json
from .int8 import Int8Error, Int8Scales, read_scales, scales_path

_SAVE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class ModelLoadError(ValueError):
    """A weights file that cannot be used: unreadable, not safetensors, bad card or shapes."""


@dataclass(frozen=True, eq=False)
class LoadedWeights:
    """A network ready for ``SeverityModel``, its card, the file's sha256 ("" if not from a file)
    and the int8 scales stored beside it, if any."""

    net: SeverityNet
    card: ModelCard
    sha256: str
    int8_scales: Int8Scales | None = None


def save_weights(
    path: str | Path, net: SeverityNet, card: ModelCard, dtype: torch.dtype = torch.float16
) -> str:
    """Write ``net`` and ``card`` to a safetensors file atomically; return its sha256.

    Floating tensors are stored as ``dtype``; integer buffers (BatchNorm's
    ``num_batches_tracked``) keep their dtype.
    """
    if dtype not in _SAVE_DTYPES:
        raise ValueError(f"dtype must be one of {_SAVE_DTYPES}, got {dtype}")
    if card.dropout != net.dropout_p:
        raise ValueError(f"card dropout {card.dropout} differs from the network's {net.dropout_p}")
    tensors = {
        key: (value.to(dtype) if value.is_floating_point() else value).detach().cpu().contiguous()
        for key, value in net.state_dict().items()
    }
    data = _canonical(save_safetensors_bytes(tensors, metadata=card_to_metadata(card)))
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return hashlib.sha256(data).hexdigest()


def read_card(path: str | Path) -> ModelCard:
    """The card alone, read from the file's header without reading any tensor."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            return card_from_metadata(_header_metadata(head + f.read(_header_length(head, size))))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"weights file {path}: {exc}") from exc


def load_weights(path: str | Path, device: str | torch.device = "cpu", with_int8_scales: bool = True) -> LoadedWeights:
    """Read, verify and build the network in float32 on ``device``; ``ModelLoadError`` on any problem,
    a stale int8 scales file beside it included (unless ``with_int8_scales`` is false)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ModelLoadError(f"weights file {path}: cannot read: {exc}") from exc
    try:
        tensors = load_safetensors_bytes(data)
        metadata = _header_metadata(data)
    except (SafetensorError, ValueError) as exc:
        raise ModelLoadError(f"weights file {path}: not a valid safetensors file: {exc}") from exc
    try:
        card = card_from_metadata(metadata)
    except ValueError as exc:
        raise ModelLoadError(f"weights file {path}: bad model card: {exc}") from exc
    if card.architecture != ARCHITECTURE:
        raise ModelLoadError(
            f"weights file {path}: architecture {card.architecture!r}, expected {ARCHITECTURE!r}"
        )
    net = SeverityNet(dropout=card.dropout)
    try:
        _check_tensors(net, tensors)
    except ValueError as exc:
        raise ModelLoadError(f"weights file {path}: architecture mismatch: {exc}") from exc
    net.load_state_dict(tensors, strict=True)
    sha256 = hashlib.sha256(data).hexdigest()
    int8_file = scales_path(path)
    try:
        int8_scales = read_scales(int8_file, sha256) if with_int8_scales and int8_file.is_file() else None
    except Int8Error as exc:
        raise ModelLoadError(str(exc)) from exc
    return LoadedWeights(net=net.float().to(device).eval(), card=card, sha256=sha256, int8_scales=int8_scales)


def untrained_weights(seed: int = 0) -> LoadedWeights:
    """Randomly initialised weights, the same for the same seed (global RNG left untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = SeverityNet()
    card = ModelCard(
        name="acroscreen-untrained",
        version=f"0+seed{seed}",
        kind="untrained",
        training_summary=json.dumps({"seed": seed}),
        notices=("Untrained: random weights, the scores carry no meaning.",),
    )
    return LoadedWeights(net=net.eval(), card=card, sha256="")


def read_facenet_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """A facenet-pytorch ``.pt`` state dict, for ``load_facenet_backbone``; never unpickles code."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types (pickle, zip, OS) for a bad file
        raise ModelLoadError(f"checkpoint {path}: cannot load: {exc}") from exc
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ModelLoadError(f"checkpoint {path}: not a state dict of tensors")
    return dict(state)


def _check_tensors(net: SeverityNet, tensors: dict[str, torch.Tensor]) -> None:
    check_state_dict(net, tensors)
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"non-finite values in {sorted(bad)}")


def _canonical(data: bytes) -> bytes:
    """Sort the header's metadata: safetensors writes it in hash order, so the same model
    would get a different sha256 on every save."""
    length = _header_length(data, len(data))
    header = json.loads(data[8 : 8 + length])
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-(8 + len(text)) % 8)  # safetensors pads the header to 8-byte alignment
    return len(text).to_bytes(8, "little") + text + data[8 + length :]


def _header_length(head: bytes, file_size: int) -> int:
    """Length of the JSON header that follows safetensors' 8-byte little-endian prefix."""
    if len(head) < 8:
        raise ValueError("file too short for a safetensors header")
    length = int.from_bytes(head[:8], "little")
    if length > file_size - 8:
        raise ValueError("header length exceeds file size")
    return length


def _header_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file (or of its first 8 + header-length bytes)."""
    length = _header_length(data, len(data))
    header = parse_json(data[8 : 8 + length].decode("utf-8"), "header")
    metadata = header.get("__metadata__", {}) if isinstance(header, dict) else None
    if not isinstance(metadata, dict):
        raise ValueError("header metadata is not an object")
    return metadata
