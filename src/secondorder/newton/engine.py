r"""The distributed Newton loop, shared by both engines.

An engine (a :class:`Cluster`) is q machines holding the data between them. It answers the
global quantities (gradient, losses, Hessian: sums over machines, one all-reduce each in a real
run) and the combined sketched Newton direction at w. :func:`run_newton` drives any engine:

1. :math:`g_t = \nabla L(w_t)`;
2. :math:`\bar p_t` = the cluster's combined direction at :math:`(w_t, g_t)`;
3. :math:`\eta_t` by Armijo backtracking on the global loss (all trial points in one batched
   evaluation, hence one all-reduce), or :math:`\eta_t = 1`;
4. :math:`w_{t+1} = w_t - \eta_t\bar p_t` (the same on every rank: no broadcast).

The engines are :class:`~secondorder.newton.simulator.SimulatedCluster` (q virtual machines in
one process, vectorized) and :class:`~secondorder.newton.processes.ProcessCluster` (one machine
per ``torch.distributed`` rank). Given the same data shards and seed they produce the same
iterates. On processes, every rank runs the same sequence of collectives only if every rank runs
the same loop: :func:`run_newton` first checks, in one handshake (:meth:`Cluster.agree`), that the
ranks agree on the iterations, the line search, the start and the reference, so that a rank given
other options fails with a clear error on every rank instead of a mismatched collective.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch
from torch import Tensor

from secondorder.distributed.reducer import digest
from secondorder.newton.combine import CombinedDirection
from secondorder.newton.problems import DTYPE, armijo_step, as_weights, newton_solve
from secondorder.validation import non_negative_int

EFFECTIVE_DIMS = ("exact", "estimated")


@dataclass(frozen=True)
class DistributedStep:
    r"""One combined step: the ``combined`` direction, the :math:`d_\lambda(w)` used and the local λ."""

    combined: CombinedDirection
    effective_dim: float
    local_lam: float


class Cluster(Protocol):
    """q machines sharing a regularized GLM; the global quantities are sums over machines."""

    machines: int
    dim: int
    lam: float

    def gradient(self, w: Tensor) -> Tensor: ...

    def losses(self, points: Tensor) -> Tensor: ...

    def hessian(self, w: Tensor) -> Tensor: ...

    def direction(self, w: Tensor, gradient: Tensor) -> DistributedStep: ...

    def agree(self, facts: dict[str, Any], *, what: str) -> None:
        """``ValueError`` on every machine unless all passed equal ``facts`` (a no-op in one process)."""
        ...


@dataclass(frozen=True)
class IterationRecord:
    """What one iteration did (passed to ``run_newton``'s callback as it happens)."""

    iteration: int
    relative_error: float
    gradient_norm: float
    step_size: float
    seconds: float
    effective_sample_size: float
    effective_dim: float


@dataclass(frozen=True)
class NewtonRun:
    r"""Iterates [T+1, d] (``iterates[0]`` = start), relative errors :math:`\|w_t - w^*\|/\|w^*\|`
    [T+1], gradient norms [T+1], step sizes η_t [T], seconds per iteration [T], effective sample
    sizes of the machine weights [T], the :math:`d_\lambda` used [T], and the reference ``w_star``.
    """

    iterates: Tensor
    relative_errors: Tensor
    gradient_norms: Tensor
    step_sizes: Tensor
    times: Tensor
    effective_sample_sizes: Tensor
    effective_dims: Tensor
    w_star: Tensor


def reference_solution(cluster: Cluster, w_star: Tensor | None) -> Tensor:
    """``w_star``, or the exact Newton solution (gradient norm 1e-12) computed on the cluster."""
    if w_star is None:
        w_star = newton_solve(cluster).w
    w_star = as_weights(cluster.dim, w_star)
    if float(w_star.norm()) == 0.0:
        raise ValueError("w_star is zero; relative errors ||w - w*||/||w*|| are undefined")
    return w_star


def check_iterations(iterations: int) -> int:
    """``iterations`` as a non-negative ``int``."""
    return non_negative_int(iterations, "iterations")


def run_facts(iterations: int, line_search: bool, w0: Tensor, w_star: Tensor | None) -> dict[str, Any]:
    """What shapes a run's sequence of collectives (and its iterates), for the ranks' handshake:
    the iterations, the line search, and digests of the start and of the reference (``None``: the
    exact Newton solve, more collectives).
    """
    return {"iterations": iterations, "line search": bool(line_search), "w0": digest(w0),
            "w_star": None if w_star is None else digest(w_star)}


def run_newton(
    cluster: Cluster,
    *,
    iterations: int = 10,
    line_search: bool = True,
    w0: Tensor | None = None,
    w_star: Tensor | None = None,
    callback: Callable[[IterationRecord], None] | None = None,
) -> NewtonRun:
    """Run ``iterations`` of distributed sketched Newton on ``cluster`` from ``w0`` (default 0).

    ``w_star`` (default: exact Newton on the cluster) is the reference of the relative errors.
    ``callback`` receives an :class:`IterationRecord` after every iteration.
    """
    iterations = check_iterations(iterations)
    w = as_weights(cluster.dim, w0)
    w_star = None if w_star is None else as_weights(cluster.dim, w_star)
    cluster.agree(run_facts(iterations, line_search, w, w_star), what="Newton run handshake")
    w_star = reference_solution(cluster, w_star)
    rel = lambda v: float((v - w_star).norm() / w_star.norm())
    g = cluster.gradient(w)
    iterates, errors, gnorms = [w], [rel(w)], [float(g.norm())]
    etas, times, ess, dims = [], [], [], []
    for t in range(1, iterations + 1):
        start = time.perf_counter()
        step = cluster.direction(w, g)
        p = step.combined.direction
        eta = armijo_step(cluster, w, p, g) if line_search else 1.0
        w = w - eta * p
        g = cluster.gradient(w)
        times.append(time.perf_counter() - start)
        iterates.append(w)
        errors.append(rel(w))
        gnorms.append(float(g.norm()))
        etas.append(eta)
        ess.append(step.combined.effective_sample_size)
        dims.append(step.effective_dim)
        if callback is not None:
            callback(IterationRecord(t, errors[-1], gnorms[-1], eta, times[-1], ess[-1], dims[-1]))
    vec = lambda xs: torch.tensor(xs, dtype=DTYPE)
    return NewtonRun(torch.stack(iterates), vec(errors), vec(gnorms), vec(etas), vec(times),
                     vec(ess), vec(dims), w_star)
