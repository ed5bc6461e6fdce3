"""What each process of the data-parallel curvature tests runs (module level, for spawn)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from secondorder import GGNOperator, HessianOperator, diagonal, eigenvalues, solve, spectral_density, trace
from secondorder.analysis import analyze
from secondorder.distributed import current_world

from ..references import tiny_mlp_problem


def shard_batches(world_size: int, dtype: torch.dtype = torch.float64) -> tuple[torch.nn.Module, list[list]]:
    """The tiny MLP and, per rank, its (uneven, ragged) batches of one 48-sample data set."""
    model, batches = tiny_mlp_problem(seed=3, num_samples=48, split=30)
    x = torch.cat([b[0] for b in batches]).to(dtype)
    y = torch.cat([b[1] for b in batches])
    cuts = [round(48 * k / world_size) for k in range(world_size + 1)]
    cuts[1] += 5  # uneven shards
    shards = []
    for r in range(world_size):
        xs, ys = x[cuts[r]:cuts[r + 1]], y[cuts[r]:cuts[r + 1]]
        half = max(1, len(xs) // 3)  # two ragged batches per rank
        shards.append([(xs[:half], ys[:half]), (xs[half:], ys[half:])])
    return model.to(dtype), shards


def everything(op, model, data, distributed: bool) -> dict:
    """Every algorithm of the curvature core, and analyze, on one operator."""
    P = op.shape[0]
    V = torch.randn(P, 3, generator=torch.Generator().manual_seed(7), dtype=op.dtype)
    loss, grad = op.loss_and_gradient()
    out = {
        "HV": op @ V, "quad": op.quadratic_forms(V), "loss": loss, "grad": grad, "n": op.num_samples,
        "trace": trace(op, 30, seed=1).value,
        "block_traces": [b.value for b in trace(op, 30, seed=1).blocks],
        "diag": diagonal(op, 20, seed=2).value,
        "eig": eigenvalues(op, k=2).eigenvalues,
        "density": spectral_density(op, 2, 12, seed=4).weights,
        "solve": solve(op, grad, damping=1.0, tol=1e-10).solution,
    }
    if isinstance(op, HessianOperator):
        report = analyze(model, F.cross_entropy, data, top_k=2, bottom_k=1, trace_matvecs=24, slq_probes=2,
                         slq_steps=10, landscape_points=5, landscape_grid=3, distributed=distributed)
        out["analysis"] = report.to_dict()
    return out


def on_my_shard(curvature: str, dtype_name: str) -> dict:
    dtype = getattr(torch, dtype_name)
    world = current_world()
    model, shards = shard_batches(world.size, dtype)
    make = HessianOperator if curvature == "hessian" else GGNOperator
    data = shards[world.rank]
    op = make(model, F.cross_entropy, data, distributed=True)
    return everything(op, model, data, True)


def mismatched_parameters() -> None:
    model, shards = shard_batches(2)
    params = None if current_world().rank == 0 else ["0"]
    HessianOperator(model, F.cross_entropy, shards[current_world().rank], params, distributed=True)


def per_rank_seeds() -> None:
    model, shards = shard_batches(2)
    op = HessianOperator(model, F.cross_entropy, shards[current_world().rank], distributed=True)
    trace(op, 10, seed=current_world().rank)  # a user error: each rank draws other probes
