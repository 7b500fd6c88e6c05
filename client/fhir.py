"""A subject result as an HL7 FHIR R4 `Observation`, as plain dicts ready for `json.dumps`.

    from acroscreen.client.fhir import to_fhir_observation
    observation = to_fhir_observation(result, "Patient/123")

What it holds (see docs/fhir.md for the full mapping):

- `code`: the screening (a code of this project's own code system; no LOINC or SNOMED CT code
  names an AI acromegaly facial severity grade).
- `valueCodeableConcept`: the predicted severity grade 1, 2 or 3; when too few frames could be
  analysed there is no value and `dataAbsentReason` says so.
- `component`s: the class probabilities p1, p2, p3, the expected score Σ k·p_k with its 95 %
  interval, and the frames received and analysed.
- `method`: automated facial image analysis of a video or of photographs.
- `device`: a reference to a contained `Device` naming the model (name, version, kind, sha256 of
  the weights file).
- `meta.security`: `AIAST` (HL7 v3 ObservationValue, "artificial intelligence asserted").
- `effectiveDateTime` and `issued`; `subject` as the caller gives it (e.g. "Patient/123").
- `note`: results of a model that is not `clinical` (`untrained`, `phantom-demo`) say they are
  not for clinical use; a result whose followed face changed says it may combine more than one
  person; every result says the software is not a medical device.

Only the standard library is used: the builder makes no network call and needs no FHIR package.
"""

from __future__ import annotations

import re
import uuid
from datetime import datetime, timezone
from typing import Any

from .types import SubjectResult

__all__ = [
    "AI_ASSERTED",
    "CODE_SYSTEM",
    "FACE_CHANGED_NOTE",
    "NOT_A_MEDICAL_DEVICE",
    "NOT_FOR_CLINICAL_USE",
    "to_fhir_observation",
    "validate_reference",
]

# This project's own code system for its codes. Organisations that register the results in their
# terminology server may pass their own canonical URL as `code_system`.
CODE_SYSTEM = "urn:acroscreen:fhir:CodeSystem:screening"

OBSERVATION_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
DATA_ABSENT_REASON = "http://terminology.hl7.org/CodeSystem/data-absent-reason"
UCUM = "http://unitsofmeasure.org"

AI_ASSERTED: dict[str, str] = {
    "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
    "code": "AIAST",
    "display": "Artificial Intelligence asserted",
}

NOT_A_MEDICAL_DEVICE = (
    "Produced by acroscreen, research software that is not a medical device. "
    "A screening result is not a diagnosis."
)
NOT_FOR_CLINICAL_USE = (
    "NOT FOR CLINICAL USE: produced by a model of kind '{kind}' (not a clinically trained model); "
    "for demonstration and pipeline validation only."
)

FACE_CHANGED_NOTE = (
    "The followed face changed {count} time(s) during the recording (another person took the "
    "subject's place): this result may combine more than one person."
)

SEVERITY_LABELS = {
    1: "Severity 1: normal or very slight acromegalic facial features",
    2: "Severity 2: mild or moderate acromegalic facial features",
    3: "Severity 3: severe acromegalic facial features",
}
_STATUS = {"final": "final", "insufficient_evidence": "final", "provisional": "preliminary"}
_METHODS = {
    "video": ("video-frames", "Automated facial image analysis of video frames, combined per subject"),
    "webcam": ("video-frames", "Automated facial image analysis of live video frames, combined per subject"),
    "images": ("photographs", "Automated facial image analysis of photographs, combined per subject"),
}
_DEFAULT_METHOD = ("facial-images", "Automated facial image analysis, combined per subject")
_DEVICE_ID = "model"
# Reference: a relative reference (Type/id), an absolute URL, or a urn:uuid / urn:oid.
_REFERENCE = re.compile(r"^([A-Z][A-Za-z]+/[A-Za-z0-9\-.]{1,64}(/_history/[A-Za-z0-9\-.]{1,64})?|https?://\S+|urn:(uuid|oid):\S+)$")


def validate_reference(reference: str) -> str:
    """`reference` if it looks like a FHIR reference ("Patient/123", an absolute URL, a urn:uuid);
    ValueError otherwise."""
    if not _REFERENCE.match(reference):
        raise ValueError(f"not a FHIR reference: {reference!r} (expected e.g. 'Patient/123')")
    return reference


def to_fhir_observation(
    result: SubjectResult,
    subject_reference: str | None,
    *,
    effective: datetime | None = None,
    issued: datetime | None = None,
    source: str | None = None,
    observation_id: str | None = None,
    code_system: str = CODE_SYSTEM,
) -> dict[str, Any]:
    """The FHIR R4 Observation for a subject result (a JSON-ready dict).

    subject_reference: who was screened, e.g. "Patient/123" (None leaves `subject` out).
    effective: when the frames were captured (timezone-aware; default: now). issued: when the
    result was made (default: now). source: "video", "webcam" or "images" (how it was screened;
    sets `method`). observation_id: the resource id (default: a new UUID).
    """
    now = datetime.now(timezone.utc)
    effective = _aware(effective or now, "effective")
    issued = _aware(issued or now, "issued")
    if subject_reference is not None:
        validate_reference(subject_reference)
    if result.status not in _STATUS:
        raise ValueError(f"cannot express a subject result with status {result.status!r} as an Observation")

    def concept(code: str, display: str, text: str | None = None) -> dict[str, Any]:
        return {"coding": [{"system": code_system, "code": code, "display": display}], "text": text or display}

    method_code, method_text = _METHODS.get(source or "", _DEFAULT_METHOD)
    notes = [{"text": NOT_A_MEDICAL_DEVICE}]
    kind = result.model.kind if result.model else "unknown"
    if kind != "clinical":
        notes.insert(0, {"text": NOT_FOR_CLINICAL_USE.format(kind=kind)})
    if changes := result.rejected.get("face_changed", 0):
        notes.insert(0, {"text": FACE_CHANGED_NOTE.format(count=changes)})

    observation: dict[str, Any] = {
        "resourceType": "Observation",
        "id": observation_id or str(uuid.uuid4()),
        "meta": {"security": [dict(AI_ASSERTED)]},
        "contained": [_device(result, code_system)],
        "status": _STATUS[result.status],
        "category": [
            {"coding": [{"system": OBSERVATION_CATEGORY, "code": "exam", "display": "Exam"}], "text": "Exam"}
        ],
        "code": concept(
            "acromegaly-facial-severity",
            "Acromegaly facial features severity screening (AI)",
            "Acromegaly facial features severity grade, screened by AI from facial images",
        ),
    }
    if subject_reference is not None:
        observation["subject"] = {"reference": subject_reference}
    observation["effectiveDateTime"] = _instant(effective)
    observation["issued"] = _instant(issued)

    if result.predicted_score in SEVERITY_LABELS:
        score = result.predicted_score
        observation["valueCodeableConcept"] = concept(f"severity-{score}", SEVERITY_LABELS[score])
    else:
        observation["dataAbsentReason"] = {
            "coding": [{"system": DATA_ABSENT_REASON, "code": "unknown", "display": "Unknown"}],
            "text": "insufficient evidence: too few frames could be analysed",
        }
    observation["note"] = notes
    observation["method"] = concept(method_code, method_text)
    observation["device"] = {"reference": f"#{_DEVICE_ID}", "display": _model_display(result)}
    observation["component"] = _components(result, concept)
    return observation


def _components(result: SubjectResult, concept: Any) -> list[dict[str, Any]]:
    components: list[dict[str, Any]] = []
    if result.predicted_score is not None:
        for grade, probability in zip((1, 2, 3), result.probabilities, strict=True):
            components.append(
                {
                    "code": concept(f"probability-severity-{grade}", f"Probability of severity {grade}"),
                    "valueQuantity": _ratio(probability),
                }
            )
    if result.expected_score is not None and result.predicted_score is not None:
        components.append(
            {
                "code": concept("expected-score", "Expected severity score (sum of k times p_k)"),
                "valueQuantity": _score(result.expected_score),
            }
        )
        if result.expected_score_interval is not None:
            low, high = result.expected_score_interval
            components.append(
                {
                    "code": concept("expected-score-interval-95", "95 % interval of the expected severity score"),
                    "valueRange": {"low": _score(low), "high": _score(high)},
                }
            )
    components.append(
        {"code": concept("frames-received", "Frames received"), "valueInteger": int(result.frames_received)}
    )
    components.append(
        {"code": concept("frames-analyzed", "Frames analysed"), "valueInteger": int(result.frames_analyzed)}
    )
    return components


def _device(result: SubjectResult, code_system: str) -> dict[str, Any]:
    model = result.model
    name = model.name if model else "unknown"
    version = model.version if model else ""
    kind = model.kind if model else "unknown"
    device: dict[str, Any] = {
        "resourceType": "Device",
        "id": _DEVICE_ID,
        "status": "active",
        "deviceName": [{"name": name, "type": "model-name"}],
        "type": {
            "coding": [{"system": code_system, "code": "screening-model", "display": "AI screening model"}],
            "text": "acroscreen severity model (software; research use, not a medical device)",
        },
        "property": [
            {
                "type": {"coding": [{"system": code_system, "code": "model-kind", "display": "Model kind"}]},
                "valueCode": [{"coding": [{"system": code_system, "code": kind}], "text": kind}],
            }
        ],
        "note": [{"text": NOT_A_MEDICAL_DEVICE}],
    }
    if version:
        device["version"] = [{"type": {"text": "model version"}, "value": version}]
    if model and model.sha256:
        device["identifier"] = [
            {"type": {"text": "SHA-256 of the weights file"}, "system": f"{code_system}:model-sha256", "value": model.sha256}
        ]
    return device


def _model_display(result: SubjectResult) -> str:
    if result.model is None:
        return "acroscreen model (unknown)"
    m = result.model
    return f"{m.name} {m.version} (kind: {m.kind})".replace("  ", " ")


def _ratio(value: float) -> dict[str, Any]:
    return {"value": round(float(value), 4), "unit": "probability", "system": UCUM, "code": "1"}


def _score(value: float) -> dict[str, Any]:
    return {"value": round(float(value), 3), "unit": "score", "system": UCUM, "code": "1"}


def _aware(moment: datetime, name: str) -> datetime:
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"{name} must be timezone-aware (FHIR dateTimes with a time need a zone)")
    return moment


def _instant(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")
