"""Composition root: builds runtime → service → transport from one Settings object."""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import os
import signal
import socket
import threading
from dataclasses import dataclass
from pathlib import Path

from . import logs
from .config import Settings
from .errors import AcroscreenError, ModelError
from .metrics import Metrics
from .service.screening import ScreeningService
from .transport.server import GrpcServer

log = logging.getLogger("acroscreen.server")

_M_ARENA_MAX = -8  # glibc's mallopt parameter number
DEFAULT_WEIGHTS = Path(__file__).resolve().parent / "weights" / "phantom-demo.safetensors"


@dataclass(frozen=True, slots=True)
class RunningServer:
    """A started server; `stop()` drains it."""

    port: int
    metrics_port: int
    service: ScreeningService
    grpc_server: GrpcServer
    metrics: Metrics
    _closers: tuple

    def stop(self, grace_s: float = 1.0) -> None:
        self.grpc_server.drain()
        self.service.stop_accepting()
        self.service.wait_idle(grace_s)
        self.grpc_server.stop(grace_s)
        for close in self._closers:
            close()


def start(settings: Settings) -> RunningServer:
    """Listen at once (health NOT_SERVING), load and warm the model, then serve.

    A worker of several (`workers` > 1) loads first and listens after: with
    SO_REUSEPORT the kernel hands connections to every listening process, so a
    worker must not listen before it can serve.
    """
    from prometheus_client import start_http_server

    metrics = Metrics()
    listen_first = settings.workers == 1
    # gRPC listens as soon as the port is added, so a worker of several adds it only when ready.
    grpc_server = GrpcServer(settings) if listen_first else None
    if grpc_server is not None:
        grpc_server.start()
    metrics_port = -1
    closers: list = []
    if settings.metrics_port >= 0:
        httpd, _thread = start_http_server(settings.metrics_port, addr=settings.host, registry=metrics.registry)
        metrics_port = httpd.server_port
        closers.append(httpd.shutdown)
        closers.append(httpd.server_close)
    try:
        service, stop_batcher = _build_service(settings, metrics)
    except Exception:
        if grpc_server is not None:
            grpc_server.stop(0)
        for close in closers:
            close()
        raise
    closers.insert(0, stop_batcher)
    if grpc_server is None:
        grpc_server = GrpcServer(settings)
        grpc_server.start()
    grpc_server.attach(service)
    metrics.model_ready.set(1)
    log.info("serving on %s:%d, metrics on port %d", settings.host, grpc_server.port, metrics_port)
    return RunningServer(grpc_server.port, metrics_port, service, grpc_server, metrics, tuple(closers))


def load_model_weights(settings: Settings):  # noqa: ANN201 — runtime.weights.LoadedWeights, imported lazily
    """--model, else the shipped demo weights, else (only if allowed) untrained weights."""
    from .runtime.weights import ModelLoadError, load_weights, untrained_weights

    path = settings.model or (DEFAULT_WEIGHTS if DEFAULT_WEIGHTS.is_file() else None)
    try:
        if path is not None:
            return load_weights(path)
    except ModelLoadError as error:
        raise ModelError(str(error)) from error
    if not settings.allow_untrained:
        raise ModelError("no weights file: pass --model PATH, or --allow-untrained to serve random weights")
    log.warning("no weights file: serving UNTRAINED random weights; results mean nothing")
    return untrained_weights()


def _build_service(settings: Settings, metrics: Metrics):  # noqa: ANN202
    import cv2
    import torch

    from .runtime.cuda_graphs import powers_of_two_up_to
    from .runtime.decode import DecodeLimits
    from .runtime.landmarks import LICENCE_NOTICES
    from .runtime.model import SeverityModel
    from .runtime.preprocess import FacePreprocessor, PreprocessSettings
    from .service.batcher import BatcherConfig, DynamicBatcher
    from .service.pipeline import FrameAnalyzer, model_batch_runner
    from .service.session import StreamLimits
    from .service.types import ModelInfo, ModelRef, PreprocessingInfo

    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    # Streams already run detection in parallel threads; OpenCV's own thread pool
    # on top of that only oversubscribes the cores the model needs.
    cv2.setNumThreads(settings.opencv_threads)
    weights = load_model_weights(settings)
    card = weights.card
    graph_sizes = powers_of_two_up_to(settings.max_batch_size) if settings.cuda_graphs else ()
    model = SeverityModel(weights.net, card, settings.device, settings.cpu_precision, graph_sizes)
    log.info("model %s %s (%s) sha256=%s on %s in %s, CUDA graphs for batch sizes %s", card.name, card.version,
             card.kind, weights.sha256 or "-", settings.device, model.precision, model.graph_batch_sizes or "none")
    model.warmup()

    preprocess_settings = PreprocessSettings.from_card_preprocessing(card.preprocessing, landmark_points=settings.landmark_points)
    preprocessor = FacePreprocessor(preprocess_settings)
    batcher = DynamicBatcher(
        model_batch_runner(model.predict),
        BatcherConfig(
            max_batch_size=settings.max_batch_size,
            max_delay_ms=settings.max_batch_delay_ms,
            queue_capacity=settings.batch_queue_capacity,
        ),
        metrics,
    )
    batcher.start()
    p = card.preprocessing
    info = ModelInfo(
        model=ModelRef(name=card.name, version=card.version, kind=card.kind, sha256=weights.sha256),
        class_labels=tuple(card.labels),
        preprocessing=PreprocessingInfo(
            input_size=p.input_size,
            mean=p.mean,
            std=p.std,
            channel_order=p.channel_order,
            box_height_expand=p.box_height_expand,
            alignment=p.alignment,
            landmark_points=preprocess_settings.landmark_points,
        ),
        temperature=card.temperature,
        architecture=card.architecture,
        intended_use=card.intended_use,
        notices=(*card.notices, LICENCE_NOTICES[preprocess_settings.landmark_points]),
    )
    analyzer = FrameAnalyzer(
        preprocessor=preprocessor,
        batcher=batcher,
        decode_limits=DecodeLimits(max_bytes=settings.max_message_bytes, max_pixels=settings.max_frame_pixels),
        metrics=metrics,
    )
    service = ScreeningService(
        analyzer=analyzer,
        model_info=info,
        metrics=metrics,
        max_streams=settings.max_streams,
        max_streams_per_principal=settings.max_streams_per_token,
        limits=StreamLimits(
            max_frames=settings.max_frames_per_stream,
            max_duration_s=settings.max_stream_duration_s,
            idle_timeout_s=settings.idle_timeout_s,
            max_analysis_fps=settings.max_analysis_fps,
        ),
        analysis_backlog=settings.analysis_backlog,
        update_every_frames=settings.update_every_frames,
        min_frames_for_score=settings.min_frames_for_score,
    )
    return service, batcher.stop


def limit_malloc_arenas(arenas: int) -> None:
    """Cap glibc's malloc arenas before threads start allocating.

    With one arena per thread, a long run of many streams kept ~12 % more resident
    memory after ten minutes (618 → 695 MB); with 2 arenas it stayed flat (587 → 603 MB)
    at the same throughput. No-op where glibc's mallopt is not available.
    """
    if arenas <= 0:
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_ARENA_MAX, arenas)
    except (OSError, AttributeError):
        log.debug("mallopt unavailable; malloc arenas left as they are")


def serve(settings: Settings) -> int:
    """Run until SIGTERM/SIGINT, then drain: NOT_SERVING, refuse new streams, let running ones finish.

    With `workers` > 1, that many processes are forked before any thread or server
    starts and share the port through SO_REUSEPORT (the kernel spreads connections
    across them), so decoding, detection and landmarks escape one interpreter's GIL;
    each worker has its own model, batcher and metrics port. The parent only forwards
    signals and waits.
    """
    logs.configure(settings.log_level, settings.log_json)
    limit_malloc_arenas(settings.malloc_arenas)
    if settings.workers > 1:
        return _supervise(settings)
    return _serve_one(settings)


def _serve_one(settings: Settings) -> int:
    stop_requested = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop_requested.set())
    try:
        running = start(settings)
    except AcroscreenError as error:
        log.error("cannot start: %s", error)
        return 1
    print(f"acroscreen serving on {settings.host}:{running.port} (metrics :{running.metrics_port})", flush=True)
    # A timed wait: the kernel may deliver the signal to one of gRPC's threads, and an
    # untimed lock wait on the main thread would then never return to run the handler.
    while not stop_requested.wait(0.2):
        pass
    log.info("draining for up to %.1f s", settings.grace_period_s)
    running.stop(settings.grace_period_s)
    return 0


def _supervise(settings: Settings) -> int:
    """Fork the workers on one concrete port; forward SIGTERM/SIGINT; exit 0 when all drained."""
    port = settings.port or _free_port(settings.host)
    torch_threads = settings.torch_threads or max(1, (os.cpu_count() or 1) // settings.workers)
    children = []
    for index in range(settings.workers):
        metrics_port = settings.metrics_port + index if settings.metrics_port > 0 else settings.metrics_port
        worker = dataclasses.replace(settings, port=port, metrics_port=metrics_port, torch_threads=torch_threads)
        pid = os.fork()
        if pid == 0:  # the child: a complete server of its own
            code = 1
            try:
                code = _serve_one(worker)
            finally:
                os._exit(code)
        children.append(pid)
    def forward(signum: int, _frame: object) -> None:
        for pid in children:
            _signal(pid, signum)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, forward)
    codes = []
    for pid in children:
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        codes.append(code)
        if code != 0:  # one worker failed: stop the others rather than serve at part strength silently
            for other in children:
                _signal(other, signal.SIGTERM)
    return 0 if all(code == 0 for code in codes) else 1


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.bind((host.strip("[]"), 0))
        return probe.getsockname()[1]
