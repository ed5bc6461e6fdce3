"""What each process of the real-process tests runs (module level, so spawn can import it)."""

from __future__ import annotations

import os
import time

import torch

from secondorder.distributed import current_world
from secondorder.newton import LogisticRegression, ProcessCluster, SketchConfig, run_newton

from ..distributed.workers import error_messages
from .helpers import logistic_problem, ridge_problem


def make_problem(kind: str, n: int, d: int, seed: int):
    return (logistic_problem if kind == "logistic" else ridge_problem)(n=n, d=d, lam=0.01, seed=seed)


def shards_of(n: int, parts: int, seed: int) -> list[torch.Tensor]:
    """A seeded random partition of range(n) into ``parts`` uneven shards."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    cuts = torch.linspace(0, n, parts + 1).round().long().tolist()
    cuts[1] += 3  # uneven on purpose
    return [perm[cuts[i]:cuts[i + 1]] for i in range(parts)]


def run_configs(runs: list[dict]) -> list[dict]:
    """For each run: build the problem, take this rank's shard, iterate; return iterates and d_lambda."""
    out = []
    for r in runs:
        problem = make_problem(r["kind"], r["n"], r["d"], r["seed"])
        shards = shards_of(r["n"], current_world().size, r["seed"])
        cluster = ProcessCluster.from_shards(problem, shards, config=SketchConfig(**r["config"]), seed=r["seed"])
        result = run_newton(cluster, iterations=r["iterations"], line_search=r["line_search"], w0=r.get("w0"))
        out.append({"iterates": result.iterates, "dims": result.effective_dims,
                    "ess": result.effective_sample_sizes, "w_star": result.w_star})
    return out


def bad_inputs() -> list[str]:
    """Each bad input's error on this rank; all raise before (or, for disagreeing ranks, at) the
    handshake, which leaves the group usable for the next case."""
    problem = make_problem("logistic", 40, 3, 0)
    rank = current_world().rank
    cases = [
        lambda: ProcessCluster.from_shards(problem, shards_of(40, 3, 0), config=SketchConfig(9)),
        lambda: ProcessCluster.from_shards(problem, [torch.arange(40), torch.zeros(0, dtype=torch.long)],
                                           config=SketchConfig(9)),
        lambda: ProcessCluster.from_shards(problem, shards_of(40, 2, 0), config=SketchConfig(3)),
        lambda: ProcessCluster(problem, config=SketchConfig(9 if rank == 0 else 12)),
    ]
    return error_messages(cases)


def own_shard_with_bad_labels() -> None:
    rank = current_world().rank
    x = torch.randn(20, 3, dtype=torch.float64)
    y = torch.ones(20, dtype=torch.float64)
    if rank == 1:
        y[4] = 0.0  # {0, 1} labels on one rank
    ProcessCluster(LogisticRegression(x, y, 0.01), config=SketchConfig(9))


def rank_dies_mid_run() -> None:
    problem = make_problem("logistic", 60, 3, 0)
    cluster = ProcessCluster.from_shards(problem, shards_of(60, current_world().size, 0),
                                         config=SketchConfig(9), seed=0)

    def die_at_second(record):
        if record.iteration == 2 and current_world().rank == 1:
            os._exit(5)

    run_newton(cluster, iterations=5, w_star=torch.ones(3, dtype=torch.float64), callback=die_at_second)


def rank_hangs_mid_run() -> None:
    problem = make_problem("logistic", 60, 3, 0)
    cluster = ProcessCluster.from_shards(problem, shards_of(60, current_world().size, 0),
                                         config=SketchConfig(9), seed=0)

    def hang(record):
        if current_world().rank == 1:
            time.sleep(600)

    run_newton(cluster, iterations=5, w_star=torch.ones(3, dtype=torch.float64), callback=hang)


def disagreeing_run_options() -> list[str]:
    """Each run option one rank sets differently: every rank raises at the same handshake, which
    leaves the group usable for the next case."""
    problem = make_problem("logistic", 60, 3, 0)
    rank = current_world().rank
    shards = shards_of(60, current_world().size, 0)
    cluster = ProcessCluster.from_shards(problem, shards, config=SketchConfig(9), seed=0)
    w_star = torch.ones(3, dtype=torch.float64)
    cases = [
        lambda: run_newton(cluster, iterations=2 + rank, w_star=w_star),
        lambda: run_newton(cluster, iterations=2, line_search=rank == 0, w_star=w_star),
        lambda: run_newton(cluster, iterations=2, w0=torch.full((3,), float(rank), dtype=torch.float64),
                           w_star=w_star),
        lambda: run_newton(cluster, iterations=2, w_star=None if rank == 0 else w_star),
        lambda: ProcessCluster.from_shards(problem, shards, config=SketchConfig(9), seed=0,
                                           agree_on={"iterations": 1 + rank}),
    ]
    return error_messages(cases)
