"""What this x86 CPU is and computes in hardware, from /proc/cpuinfo (Linux): the arithmetic the
model runs in on the CPU depends on it, and benchmarks name it."""

from __future__ import annotations

import functools


@functools.cache
def _cpuinfo() -> dict[str, str]:
    """Each field of /proc/cpuinfo as the first processor gives it; empty where it cannot be read."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as cpuinfo:
            for line in cpuinfo:
                key, colon, value = line.partition(":")
                if colon:
                    fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


def cpu_flags() -> frozenset[str]:
    """The processor's feature flags (avx2, avx512_vnni, …)."""
    return frozenset(_cpuinfo().get("flags", "").split())


def cpu_model() -> str | None:
    """The processor's model name, as the kernel reports it."""
    return _cpuinfo().get("model name")
