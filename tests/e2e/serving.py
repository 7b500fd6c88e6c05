"""Server subprocesses started through the installed `acroscreen` command."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ACROSCREEN = shutil.which("acroscreen", path=str(Path(sys.executable).parent)) or "acroscreen"


def start_serve(*flags: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> tuple[subprocess.Popen, int, int]:
    """`acroscreen serve --port 0 …`; returns the process and the gRPC and metrics ports it printed."""
    process = subprocess.Popen(
        [ACROSCREEN, "serve", "--port", "0", *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        cwd=cwd,
    )
    assert process.stdout is not None
    for line in process.stdout:
        match = re.search(r"serving on [\d.]+:(\d+) \(metrics :(-?\d+)\)", line)
        if match:
            return process, int(match.group(1)), int(match.group(2))
    raise AssertionError("the server did not report its ports")
