"""Server subprocesses started through the installed `acroscreen` command."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

ACROSCREEN = shutil.which("acroscreen", path=str(Path(sys.executable).parent)) or "acroscreen"


@contextlib.contextmanager
def serving(
    *flags: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> Iterator[tuple[subprocess.Popen, int, int]]:
    """`acroscreen serve --port 0 …`: the process and the gRPC and metrics ports it printed.

    The process is killed on the way out if a test left it running, so a failing test
    cannot leak a server into the tests after it.
    """
    process = subprocess.Popen(
        [ACROSCREEN, "serve", "--port", "0", *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        cwd=cwd,
    )
    assert process.stdout is not None
    try:
        yield process, *_ports(process)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stdout.close()


def _ports(process: subprocess.Popen) -> tuple[int, int]:
    for line in process.stdout:
        match = re.search(r"serving on \S+:(\d+) \(metrics :(-?\d+)\)", line)
        if match:
            return int(match.group(1)), int(match.group(2))
    raise AssertionError("the server did not report its ports")
