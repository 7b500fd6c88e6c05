"""Build-time check of an image's venv: the demo weights are baked in and torch is the intended build.

Usage (in the Dockerfiles' build stage): python check_weights.py --require 1 --torch cpu|cuda
"""

from __future__ import annotations

import argparse
import importlib.resources
import sys

WEIGHTS = "phantom-demo.safetensors"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--require", default="1", help="1: fail when the demo weights are missing")
    parser.add_argument("--torch", choices=("cpu", "cuda"), default=None, help="the torch build expected")
    args = parser.parse_args()
    weights = importlib.resources.files("acroscreen.server") / "weights" / WEIGHTS
    if weights.is_file():
        print(f"demo weights baked in: {weights}")
    elif args.require == "1":
        print(
            f"server/weights/{WEIGHTS} is not in the installed package: produce it before building, or build"
            " with --build-arg REQUIRE_DEMO_WEIGHTS=0 and run with a mounted file in ACROSCREEN_MODEL",
            file=sys.stderr,
        )
        return 1
    else:
        print("no demo weights: the container needs ACROSCREEN_MODEL (a mounted weights file)")
    if args.torch is not None:
        import torch

        cuda = torch.version.cuda
        if (args.torch == "cuda") != (cuda is not None):
            print(f"torch {torch.__version__} is built for CUDA {cuda}; this image wants {args.torch}", file=sys.stderr)
            return 1
        print(f"torch {torch.__version__} (CUDA {cuda})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
