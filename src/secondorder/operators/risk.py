r"""The empirical risk a curvature operator differentiates: batches, their weights and seeds.

For batches :math:`b` of sizes :math:`n_b` with mean losses :math:`L_b`, the data-set loss is
:math:`L = \sum_b n_b L_b / \sum_b n_b`, so every curvature product is the size-weighted
average of per-batch products; ragged last batches are exact.

The model is differentiated in the mode it is in (``model.training`` is never changed):

* BatchNorm in **train** mode normalizes with the statistics of each batch, so the operator is
  the curvature of the training-mode loss the optimizer sees, with samples coupled within a
  batch; in **eval** mode it uses the running statistics and BatchNorm is a fixed affine map.
  Running statistics are restored after every pass either way.
* Dropout in train mode draws one fixed mask per batch (seeded by ``seed`` and the batch index
  inside a forked RNG), so the operator is one fixed matrix across products and the caller's
  global RNG is untouched. Put the model in eval mode for the curvature without dropout.
* A shuffling DataLoader yields the same order on every pass (its sampler is seeded by
  ``seed`` too), which matters with train-mode BatchNorm, where batch composition changes the loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from secondorder import validation
from secondorder.data import as_batches, batch_size, call_model, seeded_batches, shapes, to_device, untouched
from secondorder.distributed.reducer import Reducer

__all__ = ["EmpiricalRisk", "NonFiniteError"]


class NonFiniteError(FloatingPointError):
    """A loss or a curvature product was NaN or infinite (the message names the batch)."""


def _describe(layout: Sequence, i: int) -> str:
    """Batch ``i`` of a pass's layout (sample count, tensor shapes) in words."""
    return f"batch {i} with {layout[i][0]} samples of shapes {list(layout[i][1])}"


@dataclass
class EmpiricalRisk:
    """The size-weighted mean loss of ``model`` over ``data`` (one batch or a re-iterable).

    ``loss_fn(outputs, targets)`` returns a batch's **mean** loss, or with ``closure``
    ``loss_fn(model, batch)``. ``num_samples`` is known after the first pass (over all ranks'
    batches when ``reducer`` is data-parallel).
    """

    model: nn.Module
    loss_fn: Callable
    data: Any
    closure: bool = False
    batch_size_fn: Callable[[Any], int] | None = None
    seed: int = 0
    num_samples: int | None = None
    passes: int = 0
    """Completed passes over the data."""
    layout: tuple | None = None
    """What the first pass saw: per batch, its sample count and its tensors' shapes."""

    def __post_init__(self) -> None:
        if not isinstance(self.model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(self.model).__name__}")
        if not callable(self.loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(self.loss_fn).__name__}")
        meta = next((name for name, p in self.model.named_parameters() if p.is_meta), None)
        if meta is not None:
            raise ValueError(f"the model is on the meta device (parameter {meta!r} has no values): materialize it "
                             "first (model.to_empty(device=...), then load_state_dict)")
        self.seed = validation.seed(self.seed)
        self.data = as_batches(self.data)

    # ---- one batch ---------------------------------------------------------------------
    def check_pair(self, batch: Any, index: int) -> None:
        """Refuse a batch that is not an ``(inputs, targets)`` pair (the non-closure form needs one)."""
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise ValueError(
                f"batch {index} is not an (inputs, targets) pair; for other batch layouts pass "
                "closure=True with loss_fn(model, batch)"
            )

    def outputs(self, batch: Any, index: int) -> Any:
        """The model's outputs on the batch's inputs (``None`` in the closure form)."""
        if self.closure:
            return None
        self.check_pair(batch, index)
        return call_model(self.model, batch[0])

    def loss(self, outputs: Any, batch: Any, index: int) -> Tensor:
        """The batch's mean loss, checked to be a finite scalar."""
        loss = self.loss_fn(self.model, batch) if self.closure else self.loss_fn(outputs, batch[1])
        loss = check_finite(check_scalar(loss, index), index)
        if torch.is_grad_enabled() and not loss.requires_grad:
            raise ValueError(f"the loss of batch {index} does not depend on the parameters (it has no graph): "
                             "are the model's outputs detached, or computed under torch.no_grad()?")
        return loss

    # ---- the data set ------------------------------------------------------------------
    def for_each_batch(self, device: torch.device, visit: Callable[[int, Any, int], None]) -> int:
        """``visit(index, batch, n)`` for every batch on ``device`` with its seed in force and the
        model's buffers and RNG restored afterwards; returns the number of samples seen here.

        The first pass records each batch's sample count and tensor shapes; a later pass that
        differs is refused at its first differing batch (or at its end for fewer batches). Every
        algorithm multiplies one fixed matrix; data that change between passes (a re-iterable that
        yields fewer batches each time, a sampler without a seed that draws other batch sizes)
        would make each product another matrix's, silently.
        """
        first, layout = self.layout, []
        with untouched(self.model, device):
            for index, batch in seeded_batches(self.data, self.seed, device):
                batch = to_device(batch, device)
                n = batch_size(batch, self.batch_size_fn)
                if n == 0:
                    raise ValueError(f"batch {index} is empty (0 samples); drop empty batches from the data")
                layout.append((n, shapes(batch)))
                if first is not None and (index >= len(first) or layout[index] != first[index]):
                    was = _describe(first, index) if index < len(first) else f"only {len(first)} batches"
                    raise self._changed(_describe(layout, index), was)
                visit(index, batch, n)
        if not layout:
            raise ValueError("data yielded no batches; pass at least one non-empty batch")
        if first is not None and len(layout) != len(first):
            raise self._changed(f"{len(layout)} batches", f"{len(first)} batches")
        self.passes += 1
        self.layout = first or tuple(layout)
        return sum(n for n, _ in layout)

    def _changed(self, seen: str, was: str) -> ValueError:
        """The error for a pass that yielded ``seen`` where the first pass yielded ``was``."""
        return ValueError(f"the data changed between passes: pass {self.passes + 1} yielded {seen}, pass 1 {was}; "
                          "every product needs the same batches (a list, or a DataLoader with a seeded sampler)")

    def loss_and_gradient(self, params: Sequence[Tensor], reducer: Reducer,
                          gradient: bool = True) -> tuple[float, Tensor | None]:
        """The mean loss and (unless ``gradient=False``) its gradient w.r.t. ``params`` ``[P]``
        (zero for parameters the loss does not depend on), summed over ``reducer``'s ranks.
        """
        device, dtype = params[0].device, params[0].dtype
        grad = torch.zeros(sum(p.numel() for p in params) if gradient else 0,
                           dtype=dtype if gradient else torch.float64, device=device)
        total = 0.0

        def visit(index: int, batch: Any, n: int) -> None:
            nonlocal total
            loss = self.loss(self.outputs(batch, index), batch, index)
            if gradient:
                parts = torch.autograd.grad(loss, params, allow_unused=True)
                grad.add_(torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                                     for g, p in zip(parts, params)]), alpha=n)
            total += n * float(loss.detach())

        with torch.set_grad_enabled(gradient):
            count = self.for_each_batch(device, visit)
        grad, (total, samples) = reducer.sum_with_totals(grad, total, count, what="loss and gradient")
        self.num_samples = round(samples)
        return total / samples, (grad.div_(samples) if gradient else None)


def check_scalar(loss: Any, index: int) -> Tensor:
    """``loss`` if it is a scalar tensor, else a ``ValueError`` naming batch ``index``."""
    return validation.scalar_loss(loss, f"batch {index}", "loss_fn must return the mean loss (reduction='mean')")


def check_finite(loss: Tensor, index: int) -> Tensor:
    """``loss`` if it is finite, else a :class:`NonFiniteError` naming batch ``index``."""
    if not torch.isfinite(loss):
        raise NonFiniteError(f"the loss of batch {index} is {loss.item()}; curvature is undefined there")
    return loss
