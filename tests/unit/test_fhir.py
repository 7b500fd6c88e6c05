"""acroscreen.client.fhir: subject results as FHIR R4 Observations, validated with fhir.resources.

fhir.resources 8 carries R4B (4.3) models, not R4 (4.0.1); Observation and Device are the same
in both for every element used here (R5, the package's default, renamed Device.deviceName and
would reject them), so the R4B models validate the R4 resources.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest
from acroscreen.client.cli import describe_result
from acroscreen.client.fhir import AI_ASSERTED, CODE_SYSTEM, to_fhir_observation
from acroscreen.client.types import ModelRef, SubjectResult

observation_models = pytest.importorskip(
    "fhir.resources.R4B.observation", reason="pip install -e '.[dev]' brings fhir.resources"
)
Observation = observation_models.Observation

EFFECTIVE = datetime(2026, 3, 4, 10, 30, tzinfo=timezone(timedelta(hours=1)))


def _result(**changes: object) -> SubjectResult:
    values: dict[str, object] = dict(
        subject_id="S-17",
        status="final",
        predicted_score=2,
        expected_score=1.93,
        probabilities=(0.21, 0.65, 0.14),
        expected_score_interval=(1.71, 2.12),
        frames_received=135,
        frames_analyzed=118,
        frames_skipped=0,
        rejected={"no_face": 17},
        model=ModelRef("acroscreen-severity", "1.2.0", "phantom-demo", "ab" * 32),
        faces_seen_max=1,
    )
    values.update(changes)
    return SubjectResult(**values)  # type: ignore[arg-type]


def _validated(observation: dict) -> object:
    """Round-trip through JSON (what is sent) and the FHIR model (what a FHIR server checks)."""
    return Observation.model_validate(json.loads(json.dumps(observation)))


def _component(observation: dict, code: str) -> dict:
    (component,) = [c for c in observation["component"] if c["code"]["coding"][0]["code"] == code]
    return component


def test_final_result_is_a_valid_observation_with_every_part() -> None:
    observation = to_fhir_observation(_result(), "Patient/123", effective=EFFECTIVE, source="video")
    model = _validated(observation)
    assert type(model).__name__ == "Observation"

    assert observation["status"] == "final"
    assert observation["subject"] == {"reference": "Patient/123"}
    assert observation["effectiveDateTime"] == "2026-03-04T10:30:00.000+01:00"
    assert observation["code"]["coding"][0] == {
        "system": CODE_SYSTEM,
        "code": "acromegaly-facial-severity",
        "display": "Acromegaly facial features severity screening (AI)",
    }
    assert observation["valueCodeableConcept"]["coding"][0]["code"] == "severity-2"
    assert "dataAbsentReason" not in observation
    assert observation["meta"]["security"] == [AI_ASSERTED]
    assert AI_ASSERTED["code"] == "AIAST"
    assert AI_ASSERTED["system"] == "http://terminology.hl7.org/CodeSystem/v3-ObservationValue"
    assert observation["method"]["coding"][0]["code"] == "video-frames"

    probabilities = [_component(observation, f"probability-severity-{k}")["valueQuantity"]["value"] for k in (1, 2, 3)]
    assert probabilities == [0.21, 0.65, 0.14]
    assert _component(observation, "expected-score")["valueQuantity"]["value"] == 1.93
    interval = _component(observation, "expected-score-interval-95")["valueRange"]
    assert (interval["low"]["value"], interval["high"]["value"]) == (1.71, 2.12)
    assert _component(observation, "frames-analyzed")["valueInteger"] == 118


def test_device_names_the_model_and_is_contained_and_referenced() -> None:
    observation = to_fhir_observation(_result(), "Patient/123", effective=EFFECTIVE)
    (device,) = observation["contained"]
    assert observation["device"]["reference"] == f"#{device['id']}"
    assert device["resourceType"] == "Device"
    assert device["deviceName"] == [{"name": "acroscreen-severity", "type": "model-name"}]
    assert device["version"][0]["value"] == "1.2.0"
    assert device["identifier"][0]["value"] == "ab" * 32
    assert device["property"][0]["valueCode"][0]["text"] == "phantom-demo"
    model = _validated(observation)
    assert model.contained[0].__class__.__name__ == "Device"


def test_non_clinical_models_carry_a_not_for_clinical_use_note() -> None:
    for kind in ("untrained", "phantom-demo"):
        result = _result(model=ModelRef("m", "0", kind, ""))
        observation = to_fhir_observation(result, "Patient/1", effective=EFFECTIVE)
        _validated(observation)
        notes = [n["text"] for n in observation["note"]]
        assert notes[0].startswith("NOT FOR CLINICAL USE") and kind in notes[0]
        assert "identifier" not in observation["contained"][0], "untrained weights have no sha256"
    clinical = to_fhir_observation(_result(model=ModelRef("m", "1", "clinical", "cd" * 32)), "Patient/1")
    notes = [n["text"] for n in clinical["note"]]
    assert not any("NOT FOR CLINICAL USE" in n for n in notes)
    assert any("not a medical device" in n for n in notes)


def test_a_result_whose_followed_face_changed_says_it_may_combine_people() -> None:
    changed = to_fhir_observation(_result(rejected={"no_face": 3, "face_changed": 2}), "Patient/1", effective=EFFECTIVE)
    _validated(changed)
    assert "changed 2 time(s)" in changed["note"][0]["text"] and "more than one person" in changed["note"][0]["text"]
    assert "CAUTION" in describe_result(_result(rejected={"face_changed": 1}))
    unchanged = to_fhir_observation(_result(), "Patient/1", effective=EFFECTIVE)
    assert not any("more than one person" in note["text"] for note in unchanged["note"])
    assert "CAUTION" not in describe_result(_result())


def test_insufficient_evidence_has_no_value_but_a_data_absent_reason() -> None:
    result = _result(
        status="insufficient_evidence",
        predicted_score=None,
        expected_score=None,
        probabilities=(0.0, 0.0, 0.0),
        expected_score_interval=None,
        frames_analyzed=1,
    )
    observation = to_fhir_observation(result, "Patient/9", effective=EFFECTIVE)
    _validated(observation)
    assert observation["status"] == "final"
    assert "valueCodeableConcept" not in observation
    assert observation["dataAbsentReason"]["coding"][0]["code"] == "unknown"
    codes = {c["code"]["coding"][0]["code"] for c in observation["component"]}
    assert codes == {"frames-received", "frames-analyzed"}


def test_provisional_result_is_preliminary() -> None:
    observation = to_fhir_observation(_result(status="provisional"), "Patient/9", effective=EFFECTIVE)
    _validated(observation)
    assert observation["status"] == "preliminary"


def test_subject_reference_and_times_are_checked() -> None:
    for reference in ("Patient/123", "Group/g-1", "https://fhir.example.org/Patient/1", "urn:uuid:6b1f0c64-0e4c-4a0b-9f7e-2c1f5d6f7a10"):
        _validated(to_fhir_observation(_result(), reference))
    assert "subject" not in to_fhir_observation(_result(), None)
    for bad in ("", "123", "Patient 123", "patient/123"):
        with pytest.raises(ValueError):
            to_fhir_observation(_result(), bad)
    with pytest.raises(ValueError, match="timezone"):
        to_fhir_observation(_result(), "Patient/1", effective=datetime(2026, 1, 1, 12, 0))
    observation = to_fhir_observation(_result(), "Patient/1")
    issued = datetime.fromisoformat(observation["issued"].replace("Z", "+00:00"))
    assert abs((issued - datetime.now(timezone.utc)).total_seconds()) < 60


def test_the_validator_rejects_broken_observations() -> None:
    """The FHIR check is not a no-op."""
    observation = to_fhir_observation(_result(), "Patient/123", effective=EFFECTIVE)
    broken_ones = [
        {k: v for k, v in observation.items() if k != "status"},  # required
        dict(observation, valueCodeableConcept="severity-2"),  # wrong type
        dict(observation, valueString="2"),  # two choices of value[x]
        dict(observation, effectiveDateTime="yesterday"),
        dict(observation, grade=2),  # no such element
    ]
    for broken in broken_ones:
        with pytest.raises(ValueError):
            _validated(broken)


def test_codes_are_in_their_value_sets() -> None:
    """fhir.resources checks structure and types, not value-set bindings: these are checked here."""
    observation_status = {"registered", "preliminary", "final", "amended", "corrected", "cancelled", "entered-in-error", "unknown"}
    device_name_type = {"udi-label-name", "user-friendly-name", "patient-reported-name", "manufacturer-name", "model-name", "other"}
    for status in ("final", "provisional", "insufficient_evidence"):
        score = None if status == "insufficient_evidence" else 2
        observation = to_fhir_observation(_result(status=status, predicted_score=score), "Patient/1")
        assert observation["status"] in observation_status
        assert observation["contained"][0]["deviceName"][0]["type"] in device_name_type
        assert observation["category"][0]["coding"][0] == {
            "system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "exam", "display": "Exam"
        }  # fmt: skip


def test_the_builder_needs_no_fhir_package() -> None:
    """The client's FHIR output is plain JSON: fhir.resources stays a test-only dependency."""
    import ast
    from pathlib import Path

    import acroscreen.client.fhir as module

    tree = ast.parse(Path(module.__file__).read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module and node.level == 0}
    assert imported <= {"__future__", "re", "uuid", "datetime", "typing"}
