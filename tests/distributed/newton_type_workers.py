"""The data-parallel Newton-type optimizer runs (TrustRegion, CubicRegularization, NewtonMR), as
module-level functions (spawned processes import them), and the single-process runs they are
compared with (``train`` without torch.distributed, on the concatenated batch)."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from secondorder.distributed import current_world
from secondorder.optim import CubicRegularization, NewtonMR, TrustRegion

from .optim_workers import N, batch, model
from .workers import error_messages

STEPS = 4
OPTIMIZERS = {"TrustRegion": TrustRegion, "CubicRegularization": CubicRegularization, "NewtonMR": NewtonMR}
# Unequal contiguous shards of the N = 16 rows, in rank order (the single process's row order).
SHARDS = {2: [5, 11], 4: [2, 6, 3, 5]}
# The default fraction 0.05 draws |S| = 1 of the 16 rows, so at every step all ranks but one hold
# none of the sample; 0.25 and 0.5 spread it over the ranks; 1 takes the whole batch (closure() on
# every rank). A large radius and small sigmas make first trials fail (rejections, radius and sigma
# updates); on the non-convex MLP NewtonMR meets negative curvature with the exact Hessian.
#
# Each config is well-conditioned enough for a 1e-12 comparison: a single process whose closure
# evaluates the rows in the shards' chunks (rounding like the ranks' sums) stays within 2e-13 of
# the plain one. Not so, and left out: NewtonMR with a Gauss-Newton sample of rank below P and the
# default inexactness (MINRES runs into the sample's null space, where its non-positive-curvature
# test c * gamma >= 0 compares a rounding-level number with 0: chunked rows move the parameters by
# up to 2 after 4 steps), and TrustRegion on the full-batch Gauss-Newton matrix (3e-9).
CONFIGS = [
    ("TrustRegion", dict(radius=20.0, seed=1, curvature="hessian", hessian_fraction=0.05)),
    ("TrustRegion", dict(radius=20.0, seed=1, curvature="hessian", hessian_fraction=1.0)),
    ("TrustRegion", dict(radius=20.0, seed=4, curvature="gauss-newton", hessian_fraction=0.05)),
    ("TrustRegion", dict(radius=20.0, seed=4, curvature="gauss-newton", hessian_fraction=0.5)),
    ("CubicRegularization", dict(sigma=1.0, seed=5, curvature="hessian", hessian_fraction=0.05)),
    ("CubicRegularization", dict(sigma=0.1, seed=2, curvature="hessian", hessian_fraction=1.0)),
    ("CubicRegularization", dict(sigma=1e-3, seed=2, curvature="gauss-newton", hessian_fraction=0.05)),
    ("CubicRegularization", dict(sigma=0.1, seed=2, curvature="gauss-newton", hessian_fraction=1.0)),
    ("NewtonMR", dict(seed=3, curvature="hessian", hessian_fraction=0.05)),
    ("NewtonMR", dict(seed=3, curvature="hessian", hessian_fraction=0.5)),
    ("NewtonMR", dict(seed=3, curvature="gauss-newton", hessian_fraction=0.25, inexactness=0.5)),
    ("NewtonMR", dict(seed=3, curvature="gauss-newton", hessian_fraction=1.0)),
]


def shard_rows(world_size: int, rank: int) -> torch.Tensor:
    """This rank's contiguous rows of the batch (unequal shards, :data:`SHARDS`)."""
    sizes = SHARDS.get(world_size, [N]) if world_size > 1 else [N]
    start = sum(sizes[:rank])
    return torch.arange(start, start + sizes[rank])


def make_closure(net: torch.nn.Module, X: torch.Tensor, y: torch.Tensor, curvature: str, samples: list):
    """The per-sample-loss closure of rows ``X, y``; the Hessian sample positions it is asked for
    are appended to ``samples``."""
    def closure(indices=None):
        if indices is not None:
            samples.append(indices.tolist())
            xs, ys = X[indices], y[indices]
        else:
            xs, ys = X, y
        logits = net(xs)
        losses = F.cross_entropy(logits, ys, reduction="none")
        return (losses, logits) if curvature == "gauss-newton" else losses
    return closure


def train(name: str, options: dict, rows: torch.Tensor, steps: int = STEPS) -> dict:
    """``steps`` steps on rows ``rows`` of the batch: the final parameters, every step's loss,
    ``last_step`` record and Hessian-sample positions (``None``: no ``closure(indices)`` call),
    and the optimizer's state."""
    X, y = batch(torch.float64)
    net = model(torch.float64)
    opt = OPTIMIZERS[name](net.parameters(), **options)
    losses, records, samples = [], [], []
    for _ in range(steps):
        drawn: list = []
        losses.append(float(opt.step(make_closure(net, X[rows], y[rows], opt.curvature, drawn))))
        records.append(dataclasses.asdict(opt.last_step))
        assert len(drawn) <= 1, "one closure(indices) call per step"
        samples.append(drawn[0] if drawn else None)
    return {"params": [p.detach().clone() for p in net.parameters()], "losses": losses, "records": records,
            "samples": samples, "state": opt.state_dict()}


def equivalence(which: list[int] | None = None) -> dict:
    """The configs ``which`` of :data:`CONFIGS` (all by default) on this rank's shard, by index,
    and the rows it holds."""
    world = current_world()
    rows = shard_rows(world.size, world.rank)
    which = range(len(CONFIGS)) if which is None else which
    return {"rows": rows.tolist(), "runs": {i: train(*CONFIGS[i], rows) for i in which}}


def bad_inputs() -> dict:
    """Each disagreement's error on this rank (all raise at the handshake, which every rank
    reaches, so the group stays usable for the next case), whether the failed step left the
    parameters, the counters and the generator as they were, and a final agreeing step."""
    rank = current_world().rank
    X, y = batch(torch.float64)
    rows = shard_rows(2, rank)
    untouched = []

    def step(name="TrustRegion", hidden=6, curvature="hessian", before=None, **options):
        net = model(torch.float64, hidden)
        opt = OPTIMIZERS[name](net.parameters(), curvature=curvature, **options)
        closure = make_closure(net, X[rows], y[rows], curvature, [])
        if before is not None:
            before(opt, closure)
        start = [p.detach().clone() for p in net.parameters()]
        counters, generator = (opt.num_steps, opt.last_step), opt.generator.get_state()
        try:
            opt.step(closure)
        finally:
            untouched.append(all(torch.equal(p, q) for p, q in zip(net.parameters(), start))
                             and (opt.num_steps, opt.last_step) == counters
                             and torch.equal(opt.generator.get_state(), generator))

    def advance(opt, closure):  # rank 1 draws from the optimizer's generator: same seed, other state
        if rank == 1:
            torch.rand(1, generator=opt.generator)

    def reload(opt, closure):  # an agreed step, then rank 1 loads a checkpoint with another radius
        opt.step(closure)
        state = opt.state_dict()
        state["second_order"]["radius"] *= 1 + rank
        opt.load_state_dict(state)

    def step_size(opt, closure):
        opt.curvature_step_size = 1.0 + rank

    cases = [
        lambda: step(seed=rank),
        lambda: step(hessian_fraction=0.05 * (1 + rank)),
        lambda: step(radius=1.0 + rank),
        lambda: step("CubicRegularization", sigma=1.0 + rank),
        lambda: step("NewtonMR", inexactness=0.01 * (1 + rank)),
        lambda: step("NewtonMR", before=step_size),
        lambda: step(curvature=("hessian", "gauss-newton")[rank]),
        lambda: step(("TrustRegion", "NewtonMR")[rank]),
        lambda: step(hidden=6 + rank),
        lambda: step("CubicRegularization", before=advance),
        lambda: step(before=reload),
        lambda: step("NewtonMR", curvature="gauss-newton"),  # the ranks agree: the group is still usable
    ]
    return {"messages": error_messages(cases), "untouched": untouched}


def two_ranks() -> dict:
    """The 2-rank world's work in one launch: :func:`equivalence`, then :func:`bad_inputs`."""
    return {"equivalence": equivalence(), "bad": bad_inputs()}
