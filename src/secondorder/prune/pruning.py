r"""One-shot and gradual unstructured pruning: global magnitude, M-FAC optimal brain surgeon, and the
diagonal-curvature optimal brain damage; and a short masked fine-tuning.

:func:`prune` removes the weights of least saliency, counted globally over the prunable weights
(:func:`~secondorder.prune.prunable_parameters`), until the fraction ``sparsity`` of them is zero:

* ``"magnitude"``: :math:`|w_q|`, no update;
* ``"mfac"`` (Hassibi & Stork 1993, with the M-FAC curvature of Frantar, Kurtic & Alistarh 2021):
  :math:`\rho_q = w_q^2/(2[\hat F^{-1}]_{qq})` with :math:`\hat F = \lambda I + \frac1m G^\top G`
  over the gradients of the batches of ``data`` (``rows="batch"``, the paper's driver: m = 64
  batches of 32) or of its samples (``rows="sample"``), block diagonal over chunks of
  ``block_size`` weights, and the compensating update
  :math:`\delta w = -\hat F^{-1}E_Q(E_Q^\top\hat F^{-1}E_Q)^{-1}w_Q` over *all* pruned weights (those
  pruned earlier stay at zero, :math:`\delta_q = -w_q = 0`);
* ``"diagonal"`` (LeCun, Denker & Solla 1990): :math:`\rho_q = \tfrac12 w_q^2 H_{qq}` from the
  library's estimate of the Hessian diagonal (:func:`secondorder.diagonal` on
  :class:`~secondorder.HessianOperator`, XDiag by default), or a diagonal you give; no update.

The quadratic model behind OBS holds only near the current weights, so the curvature methods prune
in ``steps`` increments (the paper's recomputations, 16 by default for ``"mfac"``): increment
:math:`i` prunes up to :math:`n_0 + \mathrm{round}((n - n_0)\,i/k)` weights and the gradients (or the
diagonal) are recomputed at the updated weights before the next. The target count is
:math:`n = \lfloor s N + \tfrac12\rfloor` of the :math:`N` prunable weights (exactly
:math:`sN` when that is an integer); ties in saliency are broken by position, so exactly :math:`n`
weights are zero afterwards. Masks only grow: a ``mask`` from an earlier call stays pruned
(gradual pruning, :func:`prune_gradually`).

Everything is checked before the model changes; if anything fails midway (a non-finite gradient
at a later increment) the weights are restored. The model's train/eval mode and the global RNG
are left as they were.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from numbers import Real
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from secondorder import validation
from secondorder.data import as_batches, batch_size, call_model, untouched
from secondorder.prune.masks import PruningMask, Selector, masked, prunable_parameters
from secondorder.prune.saliency import magnitude_saliency, obd_saliency, obs_saliency, obs_update, select_pruned

__all__ = ["METHODS", "GradualStage", "LayerSparsity", "PruningResult", "finetune", "mean_loss", "prune",
           "prune_gradually"]

METHODS = ("magnitude", "mfac", "diagonal")
"""The saliencies :func:`prune` knows."""


@dataclass(frozen=True)
class LayerSparsity:
    """One pruned parameter tensor: its name, size and the number of its zeroed weights."""

    name: str
    size: int
    pruned: int

    @property
    def sparsity(self) -> float:
        return self.pruned / self.size


@dataclass(frozen=True)
class PruningResult:
    """What :func:`prune` did: the method, the target and achieved sparsity over the prunable weights,
    per-tensor sparsities, the mean loss over ``data`` before and after, and the mask.
    """

    method: str
    target: float
    sparsity: float
    num_pruned: int
    num_weights: int
    layers: tuple[LayerSparsity, ...]
    loss_before: float
    loss_after: float
    steps: int
    mask: PruningMask = field(repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (the mask left out)."""
        return {"method": self.method, "target": self.target, "sparsity": self.sparsity,
                "num_pruned": self.num_pruned, "num_weights": self.num_weights,
                "loss_before": self.loss_before, "loss_after": self.loss_after, "steps": self.steps,
                "layers": [{"name": x.name, "size": x.size, "pruned": x.pruned, "sparsity": x.sparsity}
                           for x in self.layers]}


@dataclass(frozen=True)
class GradualStage:
    """One stage of :func:`prune_gradually`: the pruning, then the mean loss after fine-tuning (``None``
    without fine-tuning) and the fine-tuning losses.
    """

    pruning: PruningResult
    fine_tuned_loss: float | None
    fine_tune_losses: tuple[float, ...]


def sparsity_value(value: Any, name: str = "sparsity") -> float:
    """A sparsity: a real number in ``[0, 1)``."""
    if not isinstance(value, Real) or isinstance(value, bool) or not 0 <= float(value) < 1:
        raise ValueError(f"{name} must be a number in [0, 1) (the fraction of prunable weights set to zero), "
                         f"got {value!r}")
    return float(value)


def target_count(sparsity: float, total: int) -> int:
    r"""The number of weights :func:`prune` zeroes: :math:`\lfloor s N + \frac12\rfloor`."""
    return min(total, math.floor(sparsity * total + 0.5))


def mean_loss(model: nn.Module, loss_fn: Callable, data: Any) -> float:
    """The mean loss over ``data`` (batches weighted by their size), without gradients, in the model's
    current mode, buffers and global RNG left as they were.
    """
    batches = as_batches(data)
    device = next(model.parameters()).device
    total = count = 0.0
    with untouched(model, device), torch.no_grad():
        for batch in batches:
            if not isinstance(batch, (tuple, list)) or len(batch) != 2:
                raise ValueError("data must give (inputs, targets) batches")
            n = batch_size(batch, None)
            total += float(loss_fn(call_model(model, batch[0]), batch[1])) * n
            count += n
    if count == 0:
        raise ValueError("data yielded no samples")
    return total / count


def _hessian_diagonal(given: Tensor | Mapping[str, Tensor], named: list[tuple[str, nn.Parameter]]) -> Tensor:
    total = sum(p.numel() for _, p in named)
    if isinstance(given, Mapping):
        missing = [n for n, _ in named if n not in given]
        if missing:
            raise ValueError(f"the Hessian diagonal lacks the parameters {missing}")
        wrong = [n for n, p in named if tuple(given[n].shape) != tuple(p.shape)]
        if wrong:
            raise ValueError(f"the Hessian diagonal's shapes do not match the parameters {wrong}")
        flat = torch.cat([given[n].reshape(-1) for n, _ in named])
    elif isinstance(given, Tensor):
        flat = given.reshape(-1)
        if flat.numel() != total:
            raise ValueError(f"the Hessian diagonal has {flat.numel()} entries; the pruned parameters {total}")
    else:
        raise TypeError("hessian_diagonal must be a tensor [d] or a {parameter name: tensor} mapping")
    if not flat.is_floating_point() or not bool(torch.isfinite(flat).all()):
        raise ValueError("the Hessian diagonal must be a finite floating tensor")
    return flat.detach()


def _flatten(named: list[tuple[str, nn.Parameter]]) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for _, p in named])


def _write(named: list[tuple[str, nn.Parameter]], flat: Tensor) -> None:
    with torch.no_grad():
        offset = 0
        for _, p in named:
            n = p.numel()
            p.copy_(flat[offset:offset + n].view_as(p).to(p.dtype))
            offset += n


def _unflatten(named: list[tuple[str, nn.Parameter]], pruned: Tensor) -> PruningMask:
    masks, offset = {}, 0
    for name, p in named:
        n = p.numel()
        masks[name] = ~pruned[offset:offset + n].reshape(p.shape).cpu()
        offset += n
    return PruningMask(masks)


def prune(
    model: nn.Module,
    loss_fn: Callable,
    data: Any,
    sparsity: float,
    *,
    method: str = "mfac",
    params: Selector = None,
    mask: PruningMask | None = None,
    steps: int | None = None,
    damping: float = 1e-5,
    block_size: int = 128,
    rows: str = "batch",
    hessian_diagonal: Tensor | Mapping[str, Tensor] | None = None,
    num_matvecs: int = 100,
    diagonal_method: str = "xdiag",
    seed: int = 0,
    progress: bool = False,
) -> PruningResult:
    r"""Prune ``model`` in place to ``sparsity`` of its prunable weights (module docstring).

    Args:
        model: the network, pruned in place.
        loss_fn: ``loss_fn(outputs, targets)``, the batch's mean loss.
        data: one ``(inputs, targets)`` batch or a re-iterable of batches (the curvature's and the
            reported losses' data).
        sparsity: the fraction in ``[0, 1)`` of the prunable weights to zero.
        method: ``"magnitude"``, ``"mfac"`` (OBS with M-FAC) or ``"diagonal"`` (OBD).
        params: which parameters (:func:`~secondorder.prune.prunable_parameters`; default the Linear
            and Conv weights). With ``mask``, the mask's parameters.
        mask: an earlier :class:`PruningMask`; its pruned weights stay pruned.
        steps: increments, each recomputing the curvature (default 16 for ``"mfac"``, else 1).
        damping: :math:`\lambda` of the M-FAC :math:`\hat F`.
        block_size: :math:`B`, the weights per diagonal block of :math:`\hat F`.
        rows: ``"batch"`` (one gradient per batch) or ``"sample"``
            (:meth:`~secondorder.MFACOperator.from_model`).
        hessian_diagonal: for ``"diagonal"``, the Hessian diagonal to use (a tensor ``[d]`` over the
            pruned parameters in order, or by name) instead of estimating it.
        num_matvecs: Hessian-vector products of the diagonal's estimate (:func:`secondorder.diagonal`).
        diagonal_method: ``"xdiag"`` or ``"hutchinson"``.
        seed: the estimate's probes.
        progress: a progress bar over the increments.

    Returns:
        :class:`PruningResult`; the model holds the pruned (and, for ``"mfac"``, updated) weights.

    """
    from tqdm import tqdm

    sparsity = sparsity_value(sparsity)
    validation.one_of(method, "method", METHODS)
    if mask is not None:
        if not isinstance(mask, PruningMask):
            raise TypeError(f"mask must be a PruningMask, got {type(mask).__name__}")
        by_name = mask.check(model)
        if params is not None and [n for n, _ in prunable_parameters(model, params)] != list(mask.names):
            raise ValueError("params and mask name different parameters; give one of them")
        named = list(by_name.items())
        frozen = [n for n, p in named if not p.requires_grad]
        if frozen:
            raise ValueError(f"parameters to prune do not require grad: {frozen}")
    else:
        named = prunable_parameters(model, params)
    names = [n for n, _ in named]
    steps = (16 if method == "mfac" else 1) if steps is None else validation.positive_int(steps, "steps")
    damping = validation.positive_finite(damping, "damping (lambda)")
    block_size = validation.positive_int(block_size, "block_size")
    validation.one_of(rows, "rows", ("batch", "sample"))
    validation.positive_int(num_matvecs, "num_matvecs")
    validation.one_of(diagonal_method, "diagonal_method", ("xdiag", "hutchinson"))
    seed = validation.seed(seed)
    if hessian_diagonal is not None and method != "diagonal":
        raise ValueError(f"hessian_diagonal is for method='diagonal', not {method!r}")
    given = _hessian_diagonal(hessian_diagonal, named) if hessian_diagonal is not None else None
    data = as_batches(data)
    weights = _flatten(named)
    if not bool(torch.isfinite(weights).all()):
        raise ValueError("the weights to prune are not finite")
    total = weights.numel()
    already = (~mask.flat()).to(weights.device) if mask is not None else torch.zeros(total, dtype=torch.bool,
                                                                                     device=weights.device)
    start, goal = int(already.sum()), target_count(sparsity, total)
    if start > goal:
        raise ValueError(f"the mask prunes {start} of {total} weights already, more than sparsity {sparsity} "
                         f"({goal}): masks only grow")
    loss_before = mean_loss(model, loss_fn, data)
    snapshot = [p.detach().clone() for _, p in named]
    pruned = already.clone()
    try:
        for i in tqdm(range(1, steps + 1), desc=f"pruning ({method})", unit="step", disable=not progress,
                      leave=False):
            count = start + round((goal - start) * i / steps)
            weights = _flatten(named)
            if count == int(pruned.sum()) and bool((weights[pruned] == 0).all()):
                continue  # nothing new to prune in this increment
            if method == "mfac":
                from secondorder.operators.mfac import MFACOperator

                op = MFACOperator.from_model(model, loss_fn, data, damping, params=names, rows=rows,
                                             block_size=block_size)
                chosen = select_pruned(obs_saliency(weights.double(), op.inverse_diagonal().double()), count,
                                       pruned)
                new = (weights.double() + obs_update(op, weights, chosen)).to(weights.dtype)
            else:
                if method == "magnitude":
                    saliency = magnitude_saliency(weights)
                else:
                    h = given if given is not None else _estimate_diagonal(model, loss_fn, data, names,
                                                                           num_matvecs, diagonal_method, seed)
                    saliency = obd_saliency(weights.double(), h.to(weights.device).double())
                chosen = select_pruned(saliency, count, pruned)
                new = weights.clone()
            new[chosen] = 0
            _write(named, new)
            pruned = chosen
    except BaseException:
        with torch.no_grad():
            for (_, p), old in zip(named, snapshot):
                p.copy_(old)
        raise
    result_mask = _unflatten(named, pruned)
    result_mask.apply(model)
    layers = tuple(LayerSparsity(n, p.numel(), int((~result_mask[n]).sum())) for n, p in named)
    num_pruned = int(pruned.sum())
    return PruningResult(method, sparsity, num_pruned / total, num_pruned, total, layers, loss_before,
                         mean_loss(model, loss_fn, data), steps, result_mask)


def _estimate_diagonal(model, loss_fn, data, names, num_matvecs, method, seed) -> Tensor:
    from secondorder.linalg import diagonal
    from secondorder.operators.curvature import HessianOperator

    op = HessianOperator(model, loss_fn, data, names, seed=seed)
    return diagonal(op, num_matvecs, method=method, seed=seed).value


def finetune(
    model: nn.Module,
    mask: PruningMask,
    loss_fn: Callable,
    data: Any,
    *,
    epochs: int = 1,
    lr: float = 1e-2,
    momentum: float = 0.9,
    make_optimizer: Callable[[list], torch.optim.Optimizer] | None = None,
    seed: int = 0,
    progress: bool = False,
) -> list[float]:
    """Train the pruned ``model`` in place for ``epochs`` passes over ``data`` with ``mask`` kept
    (:func:`~secondorder.prune.masked`); returns the batch losses.

    SGD with momentum unless ``make_optimizer(params)`` gives another. Runs in train mode, restoring
    the mode afterwards, with the global RNG forked and seeded by ``seed`` (dropout draws from it),
    so the caller's random stream is untouched.
    """
    from tqdm import tqdm

    validation.positive_int(epochs, "epochs")
    mask.check(model)
    seed = validation.seed(seed)
    batches = list(as_batches(data))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = (make_optimizer or (lambda ps: torch.optim.SGD(ps, lr=lr, momentum=momentum)))(params)
    device = params[0].device
    was_training, losses = model.training, list[float]()
    model.train()
    try:
        with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []), \
                masked(model, mask, optimizer):
            torch.manual_seed(seed)
            for _ in tqdm(range(epochs), desc="fine-tuning", unit="epoch", disable=not progress, leave=False):
                for inputs, targets in batches:
                    optimizer.zero_grad(set_to_none=True)
                    loss = loss_fn(call_model(model, inputs), targets)
                    if not torch.isfinite(loss):
                        raise FloatingPointError(f"the fine-tuning loss became {loss.item()} after {len(losses)} "
                                                 "steps")
                    loss.backward()
                    optimizer.step()
                    losses.append(float(loss.detach()))
        for p in params:
            p.grad = None
    finally:
        model.train(was_training)
    return losses


def prune_gradually(
    model: nn.Module,
    loss_fn: Callable,
    data: Any,
    schedule: Sequence[float] = (0.5, 0.75, 0.875),
    *,
    fine_tune_data: Any = None,
    fine_tune_epochs: int = 1,
    lr: float = 1e-2,
    momentum: float = 0.9,
    progress: bool = False,
    **prune_kwargs: Any,
) -> tuple[GradualStage, ...]:
    """Gradual pruning: for each sparsity of the increasing ``schedule``, :func:`prune` (keeping the
    earlier mask), then ``fine_tune_epochs`` of masked :func:`finetune` on ``fine_tune_data``
    (default ``data``; ``0`` epochs: none). ``prune_kwargs`` go to :func:`prune`. The schedule is
    checked before anything changes.
    """
    targets = [sparsity_value(s, f"schedule[{i}]") for i, s in enumerate(schedule)]
    if not targets or any(b <= a for a, b in zip(targets, targets[1:])):
        raise ValueError(f"schedule must be a non-empty increasing sequence of sparsities, got {list(schedule)}")
    validation.non_negative_int(fine_tune_epochs, "fine_tune_epochs")
    mask = prune_kwargs.pop("mask", None)
    stages = []
    for s in targets:
        result = prune(model, loss_fn, data, s, mask=mask, progress=progress, **prune_kwargs)
        mask = result.mask
        losses: list[float] = []
        tuned = None
        if fine_tune_epochs:
            tuning = data if fine_tune_data is None else fine_tune_data
            losses = finetune(model, mask, loss_fn, tuning, epochs=fine_tune_epochs, lr=lr, momentum=momentum,
                              progress=progress)
            tuned = mean_loss(model, loss_fn, data)
        stages.append(GradualStage(result, tuned, tuple(losses)))
    return tuple(stages)
