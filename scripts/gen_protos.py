"""Regenerate the Python code for protos/ — the one way generated code is made.

Usage: python scripts/gen_protos.py [--check]

The generated modules are committed beside the .proto files (package
`acroscreen.v1`); `--check` (and tests/unit/test_generated_code.py) fails
when they differ from what the pinned grpcio-tools makes of the .proto files,
so they cannot go stale silently.
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent.parent / "protos"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def generate(out_dir: Path) -> list[Path]:
    """Run protoc on every .proto under protos/, writing into out_dir."""
    from grpc_tools import protoc

    protos = sorted(PROTO_ROOT.rglob("*.proto"))
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *[str(p) for p in protos],
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed")
    return sorted(p for p in out_dir.rglob("*") if p.name.endswith(GENERATED_SUFFIXES))


def stale_files() -> list[str]:
    """Generated files that differ from, are missing from, or are extra in protos/."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = {p.relative_to(tmp) for p in generate(Path(tmp))}
        committed = {
            p.relative_to(PROTO_ROOT)
            for p in PROTO_ROOT.rglob("*")
            if p.name.endswith(GENERATED_SUFFIXES)
        }
        stale = [str(p) for p in sorted(fresh ^ committed)]
        for rel in sorted(fresh & committed):
            if not filecmp.cmp(Path(tmp) / rel, PROTO_ROOT / rel, shallow=False):
                stale.append(str(rel))
        return stale


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if generated code is stale")
    args = parser.parse_args()
    if args.check:
        stale = stale_files()
        if stale:
            print("stale generated code, run scripts/gen_protos.py:", *stale, sep="\n  ")
            return 1
        print("generated code is current")
        return 0
    for path in generate(PROTO_ROOT):
        print("wrote", path.relative_to(PROTO_ROOT.parent))
    return 0


if __name__ == "__main__":
    sys.exit(main())
