"""Module-level functions the launcher runs in child processes (spawn needs importable code)."""

from __future__ import annotations

import os
import time

import torch

from secondorder.distributed import (
    DisagreementError,
    DistributedError,
    agree,
    all_gather_objects,
    all_reduce,
    current_world,
)


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
    all_reduce(torch.zeros(1), what="warm-up")  # every rank has joined the mesh: rank 0 is not still connecting
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


def objects_of_every_size() -> list:
    """Each rank's object (pickles of different lengths, one of them long), gathered."""
    rank = current_world().rank
    return all_gather_objects({"rank": rank, "text": "x" * (rank * 1000)}, what="objects")


def facts_only_some_ranks_have() -> tuple[str, bool, str]:
    """Rank 1 passes a fact the others do not: every rank raises, rank 0 too."""
    facts = {"d": 3} if current_world().rank != 1 else {"d": 3, "extra": 1}
    try:
        agree(facts, what="handshake", advice="pass the same facts")
    except DisagreementError as err:
        return type(err).__name__, isinstance(err, DistributedError) and isinstance(err, ValueError), str(err)
    return "no error", False, ""


def collective_after_a_failed_one(timeout: float) -> dict:
    """Rank 1 sleeps three timeouts; rank 0's collective fails within the timeout, and its next
    one at once (the group is unusable), without waiting for rank 1 again."""
    rank = current_world().rank
    if rank == 1:
        time.sleep(3 * timeout)
    out: dict = {}
    for name in ("first", "second"):
        start = time.monotonic()
        try:
            all_reduce(torch.zeros(1), what=f"{name} sum")
            out[name] = ("no error", time.monotonic() - start)
        except DistributedError as err:
            out[name] = (str(err), time.monotonic() - start)
    return out
