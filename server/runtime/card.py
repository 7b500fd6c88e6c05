"""The model card: who a model is, what crops it expects and how far to trust it.

It travels in the weights file's metadata (see `weights`), and as text between the
model process and the workers, who need the card but never the network: this module
imports no torch.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

METADATA_PREFIX = "acroscreen."
FORMAT_VERSION = "1"
ARCHITECTURE = "inception-resnet-v1+softmax+center-loss"
KINDS = ("untrained", "phantom-demo", "clinical")
DEFAULT_LABELS = ("1 normal or very slight", "2 mild or moderate", "3 severe")
DEFAULT_INTENDED_USE = (
    "Research screening of acromegaly facial features from video frames; "
    "not a medical device and not for diagnosis."
)

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
        if not isinstance(parse_json(self.training_summary, "training_summary"), dict):
            raise ValueError("training_summary must be a JSON object")
        if not all(isinstance(notice, str) for notice in self.notices):
            raise ValueError(f"notices must be strings, got {self.notices!r}")


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
    preprocessing = parse_json(raw["preprocessing"], "preprocessing")
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
        temperature=parse_json(raw["temperature"], "temperature"),
        architecture=raw["architecture"],
        dropout=parse_json(raw["dropout"], "dropout"),
        training_summary=raw["training_summary"],
        intended_use=raw["intended_use"],
        notices=tuple(_json_list(raw["notices"], "notices")),
    )


def parse_json(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except (TypeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{what}: invalid JSON: {exc}") from exc


def _json_list(text: str, what: str) -> list[Any]:
    value = parse_json(text, what)
    if not isinstance(value, list):
        raise ValueError(f"{what} must be a JSON array")
    return value


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
