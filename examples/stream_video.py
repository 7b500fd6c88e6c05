"""Stream a recorded video to the server and print the subject result.

    python examples/stream_video.py call.mp4 --server 127.0.0.1:50051 --subject-id S-17

Recorded videos use analyze_every_frame=True: the server never skips a frame, and gRPC flow
control slows the sender while analysis catches up.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

from acroscreen.client import FrameResult, ScreeningClient, ScreenOptions, SubjectResult
from acroscreen.client.sources import video_frames


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("video", type=Path)
    parser.add_argument("--server", default="127.0.0.1:50051")
    parser.add_argument("--subject-id", default="")
    args = parser.parse_args()

    statuses: Counter[str] = Counter()

    def on_event(event: FrameResult | SubjectResult) -> None:
        if isinstance(event, FrameResult):
            statuses[event.status] += 1
        elif event.status == "provisional":
            print(f"  provisional: expected score {event.expected_score:.2f} after {event.frames_analyzed} frames")

    with ScreeningClient(args.server, timeout_s=600) as client:
        client.wait_until_serving(30)
        options = ScreenOptions(subject_id=args.subject_id, analyze_every_frame=True)
        result = client.screen(video_frames(args.video), options, on_event=on_event)

    print(f"frames: {dict(statuses)}")
    print(f"subject {result.subject_id or '(no id)'}: {result.status}, predicted score {result.predicted_score}")
    print(f"probabilities {tuple(round(p, 3) for p in result.probabilities)}, model {result.model}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
