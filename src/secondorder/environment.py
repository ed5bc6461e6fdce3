"""Where a result was computed: the CPU model and the software, for reports and benchmarks."""

from __future__ import annotations

import platform

import torch


def cpu_model() -> str:
    """The CPU's model name (from ``/proc/cpuinfo`` where there is one)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def describe(device: str | torch.device | None = None) -> str:
    """One line: CPU model, logical CPUs, torch version, torch threads, Python version.

    With a CUDA ``device``, the GPU's name and the CUDA version lead the line.
    """
    import os

    line = (
        f"{cpu_model()} ({os.cpu_count()} logical CPUs), torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, Python {platform.python_version()}"
    )
    if device is not None and torch.device(device).type == "cuda":
        line = f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda}), host " + line
    return line
