"""The frame path alone (decode → face analysis → crop; no gRPC, no model) in P processes at once.

Answers "how many frames a second can this machine's CPUs prepare for the model", the ceiling
under any server on it, and how much a frame's CPU grows when every core is busy (shared
caches, SMT siblings). Each process replays the bench clips as interleaved streams, each
with its own tracker, as a server worker does.

    python deploy/bench/frame_path_cpu.py CLIPS.npz --processes 1,8,16 [--seconds 10]

Prints one JSON object a process count: frames/s over all processes, CPU ms a frame, and the
time each stage took per frame on average (from the stage histograms the server exports; the
keyframe checks run on threads of their own, so the stages add up to more than the frame).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import queue
import time
from concurrent.futures import Future
from pathlib import Path

from acroscreen.server.bench import BenchConfig, load_clips
from acroscreen.server.metrics import Metrics
from acroscreen.server.runtime.decode import DecodeLimits
from acroscreen.server.runtime.preprocess import FacePreprocessor, PreprocessSettings
from acroscreen.server.runtime.types import EncodedImage, ImageEncoding
from acroscreen.server.service.aggregator import SubjectAggregator
from acroscreen.server.service.pipeline import FrameAnalyzer
from acroscreen.server.service.types import FrameInput, FramePrediction, FrameStatus, ModelRef


class _NoModel:
    """Stands in for the model queue: this probe measures the CPU side only."""

    def submit(self, item: object, owner: object = None) -> Future[tuple[float, float, float]]:
        done: Future[tuple[float, float, float]] = Future()
        done.set_result((1.0, 0.0, 0.0))
        return done


def _stage_seconds(metrics: Metrics) -> dict[str, float]:
    return {
        sample.labels["stage"]: sample.value
        for family in metrics.registry.collect() if family.name == "acroscreen_stage_seconds"
        for sample in family.samples if sample.name.endswith("_sum")
    }


def _replay(clips_path: str, seconds: float, start: multiprocessing.synchronize.Barrier, out: multiprocessing.Queue) -> None:
    clips = load_clips(BenchConfig(videos=(Path(clips_path),)))
    metrics = Metrics()
    analyzer = FrameAnalyzer(
        preprocessor=FacePreprocessor(PreprocessSettings()), batcher=_NoModel(),
        decode_limits=DecodeLimits(max_bytes=8 << 20, max_pixels=40_000_000), metrics=metrics,
    )
    model = ModelRef(name="none", version="0", kind="probe", sha256="")
    streams = [(clip, analyzer.new_tracker(), SubjectAggregator("probe", model, 1)) for clip in clips]
    analysed: list[FramePrediction] = []
    frames = 0

    def one_round() -> None:
        nonlocal frames
        for i in range(max(map(len, clips))):
            for clip, tracker, aggregator in streams:
                frame = FrameInput(index=frames, timestamp_us=frames * 33_333, received_at=time.monotonic(),
                                   image=EncodedImage(encoding=ImageEncoding.JPEG, data=clip[i % len(clip)].data))
                analyzer.analyze(frame, tracker, aggregator, analysed.append)
                frames += 1

    one_round()  # warm: trackers found their faces, caches filled
    start.wait(timeout=300)  # every process warm: their windows overlap
    frames, analysed[:] = 0, []
    stages_before = _stage_seconds(metrics)
    cpu, wall = time.process_time(), time.monotonic()
    while time.monotonic() - wall < seconds:
        one_round()
    stages = {name: total - stages_before.get(name, 0.0) for name, total in _stage_seconds(metrics).items()}
    out.put((frames, sum(p.status is FrameStatus.ANALYZED for p in analysed),
             time.process_time() - cpu, time.monotonic() - wall, stages))


def measure(clips_path: str, processes: int, seconds: float) -> dict:
    context = multiprocessing.get_context("fork")
    start, out = context.Barrier(processes), context.Queue()
    workers = [context.Process(target=_replay, args=(clips_path, seconds, start, out)) for _ in range(processes)]
    for worker in workers:
        worker.start()
    results = []
    deadline = time.monotonic() + seconds + 600
    while len(results) < processes:  # a process that failed sends nothing: its exit code says so
        try:
            results.append(out.get(timeout=1.0))
        except queue.Empty:
            if any(worker.exitcode not in (None, 0) for worker in workers) or time.monotonic() > deadline:
                for worker in workers:
                    worker.terminate()
                raise SystemExit("a frame-path process failed or hung (its traceback, if any, is above)") from None
    for worker in workers:
        worker.join()
    frames = sum(r[0] for r in results)
    wall = max(r[3] for r in results)
    stage_names = sorted({name for r in results for name in r[4]})
    return {
        "processes": processes,
        "frames_per_s": round(frames / wall, 1),
        "analysed_per_s": round(sum(r[1] for r in results) / wall, 1),
        "cpu_ms_per_frame": round(1000.0 * sum(r[2] for r in results) / frames, 2),
        "stage_ms_per_frame": {name: round(1000.0 * seconds / frames, 3) for name in stage_names
                               if (seconds := sum(r[4].get(name, 0.0) for r in results))},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("clips", help="a clips .npz from deploy/bench/prepare_gpu_bench.sh")
    parser.add_argument("--processes", default="1", help="comma-separated process counts")
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    for processes in map(int, args.processes.split(",")):
        print(json.dumps({"machine_cpus": multiprocessing.cpu_count(), **measure(args.clips, processes, args.seconds)}),
              flush=True)


if __name__ == "__main__":
    main()
