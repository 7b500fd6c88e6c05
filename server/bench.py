"""`acroscreen bench`: replay videos as N concurrent streams against a server and report
what was measured as one JSON object; with `--baseline naive`, also run a naive
in-process pipeline on the same frames in the same invocation and give the ratio.

The naive pipeline is what a first attempt looks like: per frame decode → detect →
landmarks → crop → model at batch 1, no tracking, no batching, one thread.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import multiprocessing
import os
import platform
import queue
import re
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from acroscreen.client import (
    FrameData,
    FrameResult,
    ScreeningClient,
    ScreenOptions,
    SubjectResult,
)
from acroscreen.client.sources import video_frames
from acroscreen.client.types import FrameAck
from acroscreen.client.workers import OWN_CONNECTION

if TYPE_CHECKING:
    from multiprocessing.sharedctypes import Synchronized
    from multiprocessing.synchronize import Event, Semaphore


REPLAYS = ("ping-pong", "wrap")


def replayed(index: int, length: int, replay: str) -> int:
    """The clip frame that a stream sends as its frame ``index`` (see ``BenchConfig.replay``)."""
    if replay == "wrap" or length < 2:
        return index % length
    phase = index % (2 * (length - 1))
    return phase if phase < length else 2 * (length - 1) - phase


@dataclass(frozen=True, kw_only=True)
class BenchConfig:
    videos: tuple[Path, ...]
    streams: int = 4
    duration_s: float = 20.0
    pace: str = "realtime"  # realtime: each stream at `fps`; fast: as fast as the server takes them
    fps: float = 30.0
    every_frame: bool = False  # ask the server to analyse every frame (backpressure instead of skipping)
    acknowledge_frames: bool = True  # ask for an immediate ack of queued frames
    server: str | None = None  # HOST:PORT of a running server; None starts one
    # Servers started (each with server_args), streamed to through one target naming them all
    # (`ipv4:a,b` or `ipv6:`), as a client reaches the pods of a headless Service.
    servers: int = 1
    metrics_url: str | None = None  # with `server`: its /metrics URL (comma-separated: one per worker)
    server_args: tuple[str, ...] = ()
    baseline: str | None = None  # "naive"
    baseline_duration_s: float = 15.0
    max_frames_per_video: int = 300
    load_processes: int = 0  # load-generator processes; 0 = one per 8 streams, at most half the cores
    # "per-worker": each load process is one client spreading its streams over the server's
    # workers (`spread_over_workers`); "per-stream": a connection per stream, placed by the kernel.
    connections: str = "per-worker"
    # Streams start one after another, evenly over this many seconds (separate callers do not
    # start in the same millisecond, and each placement then sees the streams before it); 0: at once.
    ramp_s: float = 0.0
    # A clip shorter than the run is replayed "ping-pong" (forward, backward, …: the picture never
    # jumps, as a live camera's does not) or "wrap" (from its start again: every replay is a scene
    # cut, so the tracked face is lost and searched for, which a live stream does not pay).
    replay: str = "ping-pong"
    jpeg_quality: int = 85

    def __post_init__(self) -> None:
        if not 0.0 <= self.ramp_s < self.duration_s:
            raise ValueError(f"ramp_s must be in [0, duration_s), got {self.ramp_s} for {self.duration_s} s")
        if self.replay not in REPLAYS:
            raise ValueError(f"replay must be one of {REPLAYS}, got {self.replay!r}")
        if self.servers < 1 or (self.servers > 1 and self.server is not None):
            raise ValueError(f"servers must be >= 1 and 1 with a running server, got {self.servers}")


@dataclass
class _StreamStats:
    sent: int = 0
    acknowledged: int = 0
    analyzed: int = 0
    ack_latency_ms: list[float] = field(default_factory=list)
    analysis_latency_ms: list[float] = field(default_factory=list)
    final: SubjectResult | None = None
    error: str | None = None


@dataclass(frozen=True, kw_only=True)
class _Load:
    """What the load generator saw, and the CPU it spent (on the server's machine, unless --server is remote)."""

    streams: list[_StreamStats]
    cpu_s: float
    started: float  # time.monotonic() when the measured window began: every load process ready


def load_clips(config: BenchConfig) -> list[list[FrameData]]:
    """Decode and JPEG-encode every clip once, so the load generator costs little CPU.

    A `.npz` holding arrays `clip0`, `clip1`, … of JPEG frames (object arrays of
    bytes, from `save_clips`) stands in for videos where PyAV is not installed.
    """
    clips = []
    for video in config.videos:
        if video.suffix == ".npz":
            import numpy as np

            with np.load(video, allow_pickle=False) as archive:
                for name in sorted(archive.files):
                    clips.append([FrameData(bytes(b), index=i) for i, b in enumerate(_unpack(archive[name]))])
            continue
        frames = []
        for frame in video_frames(video, config.jpeg_quality):
            frames.append(frame)
            if len(frames) >= config.max_frames_per_video:
                break
        clips.append(frames)
    return clips


def save_clips(path: Path, clips: list[list[FrameData]]) -> None:
    """Pack JPEG clips into one .npz (uint8 data + offsets; no pickles) for `load_clips`."""
    import numpy as np

    arrays = {}
    for i, clip in enumerate(clips):
        header = np.array([len(clip), *(len(f.data) for f in clip)], dtype=np.int64).view(np.uint8)
        arrays[f"clip{i:03d}"] = np.concatenate([header, *(np.frombuffer(f.data, np.uint8) for f in clip)])
    np.savez(path, **arrays)


def _unpack(packed) -> list[bytes]:  # noqa: ANN001 — a uint8 numpy array from save_clips
    import numpy as np

    count = int(packed[:8].view(np.int64)[0])
    sizes = packed[8 : 8 + 8 * count].view(np.int64)
    frames, offset = [], 8 + 8 * count
    for size in sizes:
        frames.append(packed[offset : offset + int(size)].tobytes())
        offset += int(size)
    return frames


def _stream(
    connect: Callable[[], AbstractContextManager[ScreeningClient]],
    clip: list[FrameData],
    config: BenchConfig,
    stats: _StreamStats,
    start_at: float,
    deadline: float,
) -> None:
    time.sleep(max(0.0, start_at - time.monotonic()))
    sent_at: dict[int, float] = {}
    acknowledged: set[int] = set()

    def acknowledge(index: int) -> None:
        if index not in acknowledged:  # the first answer about a frame is its acknowledgement
            acknowledged.add(index)
            stats.acknowledged += 1
            stats.ack_latency_ms.append((time.monotonic() - sent_at[index]) * 1000.0)

    def frames() -> Iterator[FrameData]:
        started = time.monotonic()
        index = 0
        while time.monotonic() < deadline:
            source = clip[replayed(index, len(clip), config.replay)]
            if config.pace == "realtime":
                delay = started + index / config.fps - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            sent_at[index] = time.monotonic()
            stats.sent += 1
            yield FrameData(source.data, source.kind, index=index, timestamp_us=int(index * 1e6 / config.fps))
            index += 1

    options = ScreenOptions(
        subject_id="bench", analyze_every_frame=config.every_frame, acknowledge_frames=config.acknowledge_frames
    )
    try:
        with connect() as client:
            for event in client.screen_stream(frames(), options):
                if isinstance(event, FrameAck):
                    acknowledge(event.index)
                elif isinstance(event, FrameResult):
                    acknowledge(event.index)
                    acknowledged.discard(event.index)
                    latency = (time.monotonic() - sent_at.pop(event.index)) * 1000.0
                    if event.status == "analyzed":
                        stats.analyzed += 1
                        stats.analysis_latency_ms.append(latency)
                elif event.status != "provisional":
                    stats.final = event
    except Exception as error:  # noqa: BLE001 — reported in the JSON, never hidden
        stats.error = f"{type(error).__name__}: {error}"


def _stream_threads(
    target: str, clips: list[list[FrameData]], config: BenchConfig, indices: list[int], deadline: float
) -> _Load:
    """Streams `indices`, one thread each, in this process."""
    cpu_before = time.process_time()
    timeout_s = config.duration_s + 120
    shared = ScreeningClient(target, timeout_s=timeout_s, spread_over_workers=True) if config.connections == "per-worker" else None

    def connect() -> AbstractContextManager[ScreeningClient]:
        if shared is not None:
            return contextlib.nullcontext(shared)
        # A connection of its own, as separate callers would have: channels of one process share one by
        # default; over several servers balanced by gRPC's round_robin, as clients of other languages do.
        several = [("grpc.lb_policy_name", "round_robin")] if config.servers > 1 else []
        return ScreeningClient(target, timeout_s=timeout_s, options=[OWN_CONNECTION, *several])

    stats = [_StreamStats() for _ in indices]
    started = deadline - config.duration_s
    threads = [
        threading.Thread(target=_stream, args=(connect, clips[i % len(clips)], config, stats[k],
                                               started + config.ramp_s * i / config.streams, deadline))
        for k, i in enumerate(indices)
    ]
    with shared or contextlib.nullcontext():
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    return _Load(streams=stats, cpu_s=time.process_time() - cpu_before, started=started)


def _stream_group(
    clips: list[list[FrameData]], started: float, target: str, config: BenchConfig, indices: list[int]
) -> _Load:
    """A load-generator process of its own (see `_started_together`): streams `indices`."""
    return _stream_threads(target, clips, config, indices, started + config.duration_s)


def _run_load(
    target: str, clips: list[list[FrameData]], config: BenchConfig, start_clock: Callable[[], float]
) -> _Load:
    """One Python process sends and receives about 250 frames/s, so many streams are spread over
    several load processes (`load_processes`; 8 streams each by default). The measured window
    starts (`start_clock`, which returns its time.monotonic()) once they are all ready to send."""
    processes = config.load_processes or max(1, min((os.cpu_count() or 1) // 2, -(-config.streams // 8)))
    if processes == 1:
        started = start_clock()
        return _stream_threads(target, clips, config, list(range(config.streams)), started + config.duration_s)
    groups = [list(range(config.streams))[k::processes] for k in range(processes)]
    loads, started = _started_together(_stream_group, [(target, config, group) for group in groups], clips, start_clock)
    return _Load(streams=[stat for load in loads for stat in load.streams], cpu_s=sum(load.cpu_s for load in loads),
                 started=started)


_load_process: dict = {}  # in a load process of `_started_together`: what `_init_load_process` was given


def _init_load_process(
    clips: list[list[FrameData]], ready: Semaphore, go: Event, started: Synchronized
) -> None:
    _load_process.update(clips=clips, ready=ready, go=go, started=started)


def _when_started(task: Callable[..., object], *args: object) -> object:
    """In a load process: says it is ready, waits for the clock, then runs `task(clips, started, *args)`."""
    _load_process["ready"].release()
    _load_process["go"].wait()
    started = _load_process["started"].value
    if not started:
        raise RuntimeError("the run was called off before it started")
    return task(_load_process["clips"], started, *args)


def _started_together(
    task: Callable[..., object],
    arguments: Sequence[tuple],
    clips: list[list[FrameData]],
    start_clock: Callable[[], float],
) -> tuple[list, float]:
    """`task(clips, started, *args)` for each `args` of `arguments`, each in a spawned process of its
    own, and the `started` they were given: `start_clock()`, called once every process has started,
    imported this module and holds the clips, so none of that is in anybody's measured window. The
    monotonic clock is system-wide on Linux, so every process shares it."""
    context = multiprocessing.get_context("spawn")
    ready, go, started = context.Semaphore(0), context.Event(), context.Value("d", 0.0)
    with concurrent.futures.ProcessPoolExecutor(
        max_workers=len(arguments), mp_context=context,
        initializer=_init_load_process, initargs=(clips, ready, go, started),
    ) as pool:
        try:  # one task per process: each holds its process until the clock starts
            futures = [pool.submit(_when_started, task, *args) for args in arguments]
            for _ in futures:
                while not ready.acquire(timeout=0.5):
                    for future in futures:
                        if future.done():  # a process that could not start raises here
                            future.result()
                            raise RuntimeError("a load process ended before the run started")
            started.value = start_clock()
        finally:
            go.set()  # with `started` still 0 after a failure: the run is called off
        return [future.result() for future in futures], started.value


def _percentiles(values: list[float]) -> dict[str, float | None]:
    """p50/p95/p99 by the nearest-rank definition: the p-th percentile of n values is the
    ceil(p/100 · n)-th smallest (1-based), a value that was measured; p99 of 100 values is the 99th."""
    if not values:
        return {"p50": None, "p95": None, "p99": None}
    ordered = sorted(values)

    def at(percent: int) -> float:
        rank = -(-percent * len(ordered) // 100)  # ceil in integers: no 0.95 * 100 = 95.00000000000001
        return round(ordered[max(0, rank - 1)], 2)

    return {"p50": at(50), "p95": at(95), "p99": at(99)}


def _scrape(url: str) -> dict[str, float]:
    """Counters and histogram sums/counts of one server's (one worker's) /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    values: dict[str, float] = {}
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.endswith("_bucket"):
                continue
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            values[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return values


def _sum_scrapes(scrapes: Sequence[dict[str, float]]) -> dict[str, float]:
    """Every worker's values added up."""
    total: dict[str, float] = {}
    for values in scrapes:
        for key, value in values.items():
            total[key] = total.get(key, 0.0) + value
    return total


def _stage_means_ms(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    means = {}
    for key, total in after.items():
        match = re.fullmatch(r"acroscreen_stage_seconds_sum\{stage=(\w+)\}", key)
        if not match:
            continue
        count_key = f"acroscreen_stage_seconds_count{{stage={match.group(1)}}}"
        count = after.get(count_key, 0.0) - before.get(count_key, 0.0)
        if count:
            means[match.group(1)] = round((total - before.get(key, 0.0)) / count * 1000.0, 2)
    return means


class _ProcessProbe:
    """CPU time and peak RSS of the servers' processes from /proc (Linux), GPU use from nvidia-smi."""

    def __init__(self, pids: Sequence[int]) -> None:
        self._servers = list(pids)
        self._ticks = os.sysconf("SC_CLK_TCK")
        self._gpu_samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample_gpu, daemon=True)

    def _pids(self) -> list[int]:
        """Each server and its worker processes (`--workers`)."""
        pids = []
        for pid in self._servers:
            try:
                children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            except OSError:
                children = []
            pids += [pid, *map(int, children)]
        return pids

    def cpu_seconds(self) -> float:
        total = 0.0
        for pid in self._pids():
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / self._ticks
        return total

    def peak_rss_mb(self) -> float:
        """Sum of each process's peak resident memory."""
        total = 0
        for pid in self._pids():
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1])
        return round(total / 1024.0, 1)

    def start_gpu_sampling(self) -> None:
        if shutil.which("nvidia-smi"):
            self._sampler.start()

    def _sample_gpu(self) -> None:
        while not self._stop.wait(0.5):
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits"],
                capture_output=True, text=True,
            ).stdout.strip().splitlines()
            if out:
                util, memory = (float(x) for x in out[0].split(","))
                self._gpu_samples.append((util, memory))

    def gpu_summary(self) -> dict[str, float] | None:
        self._stop.set()
        if not self._gpu_samples:
            return None
        return {
            "utilization_mean_pct": round(statistics.mean(u for u, _ in self._gpu_samples), 1),
            "memory_peak_mib": max(m for _, m in self._gpu_samples),
        }


def _start_server(config: BenchConfig) -> tuple[subprocess.Popen, str, list[str], list[str]]:
    """The server as a subprocess: its gRPC target, the workers' /metrics URLs and the model process's."""
    from .config import Settings

    workers = Settings.load(argv=list(config.server_args)).workers
    command = [sys.executable, "-m", "acroscreen.client.cli", "serve", "--port", "0", "--metrics-port", "0",
               "--log-json", *config.server_args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        return process, *_read_ports(process, workers, SERVER_START_TIMEOUT_S)
    except BaseException:
        _stop([process])
        raise


# How long a started server may take to say it is serving (loading the model included).
SERVER_START_TIMEOUT_S = 300.0
# What server/main.py prints on stdout: a worker `serving on HOST:PORT (metrics :PORT)`, the model
# process (--workers > 1) `model process ready (metrics :PORT)`; metrics :-1 with --metrics-port -1.
# HOST as given to --host: 127.0.0.1, localhost, ::, [::1], …
_SERVING = re.compile(r"serving on (\S*):(\d+) \(metrics :(-?\d+)\)")
_MODEL_READY = re.compile(r"model process ready \(metrics :(-?\d+)\)")


def _read_ports(process: subprocess.Popen, workers: int, timeout_s: float) -> tuple[str, list[str], list[str]]:
    """The gRPC target, the workers' /metrics URLs and the model process's, as the started server
    prints them on stdout, once each of its `workers` has; an error naming what it printed if it ends
    or `timeout_s` passes first. With several workers each process's own /metrics listens on the
    loopback of the server's address family (the supervisor's sum is on --host)."""
    from .config import loopback_of, reachable_host

    lines = _lines_of(process)
    printed: list[str] = []
    target, metrics_urls, model_ports, serving, metrics_host = "", [], [], 0, ""
    deadline = time.monotonic() + timeout_s
    while serving < workers:  # each worker reports the shared port and a metrics port of its own
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise RuntimeError(f"the benchmark server did not say it was serving within {timeout_s:g} s; "
                               f"it printed {printed!r} (try `acroscreen serve` by hand)") from None
        if line is None:
            raise RuntimeError(f"the benchmark server ended (exit status {process.poll()}) before it was serving; "
                               f"it printed {printed!r} (try `acroscreen serve` by hand)")
        printed.append(line.rstrip("\n"))
        if model := _MODEL_READY.search(line):
            if int(model.group(1)) >= 0:
                model_ports.append(model.group(1))
        elif match := _SERVING.search(line):
            host, port, metrics = reachable_host(match.group(1)), match.group(2), int(match.group(3))
            target, serving = f"{host}:{port}", serving + 1
            metrics_host = reachable_host(loopback_of(match.group(1))) if workers > 1 else host
            if metrics >= 0:
                metrics_urls.append(f"http://{metrics_host}:{metrics}/metrics")
    return target, metrics_urls, [f"http://{metrics_host}:{port}/metrics" for port in model_ports]


def _lines_of(process: subprocess.Popen) -> queue.Queue[str | None]:
    """The process's stdout line by line, then None: read by a thread, so that a wait for a line can
    time out, until the process closes it (a pipe nobody reads would block the server once full)."""
    assert process.stdout is not None
    lines: queue.Queue[str | None] = queue.Queue()

    def read(stdout: TextIO) -> None:
        with stdout:
            for line in stdout:
                lines.put(line)
        lines.put(None)

    threading.Thread(target=read, args=(process.stdout,), name="acroscreen-bench-server-stdout", daemon=True).start()
    return lines


def run_streams(config: BenchConfig, clips: list[list[FrameData]]) -> dict:
    processes: list[subprocess.Popen] = []
    if config.server is None:
        targets, metrics_urls, model_urls = [], [], []
        try:
            for _ in range(config.servers):
                process, one_target, workers_urls, model_process_urls = _start_server(config)
                processes.append(process)
                targets.append(one_target)
                metrics_urls += workers_urls
                model_urls += model_process_urls
        except BaseException:
            _stop(processes)
            raise
        target = targets[0] if len(targets) == 1 else several_servers_target(targets)
    else:
        target, metrics_urls, model_urls = config.server, [u for u in (config.metrics_url or "").split(",") if u], []
        targets = [target]
    probe = _ProcessProbe([process.pid for process in processes]) if processes else None
    try:
        for one_target in targets:
            with ScreeningClient(one_target, timeout_s=30) as client:
                client.wait_until_serving(120)
                info = client.model_info()
                model = info.model
        before_each = [_scrape(url) for url in metrics_urls + model_urls]
        before = _sum_scrapes(before_each)
        cpu_before = 0.0

        def start_clock() -> float:  # when every load process is ready to send
            nonlocal cpu_before
            if probe:
                cpu_before = probe.cpu_seconds()
                probe.start_gpu_sampling()
            return time.monotonic()

        load = _run_load(target, clips, config, start_clock)
        stats = load.streams
        # From the clock's start (the first stream's start) to the last answer: like the naive
        # baseline's window, which starts with its first frame, nothing of the setup.
        elapsed = time.monotonic() - load.started
        after_each = [_scrape(url) for url in metrics_urls + model_urls]
        after = _sum_scrapes(after_each)
        report = {
            "target": target,
            "servers": len(targets),
            "model": {"name": model.name, "kind": model.kind, "arithmetic": info.arithmetic},
            "streams": config.streams,
            "pace": config.pace,
            "every_frame": config.every_frame,
            "elapsed_s": round(elapsed, 2),
            "frames_sent": sum(s.sent for s in stats),
            "frames_acknowledged": sum(s.acknowledged for s in stats),
            "frames_analyzed": sum(s.analyzed for s in stats),
            "acknowledged_per_s": round(sum(s.acknowledged for s in stats) / elapsed, 2),
            "analyzed_per_s": round(sum(s.analyzed for s in stats) / elapsed, 2),
            "ack_latency_ms": _percentiles([x for s in stats for x in s.ack_latency_ms]),
            "end_to_end_latency_ms": _percentiles([x for s in stats for x in s.analysis_latency_ms]),
            "final_results": sum(s.final is not None and s.final.status != "provisional" for s in stats),
            "errors": [s.error for s in stats if s.error],
            "server_stage_mean_ms": _stage_means_ms(before, after),
            # The load generator's own CPU: on one machine it competes with the server for the cores.
            "load_cpu_cores": round(load.cpu_s / elapsed, 2),
            "load_cpu_ms_per_frame": round(1000.0 * load.cpu_s / max(1, sum(s.sent for s in stats)), 2),
        }
        if metrics_urls:  # the server's own count, every worker's: should equal frames_sent
            received = "acroscreen_frames_received_total"
            report["server_frames_received"] = round(after.get(received, 0.0) - before.get(received, 0.0))
            report["server_frames_received_per_worker"] = [  # how evenly the streams were spread (server by server)
                round(a.get(received, 0.0) - b.get(received, 0.0))
                for a, b in zip(after_each[: len(metrics_urls)], before_each)
            ]
        batches = after.get("acroscreen_inference_batch_size_count", 0) - before.get("acroscreen_inference_batch_size_count", 0)
        if batches:
            faces = after["acroscreen_inference_batch_size_sum"] - before.get("acroscreen_inference_batch_size_sum", 0)
            report["mean_batch_size"] = round(faces / batches, 2)
        if probe:
            cpu = probe.cpu_seconds() - cpu_before
            report["server_cpu_utilization_pct"] = round(100.0 * cpu / elapsed / (os.cpu_count() or 1), 1)
            # All server processes' CPU over the frames they answered: a node's ceiling is about
            # cores × 1000 / this many frames a second, whatever the load generator managed.
            acknowledged = report["frames_acknowledged"]
            report["server_cpu_ms_per_frame"] = round(1000.0 * cpu / acknowledged, 2) if acknowledged else None
            report["server_peak_rss_mb"] = probe.peak_rss_mb()
            report["gpu"] = probe.gpu_summary()
        return report
    finally:
        _stop(processes)


def several_servers_target(targets: list[str]) -> str:
    """One gRPC target naming every started server (`host:port` each), as a client reaches the pods
    of a headless Service: `ipv4:` or `ipv6:` by the address family, a name looked up first."""
    addresses = []
    for target in targets:
        host, port = target.rsplit(":", 1)
        family, *_, sockaddr = socket.getaddrinfo(host.strip("[]"), int(port), type=socket.SOCK_STREAM)[0]
        addresses.append((family, f"[{sockaddr[0]}]:{port}" if family == socket.AF_INET6 else f"{sockaddr[0]}:{port}"))
    families = {family for family, _ in addresses}
    if len(families) != 1:
        raise ValueError(f"the servers {targets} are not all of one address family")
    scheme = "ipv6" if families == {socket.AF_INET6} else "ipv4"
    return f"{scheme}:" + ",".join(address for _, address in addresses)


# How long a stopped server may drain before it is killed (its grace period is 30 s by default).
SERVER_STOP_TIMEOUT_S = 60.0


def _stop(processes: list[subprocess.Popen]) -> None:
    """Stop the started servers: each drains on SIGTERM; one still running after
    SERVER_STOP_TIMEOUT_S is killed, so the bench never hangs on it or leaves it behind."""
    for process in processes:
        process.terminate()
    deadline = time.monotonic() + SERVER_STOP_TIMEOUT_S
    for process in processes:
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def run_naive(config: BenchConfig, clips: list[list[FrameData]], device: str) -> dict:
    """Per frame: decode → detect → landmarks → crop → model at batch 1; one thread, no tracking."""
    import cv2
    import numpy as np

    from .config import Settings
    from .main import load_model_weights
    from .runtime.model import SeverityModel
    from .runtime.preprocess import FacePreprocessor, PreprocessSettings

    # The same weights the started server chose from the same environment and flags.
    server_settings = Settings.load(argv=list(config.server_args))
    weights = load_model_weights(server_settings)
    model = SeverityModel(weights.net, weights.card, device, server_settings.cpu_precision,
                          int8_scales=weights.int8_scales)
    model.warmup()
    preprocessor = FacePreprocessor(PreprocessSettings.from_card_preprocessing(weights.card.preprocessing))
    # Interleave the clips, as the concurrent streams do, so a short run sees all of them.
    frames = [clip[i] for i in range(max(map(len, clips))) for clip in clips if i < len(clip)]
    processed = analyzed = 0
    latencies: list[float] = []
    started = time.monotonic()  # as the server's window, from the first frame: the model loaded and warm
    while time.monotonic() - started < config.baseline_duration_s:
        frame = frames[processed % len(frames)]
        t0 = time.monotonic()
        image = cv2.imdecode(np.frombuffer(frame.data, np.uint8), cv2.IMREAD_COLOR)
        _analysis, crop = preprocessor.crop_image(image)
        if crop is not None:
            model.predict(crop.pixels[None])
            analyzed += 1
        latencies.append((time.monotonic() - t0) * 1000.0)
        processed += 1
    elapsed = time.monotonic() - started
    return {
        "frames_processed": processed,
        "frames_analyzed": analyzed,
        "analyzed_per_s": round(analyzed / elapsed, 2),
        "processed_per_s": round(processed / elapsed, 2),
        "frame_latency_ms": _percentiles(latencies),
    }


def machine() -> dict:
    from .runtime.cpu import cpu_model

    info = {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}
    if model := cpu_model():
        info["cpu"] = model
    if shutil.which("nvidia-smi"):
        gpu = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True)
        info["gpu"] = gpu.stdout.strip() or None
    return info


def run_bench(config: BenchConfig, device: str = "cpu") -> dict:
    clips = load_clips(config)
    report = {"machine": machine(), "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()}}
    report["config"]["videos"] = [str(v) for v in config.videos]
    report["server"] = run_streams(config, clips)
    if config.baseline == "naive":
        naive = run_naive(config, clips, device)
        report["naive"] = naive
        if naive["analyzed_per_s"]:
            report["speedup_analyzed_per_s"] = round(report["server"]["analyzed_per_s"] / naive["analyzed_per_s"], 2)
    return report
