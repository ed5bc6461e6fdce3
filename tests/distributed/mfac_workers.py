"""The data-parallel MFAC runs, as module-level functions (spawned processes import them), and the
single-process runs they are compared with (``train`` without torch.distributed, on the
concatenated batch)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from secondorder.distributed import current_world
from secondorder.optim import MFAC

from .newton_type_workers import SHARDS, shard_rows
from .optim_workers import batch, counting_all_reduces, model, rank_shards
from .workers import error_messages

STEPS = 6
# Windows of 3 and 4 over 6 steps (the ring wraps); momentum, weight decay and blocks of 20 of the
# 57 coordinates in the second; the third returns bare losses from two equal micro-batches per
# rank (equal weights). Damping 1e-3: the direction is a difference of nearly equal vectors over
# lambda, and 1e-3 keeps the ranks' rounding of the summed gradient (1e-16) below 1e-12 there.
CONFIGS: list[dict[str, Any]] = [
    dict(options=dict(lr=0.02, damping=1e-3, window=3), outputs=True),
    dict(options=dict(lr=0.02, damping=1e-3, window=4, momentum=0.5, weight_decay=1e-2, block_size=20), outputs=True),
    dict(options=dict(lr=0.02, damping=1e-3, window=3, momentum=0.3), outputs=False),
]
RUNS = list(range(len(CONFIGS)))


def closure(net: torch.nn.Module, X: torch.Tensor, y: torch.Tensor, outputs: bool):
    def loss():
        logits = net(X)
        value = F.cross_entropy(logits, y)
        return (value, logits) if outputs else value
    return loss


def train(config: int, shards: list[torch.Tensor], **options) -> dict:
    """``STEPS`` steps, one closure per micro-batch of rows ``shards``: the final parameters, the
    losses and the optimizer's state (its window included)."""
    X, y = batch(torch.float64)
    net = model(torch.float64)
    setup = CONFIGS[config]
    opt = MFAC(net.parameters(), **{**setup["options"], **options})
    losses = []
    for _ in range(STEPS):
        losses.append(float(opt.step([closure(net, X[rows], y[rows], setup["outputs"]) for rows in shards])))
    return {"params": [p.detach().clone() for p in net.parameters()], "losses": losses, "state": opt.state_dict()}


def rank_rows(config: int, size: int, rank: int) -> list[torch.Tensor]:
    """This rank's micro-batches: an unequal contiguous shard (counted closures) or two equal ones (bare losses)."""
    if CONFIGS[config]["outputs"]:
        return [shard_rows(size, rank)]
    return rank_shards(size, rank, 2)


def equivalence() -> dict:
    """Every run of :data:`RUNS` on this rank's shard, and the all-reduces each made."""
    world = current_world()
    assert len(shard_rows(world.size, world.rank)) == SHARDS[world.size][world.rank]
    out: dict = {"runs": {}, "all_reduces": {}}
    for run in RUNS:
        counter = [0]
        with counting_all_reduces(counter):
            out["runs"][run] = train(run, rank_rows(run, world.size, world.rank))
        out["all_reduces"][run] = counter[0]
    return out


def bad_inputs() -> dict:
    """Each disagreement's error on this rank (all raise at the handshake, which every rank
    reaches), whether the refused step left parameters, counters and window as they were, and a
    final agreeing step."""
    rank = current_world().rank
    X, y = batch(torch.float64)
    rows = shard_rows(2, rank)
    untouched = []

    def step(before=None, **options):
        net = model(torch.float64)
        opt = MFAC(net.parameters(), **{**CONFIGS[0]["options"], **options})
        if before is not None:
            before(opt, net)
        start = [p.detach().clone() for p in net.parameters()]
        counters, gram = opt.num_steps, opt.operator.gram.clone()
        try:
            opt.step(closure(net, X[rows], y[rows], True))
        finally:
            untouched.append(all(torch.equal(p, q) for p, q in zip(net.parameters(), start))
                             and opt.num_steps == counters and torch.equal(opt.operator.gram, gram))

    def local_step(opt, net):  # rank 1 steps alone first
        if rank == 1:
            opt.distributed = False
            opt.step(closure(net, X[rows], y[rows], True))
            opt.distributed = "auto"

    def own_windows(opt, net):  # both step on their own shard only: same counters, other windows
        opt.distributed = False
        opt.step(closure(net, X[rows], y[rows], True))
        opt.distributed = "auto"

    cases = [
        lambda: step(window=3 + rank),
        lambda: step(damping=1e-3 * (1 + rank)),
        lambda: step(block_size=None if rank == 0 else 20),
        lambda: step(lr=0.02 * (1 + rank)),
        lambda: step(before=local_step),
        lambda: step(before=own_windows),
        lambda: step(),  # the ranks agree: the group is still usable
    ]
    return {"messages": error_messages(cases), "untouched": untouched}


def two_ranks() -> dict:
    """The 2-rank world's work in one launch: :func:`equivalence`, then :func:`bad_inputs`."""
    return {"equivalence": equivalence(), "bad": bad_inputs()}

