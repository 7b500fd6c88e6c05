"""The `acroscreen` command. Server verbs import server code lazily, so a
client-only install (no torch, no dlib) can still run `screen` and `model-info`."""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from .client import Credentials, ScreeningClient, ScreenOptions, StreamEvent
from .errors import AcroscreenClientError, AuthenticationError, UnavailableError
from .types import FrameAck, FrameResult, SubjectResult


SERVER_PORT = 50051  # the server's default port (not gRPC's default for a target without one: 443)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Only `train` needs its config class (and so torch) to build its flags.
    parser = _parser(with_training_flags=bool(argv) and argv[0] == "train")
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    try:
        return args.run(args)
    except AuthenticationError as error:
        print(f"acroscreen: {error} (give --token-file with a token the server accepts)", file=sys.stderr)
        return 1
    except UnavailableError as error:
        print(f"acroscreen: {error} (is the server up at --server? does it speak TLS, which needs --tls-ca (and"
              " --tls-cert/--tls-key for mutual TLS), or plaintext, which needs none of them?)", file=sys.stderr)
        return 1
    except AcroscreenClientError as error:
        print(f"acroscreen: {error}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as error:  # the input: a missing file or webcam, an unreadable photo or video
        print(f"acroscreen: {error}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as error:
        extra = "media" if error.name in ("av", "cv2") else "server"
        print(
            f"acroscreen: this needs {error.name!r}, which a client-only install lacks: "
            f"pip install 'acroscreen[{extra}]'",
            file=sys.stderr,
        )
        return 2


def _parser(with_training_flags: bool = False) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="acroscreen", description="Acromegaly facial screening service (research use).")
    verbs = parser.add_subparsers(title="commands")

    serve = verbs.add_parser("serve", help="run the gRPC screening server")
    _add_server_flags(serve)
    serve.set_defaults(run=_serve)

    screen = verbs.add_parser("screen", help="screen a video file, image, folder of images or webcam")
    screen.add_argument(
        "source",
        help="video file, image file, folder of images, or webcam index (a webcam is captured until Ctrl-C, "
        "which ends the stream and prints the result, or until --max-frames frames were analysed)",
    )
    screen.add_argument("--server", default=f"127.0.0.1:{SERVER_PORT}", help="HOST:PORT of the server")
    screen.add_argument("--subject-id", default="", help="your identifier for the subject (echoed back)")
    screen.add_argument("--json", action="store_true", help="print exactly one JSON object: the final subject result")
    screen.add_argument(
        "--max-frames", type=int, default=0,
        help="stop analysing after this many frames; a webcam's capture ends there too (0: no limit but the server's)",
    )
    screen.add_argument(
        "--realtime",
        action="store_true",
        help="let the server skip frames it cannot keep up with (default for webcams; videos analyse every frame)",
    )
    screen.add_argument("--jpeg-quality", type=_jpeg_quality, default=85, help="1-100, for video and webcam frames")
    screen.add_argument("--timeout", type=float, default=None, help="deadline for the whole call, seconds")
    screen.add_argument("--fhir", metavar="OUT.json", default=None, help="also write the result as a FHIR R4 Observation")
    screen.add_argument("--fhir-subject", metavar="REFERENCE", default=None, help="the Observation's subject, e.g. Patient/123")
    _add_connection_flags(screen)
    screen.set_defaults(run=_screen)

    info = verbs.add_parser("model-info", help="show the model the server runs")
    info.add_argument("--server", default=f"127.0.0.1:{SERVER_PORT}")
    _add_connection_flags(info)
    info.set_defaults(run=_model_info)

    bench = verbs.add_parser("bench", help="replay videos as concurrent streams and report throughput as JSON")
    bench.add_argument("videos", nargs="+", help="video files to replay (looped)")
    bench.add_argument("--streams", type=int, default=4)
    bench.add_argument("--duration", type=float, default=20.0, help="seconds of streaming")
    bench.add_argument("--pace", choices=("realtime", "fast"), default="realtime")
    bench.add_argument("--fps", type=float, default=30.0, help="frames per second per stream when realtime")
    bench.add_argument("--every-frame", action="store_true", help="ask the server to analyse every frame")
    bench.add_argument("--server", default=None, help="HOST:PORT of a running server (default: start one)")
    bench.add_argument("--metrics-url", default=None, help="its /metrics URL, with --server (comma-separated for several workers)")
    bench.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    bench.add_argument("--server-arg", action="append", default=[], help="extra flag for the started server")
    bench.add_argument("--servers", type=int, default=1,
                       help="servers to start, reached through one target naming them all (as a headless Service's pods)")
    bench.add_argument("--load-processes", type=int, default=0,
                       help="load-generator processes (0 = one per 8 streams, at most half the cores)")
    bench.add_argument("--connections", choices=("per-worker", "per-stream"), default="per-worker",
                       help="per-worker: each load process is one client spreading its streams over the server's "
                       "workers; per-stream: a connection per stream, placed on a worker by the kernel")
    bench.add_argument("--ramp-s", type=float, default=0.0,
                       help="start the streams one after another, evenly over this many seconds (0: all at once)")
    bench.add_argument("--replay", choices=("ping-pong", "wrap"), default="ping-pong",
                       help="a clip shorter than the run: forward then backward (no jump), or from its start again "
                       "(a scene cut at every replay)")
    bench.add_argument("--baseline", choices=("naive",), default=None, help="also run the naive pipeline")
    bench.add_argument("--baseline-duration", type=float, default=15.0)
    bench.add_argument("--out", default=None, help="also write the JSON report to this file")
    bench.set_defaults(run=_bench)

    preprocess = verbs.add_parser("preprocess", help="write frontalized 160x160 face crops (the model's input) as PNG")
    preprocess.add_argument("source", type=Path, help="image, folder of images, or video file")
    preprocess.add_argument("--out", type=Path, required=True, help="folder for the crops")
    preprocess.add_argument("--landmarks", type=int, choices=(5, 68), default=5,
                            help="landmark model: 5 (commercial use ok) or 68 (research only; the crop also undoes yaw)")
    preprocess.add_argument("--json", action="store_true", help="one JSON object per analysed frame on stdout")
    preprocess.set_defaults(run=_preprocess)

    phantom = verbs.add_parser("phantom", help="make acromegaly-like phantom images or clips from identity photographs")
    phantom.add_argument("identities", type=Path, help="folder of <identity>/<image> photographs")
    phantom.add_argument("--out", type=Path, required=True)
    phantom.add_argument("--levels", default="1,2,3", help="severity levels, comma-separated")
    phantom.add_argument("--per-image", type=int, default=1, help="phantoms per photograph and level")
    phantom.add_argument("--video", action="store_true", help="also write a short clip with head motion per phantom")
    phantom.add_argument("--split", choices=("train", "holdout", "all"), default="train",
                         help="which identities of SPLIT.md to use (never train on holdout)")
    phantom.add_argument("--split-file", type=Path, default=None)
    phantom.add_argument("--seed", type=int, default=0)
    phantom.add_argument("--video-frames", type=int, default=48)
    phantom.add_argument("--video-fps", type=float, default=12.0)
    phantom.set_defaults(run=_phantom)

    train = verbs.add_parser("train", help="train the severity model on DATA/<score>/<subject>/<image> or a CSV")
    train.add_argument("data", type=Path, help="folder DATA/<score>/<subject_id>/<image>, CSV path,score,subject_id, or crop cache .npz")
    train.add_argument("--out", type=Path, required=True, help="weights file to write (.safetensors)")
    if with_training_flags:
        from acroscreen.server.training.train import TrainConfig

        _add_dataclass_flags(train, TrainConfig, skip=("data", "out", "notices"))
    train.set_defaults(run=_train)

    evaluate = verbs.add_parser("evaluate", help="confusion matrix, F1, kappa, false-negative rate, calibration")
    evaluate.add_argument("data", type=Path, nargs="?", help="labelled DATA folder, CSV or crop cache (with --model)")
    evaluate.add_argument("--model", type=Path, default=None, help="weights to run on DATA")
    evaluate.add_argument("--predictions", type=Path, default=None,
                          help="CSV with actual,predicted[,subject_id,p1,p2,p3] instead of running a model")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object")
    evaluate.add_argument("--plots", type=Path, default=None, help="folder for confusion matrix and reliability PNGs")
    evaluate.add_argument("--cache", type=Path, default=None, help="crop cache for DATA")
    evaluate.add_argument("--device", choices=("cpu", "cuda"), default=None)
    evaluate.add_argument("--save-predictions", type=Path, default=None, help="write the per-frame predictions CSV")
    evaluate.set_defaults(run=_evaluate)

    calibrate = verbs.add_parser("calibrate-int8", help="measure the activation scales for int8 CPU inference")
    calibrate.add_argument("data", type=Path, help="DATA folder, CSV or crop cache of training images (never holdout)")
    calibrate.add_argument("--model", type=Path, required=True, help="weights file to calibrate")
    calibrate.add_argument("--out", type=Path, default=None, help="scales file (default: beside the weights, <stem>.int8.json)")
    calibrate.add_argument("--cache", type=Path, default=None, help="crop cache for DATA")
    calibrate.add_argument("--crops", type=int, default=512, help="crops to calibrate on; the next 512 check the result")
    calibrate.add_argument("--seed", type=int, default=0)
    calibrate.set_defaults(run=_calibrate)

    demo = verbs.add_parser("demo", help="start a server and screen the shipped demo clips")
    demo.add_argument("--frames", type=int, default=60, help="frames per demo clip")
    _add_server_flags(demo)
    demo.set_defaults(run=_demo)
    return parser


def _add_connection_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tls-ca", help="PEM CA bundle to verify the server (turns TLS on)")
    parser.add_argument("--tls-cert", help="PEM client certificate, for mutual TLS")
    parser.add_argument("--tls-key", help="PEM private key of --tls-cert")
    parser.add_argument("--token-file", help="file holding the bearer token")


def _jpeg_quality(text: str) -> int:
    quality = int(text)
    if not 1 <= quality <= 100:
        raise argparse.ArgumentTypeError(f"JPEG quality runs from 1 to 100, not {quality}")
    return quality




def with_port(target: str) -> str:
    """`--server HOST` means the server's default port: gRPC would take 443 (HTTPS's) for it."""
    if target.startswith("["):
        return target if "]:" in target else f"{target}:{SERVER_PORT}"
    with contextlib.suppress(ValueError):
        if ipaddress.ip_address(target).version == 6:
            return f"[{target}]:{SERVER_PORT}"
    return target if ":" in target else f"{target}:{SERVER_PORT}"  # HOST:PORT, or a scheme (dns:, ipv4:)


def _connect(args: argparse.Namespace, timeout_s: float | None = None) -> ScreeningClient:
    credentials = Credentials.from_files(
        tls_ca=args.tls_ca, tls_cert=args.tls_cert, tls_key=args.tls_key, token_file=args.token_file
    )
    return ScreeningClient(with_port(args.server), timeout_s=timeout_s, credentials=credentials)


def _add_server_flags(parser: argparse.ArgumentParser) -> None:
    from acroscreen.server.config import (
        add_flags,  # config is pure stdlib: safe without the server extra
    )

    add_flags(parser)


def _serve(args: argparse.Namespace) -> int:
    from acroscreen.server.config import Settings
    from acroscreen.server.main import serve

    return serve(Settings.load(namespace=args))


def _screen(args: argparse.Namespace) -> int:
    from . import sources

    source = sources.describe(args.source)
    fhir_started = _fhir_start(args)
    options = ScreenOptions(
        subject_id=args.subject_id,
        max_analyzed_frames=args.max_frames,
        analyze_every_frame=source.kind == "video" and not args.realtime,
    )
    progress = _Progress(source.frame_count, enabled=sys.stderr.isatty())
    capture = _WebcamCapture(args.max_frames)
    try:
        with _connect(args, args.timeout) as client:
            frames = sources.frames(
                source, jpeg_quality=args.jpeg_quality, stop=capture.stop,
                on_open=lambda: print(f"acroscreen: webcam {source.location}: Ctrl-C ends the capture and prints the result", file=sys.stderr),
            )
            if source.kind == "images":  # one request if they fit, else a stream of still images
                result = client.screen_photos(frames, options, on_event=progress.update)
            elif source.kind == "webcam":
                with capture.ended_by_ctrl_c():
                    result = client.screen(frames, options, on_event=capture.counting(progress.update))
            else:
                result = client.screen(frames, options, on_event=progress.update)
    except AcroscreenClientError as error:
        progress.done()
        # The server sent its result for what it analysed before the call failed (a stream limit,
        # a shutdown): print it, then the error (main() says it, and the exit status is 1).
        if isinstance(error.final_result, SubjectResult):
            _report(args, error.final_result, source.kind, fhir_started)
        raise
    progress.done()
    _report(args, result, source.kind, fhir_started)
    return 0


def _report(args: argparse.Namespace, result: SubjectResult, source_kind: str, fhir_started: object) -> None:
    if args.fhir:
        _write_fhir(args, result, source_kind, fhir_started)
    if args.json:
        print(json.dumps(result.to_dict(), sort_keys=True))
    else:
        print(describe_result(result))


def _fhir_start(args: argparse.Namespace) -> object:
    """Check the FHIR flags before screening; the capture start time (the Observation's effective time)."""
    from datetime import datetime, timezone

    if args.fhir:
        folder = Path(args.fhir).resolve().parent
        if not folder.is_dir():  # found now, not after a screening that could not be written down
            raise ValueError(f"--fhir {args.fhir}: no folder {folder} to write it in")
    if args.fhir_subject is not None:
        if not args.fhir:
            raise ValueError("--fhir-subject needs --fhir OUT.json")
        from .fhir import validate_reference

        validate_reference(args.fhir_subject)
    return datetime.now(timezone.utc)


def _write_fhir(args: argparse.Namespace, result: SubjectResult, source_kind: str, started: object) -> None:
    from pathlib import Path

    from .fhir import to_fhir_observation

    observation = to_fhir_observation(result, args.fhir_subject, effective=started, source=source_kind)  # type: ignore[arg-type]
    Path(args.fhir).write_text(json.dumps(observation, indent=2) + "\n")


def _model_info(args: argparse.Namespace) -> int:
    with _connect(args) as client:
        print(json.dumps(client.model_info().to_dict(), indent=2))
    return 0


def _add_dataclass_flags(parser: argparse.ArgumentParser, config_class: type, skip: tuple[str, ...]) -> None:
    """One --flag per field of a config dataclass; unset flags keep the dataclass default."""
    import dataclasses

    for field in dataclasses.fields(config_class):
        if field.name in skip:
            continue
        flag = "--" + field.name.replace("_", "-")
        default = field.default if field.default is not dataclasses.MISSING else None
        if str(field.type) == "bool":
            parser.add_argument(flag, dest=field.name, action=argparse.BooleanOptionalAction, default=None,
                                help=f"default {default}")
        else:
            parser.add_argument(flag, dest=field.name, default=None, help=f"{field.type}; default {default}")


def _dataclass_from(args: argparse.Namespace, config_class: type, **given: object) -> object:
    import dataclasses

    from acroscreen.server.config import parse_annotated

    values = dict(given)
    for field in dataclasses.fields(config_class):
        raw = getattr(args, field.name, None)
        if raw is None or field.name in values:
            continue
        values[field.name] = raw if isinstance(raw, bool) else parse_annotated(str(field.type), raw)
    return config_class(**values)


def _preprocess(args: argparse.Namespace) -> int:
    from acroscreen.server.runtime.preprocess_cli import run_preprocess

    return run_preprocess(args.source, args.out, args.landmarks, args.json)


def _phantom(args: argparse.Namespace) -> int:
    from acroscreen.server.training.phantom import run_phantom

    levels = tuple(int(level) for level in args.levels.split(","))
    manifest = run_phantom(
        args.identities, args.out, levels=levels, per_image=args.per_image, video=args.video, split=args.split,
        split_file=args.split_file, seed=args.seed, video_frames=args.video_frames, video_fps=args.video_fps,
    )
    print(manifest)
    return 0


def _train(args: argparse.Namespace) -> int:
    from acroscreen.server.training.train import TrainConfig, run_train

    print(run_train(_dataclass_from(args, TrainConfig, data=args.data, out=args.out)))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from acroscreen.server.training.evaluate import run_evaluate

    run_evaluate(
        model=args.model, data=args.data, predictions=args.predictions, as_json=args.json, plots=args.plots,
        cache=args.cache, device=args.device, save_predictions=args.save_predictions,
    )
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    from acroscreen.server.training.calibrate import run_calibrate

    run_calibrate(model=args.model, data=args.data, out=args.out, cache=args.cache, crops=args.crops, seed=args.seed)
    return 0


def _bench(args: argparse.Namespace) -> int:
    from acroscreen.server.bench import BenchConfig, run_bench

    config = BenchConfig(
        videos=tuple(Path(v) for v in args.videos),
        streams=args.streams,
        duration_s=args.duration,
        pace=args.pace,
        fps=args.fps,
        every_frame=args.every_frame,
        server=with_port(args.server) if args.server else None,
        servers=args.servers,
        metrics_url=args.metrics_url,
        server_args=("--device", args.device, "--allow-untrained", *args.server_arg),
        baseline=args.baseline,
        baseline_duration_s=args.baseline_duration,
        load_processes=args.load_processes,
        connections=args.connections,
        ramp_s=args.ramp_s,
        replay=args.replay,
    )
    report = json.dumps(run_bench(config, args.device), indent=2)
    if args.out:
        Path(args.out).write_text(report + "\n")
    print(report)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from acroscreen.server.demo.run import run_demo

    return run_demo(args)


class _WebcamCapture:
    """Ends a webcam's capture, after which the stream gets its FINAL result: at Ctrl-C (a second
    one interrupts at once), or once `max_frames` frames were answered analysed or rejected, when
    the stream's analysis cap is reached and the server would skip every later frame."""

    def __init__(self, max_frames: int) -> None:
        self.stop = threading.Event()
        self._max_frames = max_frames
        self._answered = 0

    def counting(self, on_event: Callable[[StreamEvent], None]) -> Callable[[StreamEvent], None]:
        def seen(event: StreamEvent) -> None:
            on_event(event)
            if isinstance(event, FrameResult) and event.status != "skipped":
                self._answered += 1
                if self._max_frames and self._answered >= self._max_frames:
                    self.stop.set()

        return seen

    @contextlib.contextmanager
    def ended_by_ctrl_c(self) -> Iterator[None]:
        def interrupted(signum: int, frame: object) -> None:
            signal.signal(signal.SIGINT, previous)
            self.stop.set()

        previous = signal.signal(signal.SIGINT, interrupted)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)


class _Progress:
    """One self-rewriting line on a terminal; silent when stderr is not one."""

    def __init__(self, total: int, enabled: bool) -> None:
        self._total = total
        self._enabled = enabled
        self._counts = {"analyzed": 0, "rejected": 0, "skipped": 0}

    def update(self, event: StreamEvent) -> None:
        if not self._enabled or isinstance(event, FrameAck):
            return
        if isinstance(event, FrameResult):
            self._counts[event.status] = self._counts.get(event.status, 0) + 1
        seen = sum(self._counts.values())
        total = f"/{self._total}" if self._total else ""
        text = ", ".join(f"{n} {k}" for k, n in self._counts.items())
        score = ""
        if isinstance(event, SubjectResult) and event.expected_score is not None:
            score = f"  expected score {event.expected_score:.2f}"
        print(f"\rframes {seen}{total}: {text}{score}   ", end="", file=sys.stderr, flush=True)

    def done(self) -> None:
        if self._enabled:
            print(file=sys.stderr)


def describe_result(result: SubjectResult) -> str:
    """A few human-readable lines for a subject result."""
    lines = [f"subject {result.subject_id or '(no id)'}: {result.status.upper()}"]
    if result.predicted_score is not None:
        p1, p2, p3 = result.probabilities
        lines.append(f"  predicted score {result.predicted_score}   expected score {result.expected_score:.2f}")
        if result.expected_score_interval:
            low, high = result.expected_score_interval
            lines.append(f"  95% interval of the expected score: {low:.2f} – {high:.2f}")
        lines.append(f"  probabilities  1: {p1:.3f}  2: {p2:.3f}  3: {p3:.3f}")
    lines.append(
        f"  frames received {result.frames_received}, analysed {result.frames_analyzed}, skipped {result.frames_skipped}"
    )
    if result.rejected:
        lines.append("  rejected: " + ", ".join(f"{reason} {count}" for reason, count in sorted(result.rejected.items())))
    if changes := result.rejected.get("face_changed", 0):
        lines.append(f"  CAUTION: the followed face changed {changes} time(s): this result may combine more than one person")
    if result.model:
        lines.append(f"  model {result.model.name} {result.model.version} (kind: {result.model.kind})")
        if result.model.kind != "clinical":
            lines.append("  NOT A CLINICAL MODEL: for demonstration and pipeline validation only")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
