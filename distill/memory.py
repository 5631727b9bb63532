"""Process memory for the perf commands: current and peak resident set size, in MiB.

The peak comes from the kernel's VmHWM, which `reset_peak_rss()` can reset (Linux >= 4.0) so that a
measurement covers only what follows; elsewhere it falls back to `ru_maxrss`, a high-water mark over
the whole process that never goes down.
"""
from __future__ import annotations

import resource
import sys


def status_mib(field: str) -> float | None:
    """A `/proc/self/status` field such as VmRSS or VmHWM in MiB; None off Linux."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024   # kB
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark so the peak covers only what follows; False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mib() -> float:
    """The peak RSS since the last reset (VmHWM), else since the process started (ru_maxrss)."""
    hwm = status_mib("VmHWM")
    if hwm is not None:
        return hwm
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024   # bytes on macOS, KiB on Linux
