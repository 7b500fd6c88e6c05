"""Stream a webcam live, as a telemedicine call would, printing provisional results as they come.

    python examples/stream_webcam.py 0 --seconds 20 --server 127.0.0.1:50051

Live streams leave analyze_every_frame off: frames that arrive while the server is behind are
acknowledged as SKIPPED rather than delaying the call. min_analysis_interval_ms spreads the
analysed frames over the call (here at most 5 per second).
"""

from __future__ import annotations

import argparse
import itertools
import sys

from acroscreen.client import FrameResult, ScreeningClient, ScreenOptions, SubjectResult
from acroscreen.client.sources import webcam_frames


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("device", type=int, nargs="?", default=0, help="webcam index")
    parser.add_argument("--server", default="127.0.0.1:50051")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--fps", type=float, default=30.0, help="the camera's frame rate, to bound the frame count")
    args = parser.parse_args()

    # Open the camera before the call: a missing or busy camera is then a plain error here, not a
    # stream cancelled from inside gRPC's request thread.
    frames = webcam_frames(args.device, max_frames=int(args.seconds * args.fps))
    try:
        first = next(frames)
    except OSError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except StopIteration:
        print(f"error: webcam {args.device} gave no frame", file=sys.stderr)
        return 1
    frames = itertools.chain([first], frames)
    options = ScreenOptions(min_analysis_interval_ms=200, update_every_frames=10)

    with ScreeningClient(args.server) as client:
        client.wait_until_serving(30)
        for event in client.screen_stream(frames, options):
            if isinstance(event, FrameResult) and event.status == "rejected":
                print(f"frame {event.index}: {event.reject_reason} ({event.detail})")
            elif isinstance(event, SubjectResult):
                score = f"{event.expected_score:.2f}" if event.expected_score is not None else "-"
                print(f"{event.status}: expected score {score}, {event.frames_analyzed} analysed / {event.frames_received} received")
    return 0


if __name__ == "__main__":
    sys.exit(main())
