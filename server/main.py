"""Composition root: builds runtime → service → transport from one Settings object."""

from __future__ import annotations

import ctypes
import dataclasses
import json
import logging
import multiprocessing
import os
import resource
import signal
import socket
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

from . import logs
from .config import Settings, http_address, loopback_of, reachable_host
from .errors import AcroscreenError, ConfigurationError, ModelError, NotReady
from .metrics import Metrics, ProcessesSum
from .runtime.card import ModelCard
from .service.model_process import ModelLink, RemoteModel, ServedModel
from .service.screening import ScreeningService
from .transport.server import GrpcServer
from .transport.workers import WorkerIdentity

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
        """Drain: refuse new calls, give open streams ``grace_s`` to finish; end the rest with their
        final result and UNAVAILABLE, which the gRPC server gets ``grace_s`` more to deliver."""
        self.grpc_server.drain()
        self.service.stop_accepting()
        if not self.service.wait_idle(grace_s):
            self.service.end_streams(NotReady("the server is shutting down: the stream was ended before its client closed it"))
        self.grpc_server.stop(grace_s)
        for close in self._closers:
            close()


def start(
    settings: Settings, remote_model: RemoteModel | None = None, worker: WorkerIdentity | None = None
) -> RunningServer:
    """Listen at once (health NOT_SERVING), load and warm the model, then serve.

    A worker of several (`workers` > 1) sends its crops to the model process
    (`remote_model`), loads first and listens after: with SO_REUSEPORT the kernel hands
    connections to every listening process, so a worker must not listen before it can serve.
    `worker` is what its calls' initial metadata names (the one process of a new run by default).
    """
    from prometheus_client import start_http_server

    metrics = Metrics()
    worker = worker or WorkerIdentity.new_instance()
    listen_first = settings.workers == 1
    # gRPC listens as soon as the port is added, so a worker of several adds it only when ready.
    grpc_server = GrpcServer(settings, worker) if listen_first else None
    if grpc_server is not None:
        grpc_server.start()
    metrics_port = -1
    closers: list = []
    if settings.metrics_port >= 0:
        httpd, _thread = start_http_server(settings.metrics_port, addr=settings.metrics_address(), registry=metrics.registry)
        metrics_port = httpd.server_port
        closers.append(httpd.shutdown)
        closers.append(httpd.server_close)
    try:
        service, stop_batcher = _build_service(settings, metrics, remote_model)
    except Exception:
        if grpc_server is not None:
            grpc_server.stop(0)
        for close in closers:
            close()
        raise
    closers.insert(0, stop_batcher)
    if grpc_server is None:
        grpc_server = GrpcServer(settings, worker)
        grpc_server.start()
    grpc_server.attach(service)
    metrics.model_ready.set(1)
    scraped = f"metrics on port {metrics_port}" if metrics_port >= 0 else "no metrics port"
    log.info("serving on %s:%d, %s", settings.host, grpc_server.port, scraped)
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


def _load_model(settings: Settings, metrics: Metrics):  # noqa: ANN202
    """The served model (card, sha256, arithmetic) and a started batcher in front of the warmed
    model (this process's). Only the model keeps the network: an int8 model
    lets the float one go."""
    import torch

    from .runtime.cuda_graphs import powers_of_two_up_to
    from .runtime.model import SeverityModel
    from .service.batcher import BatcherConfig, DynamicBatcher
    from .service.pipeline import model_batch_runner

    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    weights = load_model_weights(settings)
    card = weights.card
    graph_sizes = powers_of_two_up_to(settings.max_batch_size) if settings.cuda_graphs else ()
    try:
        model = SeverityModel(weights.net, card, settings.device, settings.cpu_precision, graph_sizes,
                              int8_scales=weights.int8_scales)
    except ValueError as error:  # int8 asked for weights without scales
        raise ModelError(str(error)) from error
    log.info("model %s %s (%s) sha256=%s on %s in %s, CUDA graphs for batch sizes %s", card.name, card.version,
             card.kind, weights.sha256 or "-", settings.device, model.precision, model.graph_batch_sizes or "none")
    model.warmup()
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
    return ServedModel(card, weights.sha256, model.precision), batcher


def _build_service(settings: Settings, metrics: Metrics, remote_model: RemoteModel | None):  # noqa: ANN202
    import cv2

    from .runtime.decode import DecodeLimits
    from .runtime.frontalize import FRONTAL_3D_V1
    from .runtime.landmarks import LICENCE_NOTICES
    from .runtime.preprocess import FacePreprocessor, PreprocessSettings
    from .runtime.quality import QualitySettings
    from .service.model_process import ModelProcessClient
    from .service.pipeline import FrameAnalyzer
    from .service.session import StreamLimits
    from .service.types import ModelInfo, ModelRef, PreprocessingInfo

    try:  # refuses unusable thresholds before this process loads anything
        quality = QualitySettings(**settings.quality_thresholds())
    except ValueError as error:
        raise ConfigurationError(f"{error} (see the --quality-* flags / ACROSCREEN_QUALITY_*)") from error
    # Streams already run detection in parallel threads; OpenCV's own thread pool
    # on top of that only oversubscribes the cores the model needs.
    cv2.setNumThreads(settings.opencv_threads)
    if remote_model is None:
        served, batcher = _load_model(settings, metrics)
        model_queue, stop_model = batcher, batcher.stop
    else:  # the model runs in the model process: no torch here
        served = remote_model.model
        size = served.card.preprocessing.input_size
        client = ModelProcessClient(remote_model.link, (size, size, 3), max_in_flight=settings.batch_queue_capacity)
        client.start()
        model_queue, stop_model = client, client.stop
    card = served.card
    landmark_points = _landmark_points(settings, card)
    if landmark_points != settings.landmark_points:
        log.info("the model's alignment %s uses 68 landmark points", FRONTAL_3D_V1)
    preprocess_settings = PreprocessSettings.from_card_preprocessing(
        card.preprocessing,
        landmark_points=landmark_points,
        quality=quality,
    )
    preprocessor = FacePreprocessor(preprocess_settings)
    p = card.preprocessing
    info = ModelInfo(
        model=ModelRef(name=card.name, version=card.version, kind=card.kind, sha256=served.sha256),
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
        arithmetic=served.arithmetic,
        architecture=card.architecture,
        intended_use=card.intended_use,
        notices=(*card.notices, LICENCE_NOTICES[preprocess_settings.landmark_points]),
    )
    analyzer = FrameAnalyzer(
        preprocessor=preprocessor,
        batcher=model_queue,
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
    return service, stop_model


def _landmark_points(settings: Settings, card: ModelCard) -> int:
    """--landmark-points picks the model for pose and tracking, unless the model's own alignment needs 68."""
    from .runtime.frontalize import FRONTAL_3D_V1

    return 68 if card.preprocessing.alignment == FRONTAL_3D_V1 else settings.landmark_points


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


_PR_SET_DUMPABLE = 4


def forbid_core_dumps() -> None:
    """A crashing server would write its memory, frames of faces included, to a core file (or a
    host's crash collector): no patient data at rest. A core size limit of 0 (hard, so nothing
    raises it again) and a process that is not dumpable (no core even through a crash-collector
    pipe, and no ptrace by other processes of the user) stop that; children inherit both."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the size limit alone
        log.debug("prctl unavailable; core dumps stopped by the size limit only")


def serve(settings: Settings) -> int:
    """Run until SIGTERM/SIGINT, then drain: NOT_SERVING, refuse new streams, let running ones finish.

    With `workers` > 1, a model process and then that many workers are forked before
    any thread or server starts. The workers share the port through SO_REUSEPORT (the
    kernel spreads connections across them), so decoding, detection and landmarks
    escape one interpreter's GIL; they send their crops to the one model (one CUDA
    context, batches across every worker's streams). Each process has a metrics port
    of its own; the parent serves their sum on `metrics_port`, forwards signals and waits.
    """
    logs.configure(settings.log_level, settings.log_json)
    forbid_core_dumps()
    limit_malloc_arenas(settings.malloc_arenas)
    if settings.workers > 1:
        return _supervise(settings)
    return _serve_one(settings)


def _announce(line: str) -> None:
    """One line on stdout in one write: the workers print their ports at the same moment into one
    pipe, and `print` writes the text and its newline separately, so two lines could interleave
    into one and a reader waiting for both would wait forever. A pipe write under 4 KiB is atomic."""
    try:
        descriptor = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # a replaced stdout (a test's capture) has no sharer
        print(line, flush=True)
        return
    sys.stdout.flush()
    os.write(descriptor, (line + "\n").encode())


def _serve_one(
    settings: Settings,
    remote_model: RemoteModel | None = None,
    report: Connection | None = None,
    worker: WorkerIdentity | None = None,
) -> int:
    """One server process; a worker of several tells the supervisor its metrics port through `report`."""
    stop_requested = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop_requested.set())
    _accept_stops()
    try:
        running = start(settings, remote_model, worker)
    except AcroscreenError as error:
        log.error("cannot start: %s", error)
        return 1
    _announce(f"acroscreen serving on {settings.host}:{running.port} (metrics :{running.metrics_port})")
    if report is not None:
        report.send_bytes(str(running.metrics_port).encode())
        report.close()
    # A timed wait: the kernel may deliver the signal to one of gRPC's threads, and an
    # untimed lock wait on the main thread would then never return to run the handler.
    while not stop_requested.wait(0.2):
        pass
    log.info("draining for up to %.1f s", settings.grace_period_s)
    running.stop(settings.grace_period_s)
    return 0


def _serve_model(settings: Settings, links: list[ModelLink], ready: Connection) -> int:
    """The model process: one model and one batcher for every worker's crops, until SIGTERM or all workers leave."""
    from prometheus_client import start_http_server

    from .service.model_process import ModelProcessServer

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the workers, which drain first
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # while loading there is nothing to drain: a stop ends it
    _accept_stops()
    metrics = Metrics()
    metrics_port = -1
    if settings.metrics_port >= 0:
        httpd, _thread = start_http_server(settings.metrics_port, addr=settings.metrics_address(), registry=metrics.registry)
        metrics_port = httpd.server_port
    try:
        served, batcher = _load_model(settings, metrics)
    except AcroscreenError as error:
        log.error("cannot start the model process: %s", error)
        return 1
    stop_requested = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop_requested.set())
    size = served.card.preprocessing.input_size
    server = ModelProcessServer(links, batcher, (size, size, 3))
    server.start()
    metrics.model_ready.set(1)
    _announce(f"acroscreen model process ready (metrics :{metrics_port})")
    ready.send_bytes(json.dumps({**served.to_json(), "metrics_port": metrics_port}).encode())
    ready.close()
    while not stop_requested.wait(0.2) and server.serving:
        pass
    batcher.stop()
    return 0


def _supervise(settings: Settings) -> int:
    """Fork the model process, then the workers on one concrete port; serve every process's
    metrics added up on `metrics_port`; forward SIGTERM/SIGINT to the workers, let the model
    process end once they have drained; exit 0 when all ended cleanly. A stop asked for while the
    model loads ends the model process there (a container's PID 1 without a handler ignores SIGTERM)."""
    stopping = threading.Event()
    workers: list[int] = []

    def forward(signum: int, _frame: object) -> None:
        stopping.set()
        for pid in workers:
            _signal(pid, signum)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, forward)
    try:
        port = _port_nobody_serves(settings.host, settings.port)
    except ConfigurationError as error:
        log.error("cannot start: %s", error)
        return 1
    cores = os.cpu_count() or 1
    links = [ModelLink.create() for _ in range(settings.workers)]
    ready_in, ready_out = multiprocessing.Pipe(duplex=False)
    reports_in, reports_out = multiprocessing.Pipe(duplex=False)  # workers → here: their metrics ports
    own_metrics = -1 if settings.metrics_port < 0 else 0  # each process on a port of its own; the sum here
    # Each process's own /metrics is for the supervisor, on this machine's loopback, not wherever --host listens.
    own_metrics_host = loopback_of(settings.metrics_address())
    # Scraped from the start, so a pod still loading shows acroscreen_model_ready 0 rather than no target.
    metrics = _MetricsSum(settings) if settings.metrics_port >= 0 else None
    listening = [metrics.socket] if metrics is not None else []  # the children leave it to this process

    model_settings = dataclasses.replace(settings, metrics_port=own_metrics, metrics_host=own_metrics_host,
                                         torch_threads=settings.torch_threads or max(1, cores // 2))
    model_pid = _fork(lambda: _serve_model(model_settings, links, ready_out),
                      close=[ready_in, reports_in, reports_out, *listening,
                             *(end for link in links for end in link.worker_ends)])
    ready_out.close()
    report = _wait_ready(ready_in, model_pid, stopping, metrics.answer_waiting if metrics is not None else None)
    ready_in.close()
    if report is None:
        return 0 if stopping.is_set() else 1
    served, model_metrics = report
    # The workers' landmark model, loaded once here (no thread or gRPC runs yet): forked, they
    # share its pages, which dlib only reads, instead of holding a copy each (~10 MB private a
    # worker with the 5-point model), and on a many-core node one copy competes for the L3 cache.
    from .runtime.preprocess import shared_fitter

    shared_fitter(_landmark_points(settings, served.card))
    run = WorkerIdentity.new_instance(settings.workers)
    for index in range(settings.workers):
        worker = dataclasses.replace(settings, port=port, metrics_port=own_metrics, metrics_host=own_metrics_host)
        others = [end for other in links if other is not links[index] for end in (*other.worker_ends, *other.model_ends)]
        remote = RemoteModel(links[index], served)
        identity = dataclasses.replace(run, index=index)
        workers.append(_fork(lambda: _serve_one(worker, remote, reports_out, identity),
                             close=[reports_in, *listening, *links[index].model_ends, *others]))
        if stopping.is_set():  # asked before this one existed
            _signal(workers[-1], signal.SIGTERM)
    for link in links:
        for end in (*link.worker_ends, *link.model_ends):
            end.close()
    reports_out.close()
    if metrics is not None:
        metrics.serve(model_metrics, reports_in)
    codes = {}
    running = set(workers)
    while running:
        pid, status = os.wait()
        code = os.waitstatus_to_exitcode(status)
        if pid == model_pid:  # it ends by itself once every worker has closed its link
            codes[pid] = code if stopping.is_set() else code or 1
            model_pid = 0
            if not stopping.is_set():
                log.error("the model process ended (exit %d) while workers were serving: stopping them", code)
                forward(signal.SIGTERM, None)
            continue
        running.discard(pid)
        codes[pid] = code
        if code != 0:  # one worker failed: stop the others rather than serve at part strength silently
            log.error("worker %d (pid %d) ended with exit %d: stopping the others", workers.index(pid), pid, code)
            forward(signal.SIGTERM, None)
    if model_pid:
        _signal(model_pid, signal.SIGTERM)
        _, status = os.waitpid(model_pid, 0)
        codes[model_pid] = os.waitstatus_to_exitcode(status)
    return 0 if all(code == 0 for code in codes.values()) else 1


_STOPS = {signal.SIGTERM, signal.SIGINT}


def _fork(body: Callable[[], int], close: list[Connection]) -> int:
    """A child process that closes the pipe ends it must not hold, runs `body` and exits with its code.

    It starts with SIGTERM and SIGINT blocked (`_accept_stops` unblocks them once its own handlers
    are in place): until then it runs the supervisor's handler, which would swallow a stop."""
    parent = os.getpid()
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, _STOPS)
    pid = os.fork()
    if pid:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        return pid
    code = 1
    try:
        _stop_with_parent(parent)
        for end in close:
            end.close()
        code = body()
    except SystemExit as stop:
        log.error("%s", stop)
    except BaseException:  # noqa: BLE001 — os._exit below would end the process without a word
        log.exception("process %d failed", os.getpid())
    finally:
        os._exit(code)


def _accept_stops() -> None:
    """SIGTERM and SIGINT reach this process's handlers (blocked in a child until they are set: `_fork`)."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOPS)


def _stop_with_parent(parent: int) -> None:
    """SIGTERM this process when the supervisor dies (even by SIGKILL), so no worker outlives it."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1
    if libc.prctl(pr_set_pdeathsig, signal.SIGTERM) != 0:
        log.warning("prctl(PR_SET_PDEATHSIG) failed (errno %d): workers may outlive the supervisor", ctypes.get_errno())
    if os.getppid() != parent:
        raise SystemExit("the supervisor ended before this process could ask to be stopped with it")


class _MetricsSum:
    """The supervisor's /metrics: the sum over every process (see `ProcessesSum`), each added as it
    reports its port. Listening from the start, served without a thread while the model loads (the
    workers are forked after that, and a fork must not copy a thread's half-held locks), then by one."""

    def __init__(self, settings: Settings) -> None:
        import wsgiref.simple_server

        from prometheus_client import CollectorRegistry, make_wsgi_app

        class Quiet(wsgiref.simple_server.WSGIRequestHandler):
            timeout = 2.0  # a connection that says nothing must not hold the supervisor (served inline at first)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002 — the stdlib's name
                pass

        listening = settings.metrics_address()
        server_class = type("Server", (wsgiref.simple_server.WSGIServer,),
                            {"address_family": socket.AF_INET6 if ":" in listening else socket.AF_INET})
        self._host = reachable_host(loopback_of(listening))  # where each process's own /metrics listens
        self._urls: list[str] = []
        registry = CollectorRegistry()
        registry.register(ProcessesSum(lambda: tuple(self._urls), expected=settings.workers + 1))
        self._server = wsgiref.simple_server.make_server(listening, settings.metrics_port, make_wsgi_app(registry),
                                                         server_class=server_class, handler_class=Quiet)
        self._server.timeout = 0.0  # answer_waiting never blocks
        self.socket = self._server.socket
        _announce(f"acroscreen supervisor metrics :{self._server.server_port} (all {settings.workers + 1} processes added up)")

    def answer_waiting(self) -> None:
        """Answer a scrape that is waiting, if one is (on this thread)."""
        self._server.handle_request()

    def serve(self, model_metrics: int, reports: Connection) -> None:
        """From now on from a thread, the model process's metrics included and the workers' as they report."""
        self._urls.append(f"http://{self._host}:{model_metrics}/metrics")

        def collect_reports() -> None:
            while True:
                try:
                    self._urls.append(f"http://{self._host}:{int(reports.recv_bytes())}/metrics")
                except (EOFError, OSError):
                    return

        threading.Thread(target=collect_reports, name="acroscreen-metrics-ports", daemon=True).start()
        threading.Thread(target=self._server.serve_forever, name="acroscreen-metrics", daemon=True).start()


def _wait_ready(
    ready: Connection, pid: int, stopping: threading.Event, meanwhile: Callable[[], None] | None
) -> tuple[ServedModel, int] | None:
    """Until the model process reports its model and metrics port, calling `meanwhile` every 0.2 s
    at most; None if it ended first or a stop was asked for (then it is ended: it stops on SIGTERM
    while loading)."""
    while not ready.poll(0.2):
        if meanwhile is not None:
            meanwhile()
        if stopping.is_set():
            _signal(pid, signal.SIGTERM)
            os.waitpid(pid, 0)
            return None
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            log.error("the model process failed to start (exit %d)", os.waitstatus_to_exitcode(status))
            return None
    try:
        report = json.loads(ready.recv_bytes())
    except EOFError:
        return None
    return ServedModel.from_json(report), int(report["metrics_port"])


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _port_nobody_serves(host: str, port: int) -> int:
    """The workers' port: a free one for 0, else `port` once a bind without SO_REUSEPORT shows that no
    other server listens there (the workers' SO_REUSEPORT would share it with that one, the kernel
    splitting connections between two servers without a word)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC: connections closing there are no obstacle
        try:
            probe.bind((http_address(host), port))
        except OSError as error:
            raise ConfigurationError(f"cannot listen on {host}:{port} ({error.strerror})") from error
        return probe.getsockname()[1]
