"""Screen phantom clips of every holdout identity through a running server and report them as subjects.

The model card's per-clip figure (the #4 target: ≥ 95 % of phantom clips of ≥ 10 frames
graded right through the running server) comes from this command. Clips are made from
the first photograph of each holdout identity at levels 1-3 (`phantom.holdout_clips`,
byte-reproducible), written to a temporary folder and screened with every frame analysed.
Each clip is one row of the predictions CSV (subject = identity and level), which
`acroscreen evaluate --predictions` reads; clips the server could not score
(insufficient evidence) are counted apart.

    .venv/bin/python scripts/holdout_clips.py --out /tmp/clips.csv            # starts a server
    .venv/bin/python scripts/holdout_clips.py --server 127.0.0.1:50051        # or uses one
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from acroscreen.client import ScreeningClient, ScreenOptions
from acroscreen.client.sources import video_frames
from acroscreen.server.training.evaluate import (
    Predictions,
    evaluate_predictions,
    format_report,
    write_predictions_csv,
)
from acroscreen.server.training.phantom import holdout_clips, subject_id

SHARED_FACES = Path(__file__).resolve().parents[2] / "shared" / "data" / "faces"


@contextlib.contextmanager
def _target(server: str | None) -> Iterator[str]:
    """The given server, or one started in this process with the default (shipped) weights."""
    if server is not None:
        yield server
        return
    from acroscreen.server.config import Settings
    from acroscreen.server.main import start

    running = start(Settings(port=0, metrics_port=-1))
    try:
        yield f"127.0.0.1:{running.port}"
    finally:
        running.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--faces", type=Path, default=SHARED_FACES, help="the data pack's faces/ folder")
    parser.add_argument("--server", help="HOST:PORT of a running server (default: start one)")
    parser.add_argument("--people", type=int, help="only the first N holdout identities (default: all)")
    parser.add_argument("--photos", type=int, default=1,
                        help="clips from the first N photographs of each identity (0: all; default 1, the fixed set)")
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--out", type=Path, help="also write the clips as a predictions CSV")
    args = parser.parse_args()

    rows: list[tuple[int, int, str, tuple[float, float, float]]] = []
    unscored: list[str] = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as folder, _target(args.server) as target, \
            ScreeningClient(target, timeout_s=600) as client:
        for name, clip in holdout_clips(
            args.faces, Path(folder), people=args.people, photos=args.photos or None, frames=args.frames,
        ):
            subject = subject_id(name, clip.level)
            result = client.screen(video_frames(clip.path), ScreenOptions(subject_id=subject, analyze_every_frame=True))
            if result.predicted_score is None:
                unscored.append(subject)
            else:
                rows.append((clip.level, result.predicted_score, subject, result.probabilities))
            clip.path.unlink()
    print(f"{len(rows) + len(unscored)} clips in {time.monotonic() - started:.0f} s; "
          f"{len(unscored)} without a score: {', '.join(unscored) or '-'}", file=sys.stderr)
    predictions = Predictions(
        actual=np.array([r[0] for r in rows]), predicted=np.array([r[1] for r in rows]),
        subjects=np.array([r[2] for r in rows]), probabilities=np.array([r[3] for r in rows]).reshape(-1, 3),
    )
    if args.out is not None:
        write_predictions_csv(predictions, args.out)
    # A clip is its own subject: one block "per clip" says it all.
    per_clip = dataclasses.replace(predictions, subjects=None)
    print(format_report(evaluate_predictions(per_clip, f"{len(rows)} scored holdout phantom clips"), row="clip"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
