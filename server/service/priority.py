"""Thread niceness: analysis yields the CPU to the threads that acknowledge frames.

On a saturated CPU the reader and response threads must still run within
milliseconds, or frames are acknowledged late; compute threads (per-stream
analysis, the model batcher) therefore run at a lower OS priority. Linux
schedules threads individually, so this works per thread; elsewhere it is a no-op.
"""

from __future__ import annotations

import os
import threading

COMPUTE_NICENESS = 10


def lower_current_thread_priority(niceness: int = COMPUTE_NICENESS) -> None:
    if not hasattr(os, "setpriority"):
        return
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), niceness)
    except OSError:  # not permitted here: keep the default priority
        pass
