"""What the benchmarks print about the machine, and how much of it other processes took."""

from __future__ import annotations

import math
import os
import time

import torch


def busy_seconds() -> tuple[float, float]:
    """(CPU seconds the whole machine has been busy, CPU seconds this process and its children used)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        busy = (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # all but idle, iowait
    except (OSError, ValueError, IndexError):
        busy = math.nan
    t = os.times()
    return busy, t.user + t.system + t.children_user + t.children_system


class Contention:
    """CPU time that *other* processes took while a section ran (they skew the timings)."""

    def __init__(self):
        self.start, self.t0 = busy_seconds(), time.perf_counter()

    def share(self) -> tuple[float, float, float]:
        """(their CPU seconds, wall seconds, their share of the machine)."""
        busy, ours = busy_seconds()
        other = max(0.0, (busy - self.start[0]) - (ours - self.start[1]))
        wall = time.perf_counter() - self.t0
        return other, wall, other / (wall * (os.cpu_count() or 1)) if wall > 0 else 0.0


def prepare() -> int:
    """Set up a benchmark process; returns the thread count.

    Threads from ``BENCH_THREADS`` (default 2, the cores of the reference machine); ``src/`` on
    ``sys.path`` when secondorder is not installed; the anchors' ``backward(create_graph=True)``
    reference-cycle warning silenced (known and harmless in a benchmark).
    """
    import importlib.util
    import sys
    import warnings
    from pathlib import Path

    if importlib.util.find_spec("secondorder") is None:  # running from a checkout without installing
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    threads = int(os.environ.get("BENCH_THREADS", "2"))
    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore", message=".*create_graph=True.*")
    return threads
