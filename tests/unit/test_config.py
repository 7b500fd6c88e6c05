import argparse
import dataclasses
from pathlib import Path

import pytest
from acroscreen.server.config import Settings, add_flags, env_names, with_overrides


def test_environment_then_flags_override_defaults() -> None:
    env = {"ACROSCREEN_PORT": "6000", "ACROSCREEN_MAX_BATCH_SIZE": "4", "ACROSCREEN_ALLOW_UNTRAINED": "yes"}
    settings = Settings.load(env, ["--port", "7000", "--model", "w.safetensors"])
    assert settings.port == 7000
    assert settings.max_batch_size == 4
    assert settings.allow_untrained is True
    assert settings.model == Path("w.safetensors")


def test_cli_namespace_overrides() -> None:
    parser = argparse.ArgumentParser()
    add_flags(parser)
    args = parser.parse_args(["--no-allow-untrained", "--max-batch-delay-ms", "2.5"])
    settings = with_overrides(Settings.load({"ACROSCREEN_ALLOW_UNTRAINED": "1"}), args)
    assert settings.allow_untrained is False
    assert settings.max_batch_delay_ms == 2.5


def test_bad_values_name_the_variable() -> None:
    with pytest.raises(ValueError, match="ACROSCREEN_PORT"):
        Settings.load({"ACROSCREEN_PORT": "eighty"})
    with pytest.raises(ValueError, match="device"):
        Settings.load({"ACROSCREEN_DEVICE": "tpu"})


def test_every_setting_has_an_env_name() -> None:
    assert "ACROSCREEN_METRICS_PORT" in env_names()
    assert len(env_names()) == len(set(env_names()))


def test_quality_thresholds_are_settings_with_the_gate_defaults() -> None:
    """Every QualitySettings field is a quality_* setting (env and flag) with the same default."""
    from acroscreen.server.runtime.quality import QualitySettings

    assert Settings().quality_thresholds() == dataclasses.asdict(QualitySettings())
    settings = Settings.load(
        {"ACROSCREEN_QUALITY_MIN_FACE_PX": "90", "ACROSCREEN_QUALITY_MIN_SHARPNESS": "40"},
        ["--quality-min-sharpness", "25.5", "--quality-max-yaw-deg", "20"],
    )
    thresholds = QualitySettings(**settings.quality_thresholds())
    assert (thresholds.min_face_px, thresholds.min_sharpness, thresholds.max_yaw_deg) == (90.0, 25.5, 20.0)
    assert "ACROSCREEN_QUALITY_MIN_CONFIDENCE" in env_names()
    with pytest.raises(ValueError, match="min_face_px < good_face_px"):
        QualitySettings(**Settings(quality_min_face_px=200.0).quality_thresholds())
