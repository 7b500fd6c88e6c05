"""`acroscreen demo`: start a server, screen phantom clips of the three severity levels
made from the shipped public-domain NASA portrait, and print the subject results."""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from pathlib import Path

import cv2
import numpy as np
from acroscreen.client import ScreeningClient, ScreenOptions
from acroscreen.client.cli import describe_result
from acroscreen.client.sources import video_frames

from ..config import Settings
from ..main import start
from ..training.phantom import make_phantom_video

PORTRAIT = Path(__file__).resolve().parent / "eileen_collins_nasa.jpg"
SEED = 20240611


def run_demo(args: argparse.Namespace) -> int:
    settings = Settings.load(namespace=args)
    settings = dataclasses.replace(settings, host="127.0.0.1", port=0, metrics_port=0)
    portrait = cv2.imread(str(PORTRAIT))
    print(f"starting a server ({settings.device})…", flush=True)
    running = start(settings)
    try:
        with tempfile.TemporaryDirectory(prefix="acroscreen-demo-") as tmp, ScreeningClient(
            f"127.0.0.1:{running.port}", timeout_s=600
        ) as client:
            info = client.model_info()
            print(f"model {info.model.name} {info.model.version} (kind: {info.model.kind})\n", flush=True)
            rng = np.random.default_rng(SEED)
            for level in (1, 2, 3):
                clip = make_phantom_video(portrait, level, Path(tmp) / f"level{level}.mp4", rng, frames=args.frames)
                result = client.screen(
                    video_frames(clip.path),
                    ScreenOptions(subject_id=f"demo-phantom-level-{level}", analyze_every_frame=True),
                )
                print(f"phantom clip, true level {level}, {clip.frames} frames:")
                print(describe_result(result) + "\n", flush=True)
    finally:
        running.stop(grace_s=1.0)
    return 0
