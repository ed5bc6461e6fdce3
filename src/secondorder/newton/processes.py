r"""Distributed Newton on real processes: one machine per ``torch.distributed`` rank.

Rank k holds its data shard only (a :class:`~secondorder.newton.problems.GLMProblem` on its
rows) and runs machine k of :class:`~secondorder.newton.simulator.SimulatedCluster` with shards:
the same sketches from the same generator ``(seed, k)``, hence the same iterates. Per iteration
(:func:`~secondorder.newton.engine.run_newton`):

* the gradient: one all-reduce of :math:`\sum_{j \in \text{shard}} \ell'_j x_j` (d floats);
* :math:`d_\lambda`: an all-reduce of the shards' Gram matrices (d² floats, ``"exact"``) or of
  the shards' own :math:`d_\lambda` (1 float, ``"estimated"``);
* determinantal averaging: a MAX all-reduce of the log-determinants (1 float);
* the combined direction: one all-reduce of :math:`[a_k\hat p_k, a_k e_k]` (d + q floats, which
  also gives every rank all machines' weights);
* the line search: one all-reduce of the loss sums at w and all trial steps (61 floats).

Launch with ``torchrun`` (each process calls
:func:`secondorder.distributed.init_from_env` with ``"gloo"``: the problems are float64 CPU
tensors, which nccl cannot reduce) or :func:`secondorder.distributed.launch`.
Bad input (m <= d, an empty shard, labels outside the loss's domain, non-finite features, a
number of shards that is not the world size) raises on the rank that has it before any
communication; ranks that disagree on the dimension, λ, the loss, the configuration or the seed
(and on ``agree_on``: e.g. the run's iterations and line search) all raise
:class:`~secondorder.distributed.DisagreementError` at the first collective, a handshake;
:func:`~secondorder.newton.engine.run_newton` checks its own options in a second one. A rank that
dies, hangs or is stopped makes the others raise :class:`~secondorder.distributed.DistributedError`
within the group's timeout: every collective here goes through the reducer, bounded by it.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from secondorder.distributed.reducer import reducer_for
from secondorder.newton.combine import combined_direction, machine_weights
from secondorder.newton.engine import DistributedStep
from secondorder.newton.problems import DTYPE, GLMProblem, effective_dimension, gram_effective_dimension
from secondorder.newton.simulator import SketchConfig, check_shards, machine_generator


class ProcessCluster:
    """This rank's machine of a q-process run; implements :class:`~secondorder.newton.engine.Cluster`.

    ``shard`` is the rank's own problem (its rows, the global λ). All ranks must pass the same
    ``config``, ``seed`` and ``agree_on``: further facts the first handshake checks, such as the
    options of the run that follows (``{"iterations": 10, "line search": True}``), so that ranks
    given different ones fail before any work.
    """

    def __init__(self, shard: GLMProblem, *, config: SketchConfig, seed: int = 0,
                 agree_on: Mapping[str, Any] | None = None) -> None:
        config.check(shard.dim)
        self.reducer = reducer_for("auto")
        self.rank, self.machines = self.reducer.rank, self.reducer.size
        self.shard, self.config = shard, config
        self.dim, self.lam = shard.dim, shard.lam
        self.generator = machine_generator(seed, self.rank)
        self.agree({"d": shard.dim, "lam": shard.lam, "loss": type(shard).__name__, "config": asdict(config),
                    "seed": int(seed), **dict(agree_on or {})}, what="handshake")
        self.num_samples = sum(c[0] for c in self.reducer.counts(shard.num_samples, device=torch.device("cpu"),
                                                                  what="number of samples"))

    @classmethod
    def from_shards(cls, problem: GLMProblem, shards: Sequence[Tensor], *, config: SketchConfig,
                    seed: int = 0, agree_on: Mapping[str, Any] | None = None) -> "ProcessCluster":
        """Rank k takes rows ``shards[k]`` of ``problem`` (every rank passes the same partition);
        checks that there is one shard per rank before communicating.
        """
        reducer = reducer_for("auto")
        if len(shards) != reducer.size:
            raise ValueError(
                f"{len(shards)} data shards for a world of {reducer.size} processes; give one shard "
                "per rank (or launch as many processes as shards)"
            )
        parts = check_shards(shards, problem.num_samples)
        return cls(problem.subset(parts[reducer.rank]), config=config, seed=seed, agree_on=agree_on)

    def agree(self, facts: dict[str, Any], *, what: str) -> None:
        """:class:`~secondorder.distributed.DisagreementError` on every rank unless all passed equal ``facts``."""
        self.reducer.agree(facts, what=what, advice="every rank must run the same problem, configuration and "
                                                    "options (the same command line)")

    def _sum(self, tensor: Tensor, *, what: str) -> Tensor:
        return self.reducer.sum([tensor], what=what)[0]

    def gradient(self, w: Tensor) -> Tensor:
        total = self._sum(self.shard.gradient_sum(w), what="gradient")
        return self.shard.objective_gradient(total, w, self.num_samples)

    def losses(self, points: Tensor) -> Tensor:
        sums = self._sum(self.shard.loss_sums(points), what="line-search losses")
        return self.shard.objective(sums, points, self.num_samples)

    def _gram(self, factor: Tensor) -> Tensor:
        r"""The global :math:`A^\top A` from this shard's factor (normalized by its own n_k)."""
        local = factor.T @ factor * (self.shard.num_samples / self.num_samples)
        return self._sum(local, what="Gram matrix")

    def hessian(self, w: Tensor) -> Tensor:
        return self._gram(self.shard.hessian_factor(w)) + self.lam * torch.eye(self.dim, dtype=DTYPE)

    def direction(self, w: Tensor, gradient: Tensor) -> DistributedStep:
        factor = self.shard.hessian_factor(w)
        if self.config.effective_dim == "exact":
            d_lam = gram_effective_dimension(self._gram(factor), self.lam)
        else:
            mine = torch.tensor([effective_dimension(factor, self.lam)], dtype=DTYPE)
            d_lam = float(self._sum(mine, what="effective dimension")) / self.machines
        solves, reg = self.config.local_solves([factor], self.lam, d_lam, [self.generator], gradient)
        top = solves.logdets
        if self.config.averaging == "determinantal":
            top = self.reducer.maximum(top, what="log-determinant maximum")
        a = machine_weights(self.config.averaging, solves.logdets, float(top))
        payload = torch.zeros(self.dim + self.machines, dtype=DTYPE)
        payload[: self.dim] = a @ solves.directions
        payload[self.dim + self.rank] = a[0]
        payload = self._sum(payload, what="combined direction")
        combined = combined_direction(payload[: self.dim], payload[self.dim:], reg.step_scale)
        return DistributedStep(combined, d_lam, reg.local_lam)
