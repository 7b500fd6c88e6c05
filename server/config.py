"""One Settings object for the server: defaults, overridden by ACROSCREEN_* environment
variables, overridden by command-line flags. Read once in main() and passed down."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

ENV_PREFIX = "ACROSCREEN_"


# How the model may compute on a CPU (runtime.model picks among them); here, in a module of the
# standard library only, so the settings can check the flag without importing torch.
CPU_PRECISIONS = ("auto", "fp32", "bf16", "int8")


def _setting(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True, kw_only=True)
class Settings:
    host: str = _setting("127.0.0.1", "address to listen on (0.0.0.0 or [::] in containers)")
    port: int = _setting(50051, "gRPC port (0 picks a free one)")
    metrics_port: int = _setting(9464, "Prometheus /metrics HTTP port (0 picks a free one, -1 disables)")
    metrics_host: str = _setting("", "address the /metrics HTTP server listens on (empty: the same as --host)")
    model: Path | None = _setting(None, "weights file (.safetensors); default: the shipped demo weights")
    allow_untrained: bool = _setting(False, "serve random weights when no weights file is available")
    device: str = _setting("cpu", "where the model runs: cpu or cuda")
    cuda_graphs: bool = _setting(
        True, "on cuda, capture the model as CUDA graphs at batch sizes 1, 2, 4 … max_batch_size (--no-cuda-graphs: eager)"
    )
    cpu_precision: str = _setting(
        "auto",
        "model arithmetic on the CPU: fp32, bf16, int8 (needs the weights' .int8.json scales), or auto "
        "(int8 where the scales exist, else bf16 where the CPU has it natively, else fp32)",
    )
    max_message_bytes: int = _setting(
        8 * 1024 * 1024,
        "largest frame or image accepted (fits raw 1080p BGR); messages up to 4x this are read, so a larger "
        "frame is rejected alone (too_large) instead of ending its call",
    )
    max_frame_pixels: int = _setting(4096 * 4096, "largest decoded frame, in pixels")
    workers: int = _setting(1, "server processes sharing the port (so_reuseport); with more than one, the model runs in a process of its own that batches all their crops")
    max_streams: int = _setting(
        32, "concurrent streams per worker, and as many ScreenImages calls besides; more get RESOURCE_EXHAUSTED"
    )
    max_streams_per_token: int = _setting(
        0, "concurrent streams one bearer token may hold, and as many ScreenImages calls besides (0 = no quota; needs tokens)"
    )
    max_frames_per_stream: int = _setting(108_000, "frames one stream may send (an hour at 30 fps)")
    max_stream_duration_s: float = _setting(3600.0, "longest a stream may stay open")
    idle_timeout_s: float = _setting(60.0, "a stream that sends no frame for this long is finished")
    max_analysis_fps: float = _setting(
        0.0, "frames analysed per second per stream: the sharpest of each 1/fps of capture time (0 = no cap; CPU nodes: e.g. 5)"
    )
    keepalive_time_s: float = _setting(30.0, "HTTP/2 keepalive ping interval (clients should match)")
    keepalive_timeout_s: float = _setting(10.0, "close a connection whose ping is unanswered this long")
    tls_cert: Path | None = _setting(None, "PEM certificate chain for TLS on the gRPC port")
    tls_key: Path | None = _setting(None, "PEM private key for --tls-cert")
    tls_client_ca: Path | None = _setting(None, "PEM CA bundle: require client certificates signed by it (mTLS)")
    insecure: bool = _setting(False, "allow plaintext gRPC on a non-loopback address")
    auth_tokens_file: Path | None = _setting(None, "file of accepted bearer tokens, one per line")
    auth_tokens: str = _setting("", "accepted bearer tokens, comma-separated (prefer the file)")
    health_requires_auth: bool = _setting(False, "require a token for the health service too")
    analysis_backlog: int = _setting(2, "frames a stream may have waiting for analysis (small keeps live latency low)")
    max_batch_size: int = _setting(16, "faces per model batch")
    max_batch_delay_ms: float = _setting(5.0, "longest wait to fill a batch")
    batch_queue_capacity: int = _setting(256, "faces waiting for the model, across streams")
    landmark_points: int = _setting(5, "landmark model: 5 (commercial use ok) or 68 (research only)")
    # Frame quality gate (runtime.quality.QualitySettings, same names without the prefix).
    quality_min_face_px: float = _setting(64.0, "reject faces whose detector box is narrower than this (pixels)")
    quality_good_face_px: float = _setting(128.0, "face width (pixels) at which the size component scores 1")
    quality_min_sharpness: float = _setting(
        15.0, "reject as blurred below this variance of the Laplacian on the inner face of the crop (LFW median ~110)"
    )
    quality_good_sharpness: float = _setting(300.0, "sharpness at which the sharpness component scores 1 (log scale)")
    quality_min_brightness: float = _setting(40.0, "reject as badly exposed below this mean grey level of the inner face")
    quality_max_brightness: float = _setting(215.0, "reject as badly exposed above this mean grey level of the inner face")
    quality_max_clipped: float = _setting(0.25, "reject as badly exposed above this fraction of inner-face pixels at <= 5 or >= 250")
    quality_max_yaw_deg: float = _setting(30.0, "reject faces turned further than this (degrees)")
    quality_max_pitch_deg: float = _setting(
        25.0, "reject faces tilted up or down further than this (degrees; gated with 68 landmarks only)"
    )
    quality_max_roll_deg: float = _setting(40.0, "reject faces rolled in-plane further than this (degrees)")
    quality_min_confidence: float = _setting(0.35, "reject below this face confidence (detector x landmark fit x HOG check)")
    update_every_frames: int = _setting(10, "analysed frames between provisional subject updates")
    min_frames_for_score: int = _setting(3, "analysed frames needed before a subject gets a score")
    torch_threads: int = _setting(0, "intra-op threads for CPU inference (0 = torch default)")
    opencv_threads: int = _setting(1, "OpenCV's internal threads per call (streams already run in parallel)")
    grace_period_s: float = _setting(10.0, "time running streams get to finish on SIGTERM")
    malloc_arenas: int = _setting(2, "glibc malloc arenas (keeps RSS flat with many threads; 0 = glibc default)")
    log_level: str = _setting("INFO", "logging level")
    log_json: bool = _setting(True, "structured JSON logs, one object a line")

    @classmethod
    def load(
        cls, environ: Mapping[str, str] = os.environ, argv: list[str] | None = None,
        namespace: argparse.Namespace | None = None,
    ) -> Settings:
        """Defaults ← ACROSCREEN_* environment ← flags (in argv, or a namespace the CLI already
        parsed), merged before the one check: TLS from the environment and its key from a flag work."""
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = environ.get(ENV_PREFIX + f.name.upper())
            if raw is not None:
                values[f.name] = _parse(f, raw)
        if argv is not None:
            parser = argparse.ArgumentParser(add_help=False)
            add_flags(parser)
            namespace = parser.parse_args(argv)
        if namespace is not None:
            values.update(overrides_from(namespace))
        return cls(**values)

    def __repr__(self) -> str:
        """Never print tokens."""
        shown = {f.name: ("***" if f.name == "auth_tokens" and self.auth_tokens else getattr(self, f.name)) for f in fields(self)}
        return "Settings(" + ", ".join(f"{k}={v!r}" for k, v in shown.items()) + ")"

    def __post_init__(self) -> None:
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be cpu or cuda, not {self.device!r}")
        if self.cpu_precision not in CPU_PRECISIONS:
            choices = ", ".join(CPU_PRECISIONS[:-1]) + " or " + CPU_PRECISIONS[-1]
            raise ValueError(f"cpu_precision must be {choices}, not {self.cpu_precision!r}")
        if self.landmark_points not in (5, 68):
            raise ValueError("landmark_points must be 5 or 68")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key must be given together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca (mutual TLS) needs tls_cert and tls_key")
        for name in ("workers", "max_streams", "analysis_backlog", "max_batch_size", "batch_queue_capacity",
                     "max_message_bytes", "max_frame_pixels", "max_frames_per_stream", "update_every_frames",
                     "min_frames_for_score"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        # 0 means "no limit" or "the library's default" for these, so only a negative value is nonsense.
        for name in ("max_streams_per_token", "max_analysis_fps", "torch_threads", "opencv_threads", "malloc_arenas",
                     "max_batch_delay_ms", "grace_period_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        for name in ("max_stream_duration_s", "idle_timeout_s", "keepalive_time_s", "keepalive_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be 0 to 65535, not {self.port}")
        if not -1 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics_port must be -1 (off) or 0 to 65535, not {self.metrics_port}")
        if not isinstance(logging.getLevelName(self.log_level.upper()), int):
            raise ValueError(f"log_level must be DEBUG, INFO, WARNING, ERROR or CRITICAL, not {self.log_level!r}")

    def metrics_address(self) -> str:
        """Where /metrics listens, as an HTTP server takes it."""
        return http_address(self.metrics_host or self.host)

    def quality_thresholds(self) -> dict[str, float]:
        """The quality_* settings without their prefix: the fields of runtime.quality.QualitySettings."""
        prefix = "quality_"
        return {f.name.removeprefix(prefix): getattr(self, f.name) for f in fields(self) if f.name.startswith(prefix)}


def http_address(host: str) -> str:
    """The listening host as an HTTP server takes it: an IPv6 literal without gRPC's brackets ([::] → ::)."""
    return host.strip("[]")


def loopback_of(host: str) -> str:
    """The loopback address of the family `host` is in: what a process's internal listeners bind,
    so that only this machine reaches them."""
    return "::1" if ":" in http_address(host) else "127.0.0.1"


def reachable_host(host: str) -> str:
    """Where to reach a server listening on `host`, as a URL or gRPC target writes it: a wildcard
    address as the loopback, an IPv6 address in brackets."""
    bare = http_address(host)
    if bare in ("", "0.0.0.0", "::"):
        return "127.0.0.1"
    return f"[{bare}]" if ":" in bare else bare


def env_names() -> list[str]:
    """Every environment variable the server reads."""
    return [ENV_PREFIX + f.name.upper() for f in fields(Settings)]


def add_flags(parser: argparse.ArgumentParser) -> None:
    """One --flag per setting; defaults are None so unset flags don't override the environment."""
    for f in fields(Settings):
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{f.metadata['help']} [env {ENV_PREFIX}{f.name.upper()}]"
        if f.type in ("bool", bool):
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, default=None, help=help_text)


def overrides_from(namespace: argparse.Namespace) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for f in fields(Settings):
        raw = getattr(namespace, f.name, None)
        if raw is not None:
            values[f.name] = raw if isinstance(raw, bool) else _parse(f, str(raw))
    return values


def parse_annotated(type_name: str, raw: str) -> Any:
    """A string from the environment or a flag, read as a dataclass field's annotation says
    ("bool", "int", "float", "Path", each optionally "| None"; anything else stays a string)."""
    kind = type_name.removesuffix(" | None")
    if kind == "bool":
        lowered = raw.strip().lower()
        if lowered not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
            raise ValueError(raw)
        return lowered in ("1", "true", "yes", "on")
    if kind == "int":
        return int(raw)
    if kind == "float":
        return float(raw)
    if kind == "Path":
        if not raw.strip():
            # An empty value is no file: reading it as "unset" would turn mutual TLS or the token
            # check off without a word when a deployment's variable comes out empty.
            raise ValueError("set but empty: name a file, or leave it unset")
        return Path(raw)
    return raw


def _parse(f: dataclasses.Field, raw: str) -> Any:
    try:
        return parse_annotated(str(f.type), raw)
    except ValueError as error:
        why = str(error) if not raw.strip() else f"cannot read {raw!r} as {f.type}"
        raise ValueError(f"{ENV_PREFIX}{f.name.upper()} / --{f.name.replace('_', '-')}: {why}") from None
