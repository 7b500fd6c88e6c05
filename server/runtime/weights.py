"""Model files: safetensors weights plus the model card in the file's metadata.

The card travels inside the weights file so the server rebuilds its preprocessing,
labels and temperature from the file alone, and every result can name the model.
Files are never unpickled; facenet ``.pt`` checkpoints load with ``weights_only=True``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from acroscreen.server.runtime.model import SeverityNet, check_state_dict
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

METADATA_PREFIX = "acroscreen."
FORMAT_VERSION = "1"
ARCHITECTURE = "inception-resnet-v1+softmax+center-loss"
KINDS = ("untrained", "phantom-demo", "clinical")
DEFAULT_LABELS = ("1 normal or very slight", "2 mild or moderate", "3 severe")
DEFAULT_INTENDED_USE = (
    "Research screening of acromegaly facial features from video frames; "
    "not a medical device and not for diagnosis."
)
_SAVE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class ModelLoadError(ValueError):
    """A weights file that cannot be used: unreadable, not safetensors, bad card or shapes."""


@dataclass(frozen=True)
class Preprocessing:
    """How a face crop must be prepared for this model; the server rebuilds its transforms from it."""

    input_size: int = 160
    mean: float = 127.5
    std: float = 128.0
    channel_order: str = "RGB"
    # The serving crop (preprocess.PreprocessSettings' defaults; a test keeps them equal):
    box_height_expand: float = 0.4  # fraction of the face box height added (40 % above, 60 % below)
    alignment: str = "similarity-eyes-v1"
    landmark_points: int = 5  # landmarks the alignment needs; 0 for box alignment

    def __post_init__(self) -> None:
        if not isinstance(self.input_size, int) or self.input_size <= 0:
            raise ValueError(f"input_size must be a positive int, got {self.input_size!r}")
        if not _is_number(self.mean) or not _is_number(self.std) or self.std <= 0:
            raise ValueError(f"mean and std must be numbers with std > 0, got {self.mean!r}, {self.std!r}")
        if self.channel_order not in ("RGB", "BGR"):
            raise ValueError(f"channel_order must be RGB or BGR, got {self.channel_order!r}")
        if not _is_number(self.box_height_expand) or self.box_height_expand < 0:
            raise ValueError(f"box_height_expand must be >= 0, got {self.box_height_expand!r}")
        if not isinstance(self.alignment, str) or not self.alignment:
            raise ValueError(f"alignment must be a non-empty string, got {self.alignment!r}")
        if not isinstance(self.landmark_points, int) or self.landmark_points < 0:
            raise ValueError(f"landmark_points must be an int >= 0, got {self.landmark_points!r}")


@dataclass(frozen=True)
class ModelCard:
    """Who the model is, what it expects and how far to trust it."""

    name: str
    version: str
    kind: str  # one of KINDS
    labels: tuple[str, ...] = DEFAULT_LABELS  # label i is class index i (score i + 1)
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    temperature: float = 1.0  # probabilities are softmax(logits / temperature)
    architecture: str = ARCHITECTURE
    dropout: float = 0.2  # drop probability (the paper's 0.8 is a keep probability)
    training_summary: str = "{}"  # a JSON object: data, epochs, metrics…
    intended_use: str = DEFAULT_INTENDED_USE
    notices: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # Lists become tuples so a card stays hashable and equal to its reloaded self.
        object.__setattr__(self, "labels", tuple(self.labels))
        object.__setattr__(self, "notices", tuple(self.notices))
        for name in ("name", "version", "architecture", "intended_use"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"{name} must be a non-empty string, got {getattr(self, name)!r}")
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if len(self.labels) != 3 or not all(isinstance(label, str) for label in self.labels):
            raise ValueError(f"labels must be 3 strings, got {self.labels!r}")
        if not _is_number(self.temperature) or not math.isfinite(self.temperature) or self.temperature <= 0:
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature!r}")
        if not _is_number(self.dropout) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if not isinstance(_json_loads(self.training_summary, "training_summary"), dict):
            raise ValueError("training_summary must be a JSON object")
        if not all(isinstance(notice, str) for notice in self.notices):
            raise ValueError(f"notices must be strings, got {self.notices!r}")


@dataclass(frozen=True, eq=False)
class LoadedWeights:
    """A network ready for ``SeverityModel``, its card and the file's sha256 ("" if not from a file)."""

    net: SeverityNet
    card: ModelCard
    sha256: str


def card_to_metadata(card: ModelCard) -> dict[str, str]:
    """Every card field as a string (JSON for numbers and structures), keys prefixed."""
    values = {
        "name": card.name,
        "version": card.version,
        "kind": card.kind,
        "labels": json.dumps(list(card.labels)),
        "preprocessing": json.dumps(asdict(card.preprocessing), sort_keys=True),
        "temperature": json.dumps(card.temperature),
        "architecture": card.architecture,
        "dropout": json.dumps(card.dropout),
        "training_summary": card.training_summary,
        "intended_use": card.intended_use,
        "notices": json.dumps(list(card.notices)),
    }
    return {f"{METADATA_PREFIX}format_version": FORMAT_VERSION} | {
        METADATA_PREFIX + key: value for key, value in values.items()
    }


def card_from_metadata(metadata: dict[str, str]) -> ModelCard:
    """Inverse of ``card_to_metadata``; ``ValueError`` on a missing key or a bad value."""
    version = metadata.get(f"{METADATA_PREFIX}format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"metadata format_version {version!r}, expected {FORMAT_VERSION!r}")
    raw: dict[str, str] = {}
    for card_field in fields(ModelCard):
        key = METADATA_PREFIX + card_field.name
        if key not in metadata:
            raise ValueError(f"missing metadata key {key}")
        raw[card_field.name] = metadata[key]
    preprocessing = _json_loads(raw["preprocessing"], "preprocessing")
    if not isinstance(preprocessing, dict):
        raise ValueError("preprocessing must be a JSON object")
    try:
        prep = Preprocessing(**preprocessing)
    except TypeError as exc:  # unknown or missing field names
        raise ValueError(f"preprocessing: {exc}") from exc
    return ModelCard(
        name=raw["name"],
        version=raw["version"],
        kind=raw["kind"],
        labels=tuple(_json_list(raw["labels"], "labels")),
        preprocessing=prep,
        temperature=_json_loads(raw["temperature"], "temperature"),
        architecture=raw["architecture"],
        dropout=_json_loads(raw["dropout"], "dropout"),
        training_summary=raw["training_summary"],
        intended_use=raw["intended_use"],
        notices=tuple(_json_list(raw["notices"], "notices")),
    )


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


def load_weights(path: str | Path, device: str | torch.device = "cpu") -> LoadedWeights:
    """Read, verify and build the network in float32 on ``device``; ``ModelLoadError`` on any problem."""
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
    return LoadedWeights(net=net.float().to(device).eval(), card=card, sha256=sha256)


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
    header = _json_loads(data[8 : 8 + length].decode("utf-8"), "header")
    metadata = header.get("__metadata__", {}) if isinstance(header, dict) else None
    if not isinstance(metadata, dict):
        raise ValueError("header metadata is not an object")
    return metadata


def _json_loads(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except (TypeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{what}: invalid JSON: {exc}") from exc


def _json_list(text: str, what: str) -> list[Any]:
    value = _json_loads(text, what)
    if not isinstance(value, list):
        raise ValueError(f"{what} must be a JSON array")
    return value


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
