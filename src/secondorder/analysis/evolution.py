r"""The Hessian over training: top eigenvalue and trace at checkpoints, or live from a training callback.

Yao et al. (NeurIPS 2018) and PyHessian (2020) follow the top eigenvalue and the trace through
training; the sharpening and flattening they show is what :class:`HessianTracker` records. Each
record is the same measurement: the top eigenvalue by Lanczos (with its residual) and the
Hutch++ trace (with its standard error) of the data-set loss, at a fixed seed, so records differ
only through the weights.

Given the learning rate (or the optimizer itself, read live at each record), every record also
holds the stability checks of :mod:`secondorder.analysis.stability`: the top eigenvalue against
2/lr (or its momentum's bound), the trace against SGD's bound and, for adaptive optimizers, the
preconditioned sharpness :math:`\lambda_{\max}(P^{-1}H)`: an edge-of-stability curve (Cohen et
al., ICLR 2021; 2022 for adaptive methods), taken every ``every`` steps.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn

from secondorder.analysis.stability import (
    StabilityCheck,
    check_rate_source,
    preconditioned_top,
    preconditioner_for,
    stability_check,
)
from secondorder.linalg import eigenvalues, trace
from secondorder.operators.curvature import HessianOperator
from secondorder.validation import positive_int

__all__ = ["EvolutionPoint", "HessianTracker", "hessian_evolution"]


@dataclass(frozen=True)
class EvolutionPoint:
    """The curvature at one point of training (``step`` is the caller's label)."""

    step: int
    loss: float
    top_eigenvalue: float
    top_residual: float
    trace: float
    trace_stderr: float
    stability: StabilityCheck | None = None


class HessianTracker:
    """A training callback: ``tracker(step, model)`` records an :class:`EvolutionPoint` at every
    ``every``-th step (``step % every == 0``; other calls return ``None`` at no cost).

    Args:
        loss_fn, data, params: as for :class:`~secondorder.HessianOperator` (use a fixed
            analysis subset of the training data; every call measures on the same batches).
        trace_matvecs: Hutch++ budget per record.
        seed: probes and start vectors (the same for every record).
        lr, momentum: the training learning rate and heavy-ball momentum, for the stability checks.
        optimizer: instead of ``lr``: the live optimizer (read at each record, so schedules and
            adaptive denominators are followed); adaptive ones add the preconditioned sharpness.
        every: the recording cadence in steps.
        **operator_kwargs: passed to the operator (``closure=True``, ...).

    The model is only read: its mode, parameters, buffers and the global RNG are left as they were.

    """

    def __init__(self, loss_fn: Callable, data: Any, params: Any = None, trace_matvecs: int = 30, seed: int = 0,
                 lr: float | None = None, momentum: float = 0.0, optimizer: Any = None, every: int = 1,
                 **operator_kwargs: Any):
        check_rate_source(lr, momentum, optimizer)  # now, not at the first record
        self.loss_fn, self.data, self.params = loss_fn, data, params
        self.trace_matvecs, self.seed, self.operator_kwargs = trace_matvecs, seed, operator_kwargs
        self.lr, self.momentum, self.optimizer, self.every = lr, momentum, optimizer, positive_int(every, "every")
        self.points: list[EvolutionPoint] = []

    def __call__(self, step: int, model: nn.Module) -> EvolutionPoint | None:
        if step % self.every:
            return None
        op = HessianOperator(model, self.loss_fn, self.data, self.params, seed=self.seed, **self.operator_kwargs)
        pre = preconditioner_for(op, self.lr, self.momentum, self.optimizer)
        loss, _ = op.loss_and_gradient(gradient=False)
        top = eigenvalues(op, 1, seed=self.seed)
        tr = trace(op, self.trace_matvecs, seed=self.seed)
        stability = None if pre is None else stability_check(top, tr, pre, preconditioned_top(op, pre, self.seed))
        point = EvolutionPoint(int(step), loss, float(top.eigenvalues[0]), float(top.residuals[0]), tr.value,
                               tr.stderr, stability)
        self.points.append(point)
        return point


def hessian_evolution(
    model: nn.Module,
    checkpoints: Mapping[int, Any] | Iterable[tuple[int, Any]],
    loss_fn: Callable,
    data: Any,
    progress: bool = False,
    **tracker_kwargs: Any,
) -> tuple[EvolutionPoint, ...]:
    """The curvature at each checkpoint: ``{step: state_dict or path}`` (or ``(step, ...)`` pairs).

    Each state dict is loaded (strictly) into a copy of ``model``, which itself is never changed.
    ``tracker_kwargs`` as for :class:`HessianTracker`.
    """
    from tqdm import tqdm

    items = list(checkpoints.items() if isinstance(checkpoints, Mapping) else checkpoints)
    if not items:
        raise ValueError("no checkpoints given")
    tracker = HessianTracker(loss_fn, data, **tracker_kwargs)
    work = copy.deepcopy(model)
    for step, state in tqdm(items, desc="checkpoints", disable=not progress, leave=False):
        if isinstance(state, (str, Path)):
            state = torch.load(state, map_location="cpu", weights_only=True)
        work.load_state_dict(state)
        tracker(step, work)
    return tuple(tracker.points)
