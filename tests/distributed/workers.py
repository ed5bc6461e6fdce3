"""Module-level functions the launcher runs in child processes (spawn needs importable code)."""

from __future__ import annotations

import os
import time

import torch

from secondorder.distributed import all_reduce, current_world


def rank_sum() -> tuple[int, int, float]:
    world = current_world()
    t = torch.tensor([float(world.rank + 1)], dtype=torch.float64)
    all_reduce(t, what="rank sum")
    return world.rank, world.size, float(t)


def one_rank_raises() -> None:
    if current_world().rank == 1:
        raise ValueError("shard 1 is empty")
    all_reduce(torch.zeros(1), what="after the bad shard")


def one_rank_dies() -> None:
    if current_world().rank == 1:
        os._exit(3)
    all_reduce(torch.zeros(1), what="gradient")


def one_rank_hangs() -> None:
    if current_world().rank == 1:
        time.sleep(600)
    all_reduce(torch.zeros(1), what="gradient")


def torchrun_example(epochs: int) -> dict:
    """The torchrun example's main(), on a group the launcher started."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "examples" / "torchrun_train.py"
    spec = importlib.util.spec_from_file_location("torchrun_train", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(epochs=epochs, batch_per_rank=256)


def error_messages(cases) -> list[str]:
    """Run each callable; collect its ValueError's message (or "no error"). The cases fail before
    or at a collective that every rank reaches, so the group stays usable for the next one."""
    messages = []
    for case in cases:
        try:
            case()
            messages.append("no error")
        except ValueError as err:
            messages.append(str(err))
    return messages
