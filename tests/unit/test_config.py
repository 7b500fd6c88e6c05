import argparse
import dataclasses
from pathlib import Path

import pytest
from acroscreen.server.config import Settings, add_flags, env_names


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
    settings = Settings.load({"ACROSCREEN_ALLOW_UNTRAINED": "1"}, namespace=args)
    assert settings.allow_untrained is False
    assert settings.max_batch_delay_ms == 2.5


def test_settings_from_the_environment_and_flags_are_checked_together() -> None:
    """mTLS's CA from the environment and the certificate from flags: checking the environment's
    settings alone first refused them ("needs tls_cert")."""
    parser = argparse.ArgumentParser()
    add_flags(parser)
    args = parser.parse_args(["--tls-cert", "server.pem", "--tls-key", "server.key"])
    settings = Settings.load({"ACROSCREEN_TLS_CLIENT_CA": "ca.pem"}, namespace=args)
    assert settings.tls_client_ca == Path("ca.pem") and settings.tls_cert == Path("server.pem")


@pytest.mark.parametrize("flag, value, message", [
    ("--port", "99999", "port must be 0 to 65535"),
    ("--metrics-port", "-7", "metrics_port must be -1"),
    ("--log-level", "loud", "log_level must be"),
    ("--idle-timeout-s", "0", "idle_timeout_s must be positive"),
    ("--max-streams-per-token", "-1", "must not be negative"),
    ("--max-frames-per-stream", "0", "must be at least 1"),
])
def test_settings_that_cannot_work_are_refused_at_start(flag: str, value: str, message: str) -> None:
    """Each started a server that refused every stream, quietly dropped a cap, or crashed with a
    traceback (a port past 65535, an unknown log level)."""
    with pytest.raises(ValueError, match=message):
        Settings.load({}, [flag, value])
    assert Settings.load({}, ["--log-level", "debug"]).log_level == "debug"  # the level's case does not matter


def test_bad_values_name_the_variable() -> None:
    with pytest.raises(ValueError, match="ACROSCREEN_PORT"):
        Settings.load({"ACROSCREEN_PORT": "eighty"})
    with pytest.raises(ValueError, match="device"):
        Settings.load({"ACROSCREEN_DEVICE": "tpu"})


@pytest.mark.parametrize("name", ["ACROSCREEN_TLS_CLIENT_CA", "ACROSCREEN_AUTH_TOKENS_FILE", "ACROSCREEN_MODEL"])
def test_an_empty_file_setting_is_refused_not_read_as_unset(name: str) -> None:
    """A deployment whose variable comes out empty (a missing secret's path) silently served
    without mutual TLS or without the token check: an empty path is now an error naming it."""
    environ = {name: "", "ACROSCREEN_TLS_CERT": "server.pem", "ACROSCREEN_TLS_KEY": "server.key"}
    with pytest.raises(ValueError, match=f"{name} / .*set but empty"):
        Settings.load(environ)


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
