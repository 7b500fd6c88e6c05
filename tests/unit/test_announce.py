"""Server processes announce their ports on a shared stdout pipe, one line per write."""

from __future__ import annotations

import os
import subprocess
import sys


def test_an_announcement_is_one_write_so_concurrent_workers_cannot_interleave_lines() -> None:
    """`--workers N` processes print their ports at the same moment into one pipe; `print` writes the
    text and the newline apart, which once merged two workers' lines and hung `acroscreen bench`."""
    code = (
        "import os, sys\n"
        "from acroscreen.server import main\n"
        "writes = []\n"
        "real = os.write\n"
        "os.write = lambda fd, data: writes.append(data) or real(fd, data)\n"
        "main._announce('acroscreen serving on 127.0.0.1:1 (metrics :2)')\n"
        "sys.stderr.write(repr(writes))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert run.returncode == 0, run.stderr
    assert run.stdout == "acroscreen serving on 127.0.0.1:1 (metrics :2)\n"
    assert run.stderr == repr([b"acroscreen serving on 127.0.0.1:1 (metrics :2)\n"])
