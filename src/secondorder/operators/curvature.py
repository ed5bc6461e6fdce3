r"""Curvature operators of a model's mean loss over a batch or a whole data set.

For batches :math:`b` of sizes :math:`n_b` with mean losses :math:`L_b`, the data-set loss is
:math:`L = \sum_b n_b L_b / \sum_b n_b`, so every curvature product is the size-weighted
average of per-batch products; ragged last batches are exact.

The model is differentiated in the mode it is in (``model.training`` is never changed):

* BatchNorm in **train** mode normalizes with the statistics of each batch, so the operator is
  the curvature of the training-mode loss the optimizer sees, with samples coupled within a
  batch; in **eval** mode it uses the running statistics and BatchNorm is a fixed affine map.
  Running statistics are restored after every product either way.
* Dropout in train mode draws one fixed mask per batch (seeded by ``seed`` and the batch index
  inside a forked RNG), so the operator is one fixed matrix across products and the caller's
  global RNG is untouched. Put the model in eval mode for the curvature without dropout.
* A shuffling DataLoader yields the same order on every product (its sampler is seeded by
  ``seed`` too), which matters with train-mode BatchNorm, where batch composition changes the loss.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

from secondorder.distributed.process_group import current_world
from secondorder.distributed.reducer import LOCAL, Reducer, reducer_for
from secondorder.operators.base import LinearOperator
from secondorder.data import as_batches, batch_size, call_model, seeded_batches, to_device, untouched
from secondorder.operators.output_hessians import output_hessian
from secondorder.operators.params import ParamSelector, make_blocks, select_parameters
from secondorder.operators.products import Sink, ggn_product, hessian_product, hessian_product_jvp
from secondorder.operators.sinks import product_sink, quadratic_form_sink


class NonFiniteError(FloatingPointError):
    """A loss or a curvature product was NaN or infinite (the message names the batch)."""


def _train_mode_batchnorm(model: nn.Module) -> str | None:
    """The name of a train-mode BatchNorm that updates running statistics, if the model has one."""
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training and module.track_running_stats:
            return name or type(module).__name__
    return None


def choose_backend(model: nn.Module, device: torch.device, closure: bool, jvp_capable: bool) -> str:
    """What ``backend="auto"`` means, by measurement (``benchmarks/README.md``).

    CPU: ``"loop"``. CUDA: ``"jvp"`` (forward-over-reverse) for a Hessian of a model with
    convolutions when it can run (no loss closure, no train-mode BatchNorm): on an H100 it made
    a small CNN's products 0.36x PyHessian's against 1.04x for the batched double backward;
    otherwise ``"vmap"`` (an MLP: 0.32x, against 0.50x with jvp).
    """
    if device.type != "cuda":
        return "loop"
    has_conv = any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())
    if jvp_capable and has_conv and not closure and _train_mode_batchnorm(model) is None:
        return "jvp"
    return "vmap"


def _operator_reducer(distributed: bool | Reducer) -> Reducer:
    """``True``: over the ranks when torch.distributed is initialized (a world of one otherwise)."""
    if isinstance(distributed, Reducer):
        return distributed
    return reducer_for(True) if distributed and current_world().distributed else LOCAL


class CurvatureOperator(LinearOperator):
    """Shared data-set accumulation for :class:`HessianOperator` and :class:`GGNOperator`.

    Args:
        model: the network; called as ``model(inputs)`` (or ``model(**inputs)`` for a dict).
        loss_fn: ``loss_fn(outputs, targets)`` returning the **mean** loss of a batch; with
            ``closure=True`` instead ``loss_fn(model, batch)`` returning that scalar.
        data: one ``(inputs, targets)`` batch (a tuple) or a re-iterable of batches (list,
            DataLoader). A one-shot generator is rejected.
        params: ``None`` for all trainable parameters, names or module prefixes, or a
            ``(name, parameter) -> bool`` filter.
        closure: select the ``loss_fn(model, batch)`` form explicitly.
        chunk_size: with ``backend="vmap"``, at most this many probes share one batched
            backward (bounds the vmapped intermediates); with ``backend="jvp"``, at most this
            many probes share one ``vmap(jvp(grad))`` (all at once if ``None``); for every
            backend, Hutchinson traces and diagonals stream their probes in blocks of this size
            (bounds the probe memory).
        blocks: ``"module"`` (one block per layer) or ``"parameter"`` (per tensor).
        batch_size_fn: the number of samples in a batch, when the first tensor of a batch
            does not say it.
        seed: seeds the per-batch RNG for dropout masks.
        distributed: data-parallel over the ``torch.distributed`` group: ``data`` is this rank's
            shard, and every product, quadratic form, loss and gradient is the mean over *all*
            ranks' samples, :math:`\\sum_r n_r C_r V / \\sum_r n_r`, by one all-reduce per call (all
            K probes, and the sample count, in one buffer). Every rank gets the same bits, so
            the algorithms (trace, diagonal, eigenvalues, density, solves, ``analyze``) run
            unchanged and in lockstep as long as every rank calls them with the same arguments
            and seeds (probes come from the seed, never from communication). Construction is
            collective: it checks that all ranks select the same parameters. Dropout masks are
            seeded by the rank's batch index, so they differ from a single process's on the
            concatenated data. Without an initialized process group it is a world of one.
        backend: ``"loop"`` (one double backward per probe on the retained graph), ``"vmap"``
            (one batched backward per chunk of probes), or ``"auto"``: vmap on GPU, loop on CPU,
            as measured in ``benchmarks/README.md`` (see :func:`choose_backend`; on GPU a
            Hessian of a model with convolutions gets ``"jvp"``). :class:`HessianOperator` also takes
            ``"jvp"``: forward-over-reverse,
            ``vmap(jvp(grad(loss)))`` over a functional call of the model, one forward per
            chunk of probes and no retained graph. It is faster on GPU, above all for
            convolutions: on an H100, per Hessian-vector product (16 probes) on a small CNN,
            0.55 ms against 1.97 ms for the double backward (PyHessian 1.91 ms); on CPU it was
            no better. It needs ``loss_fn(outputs, targets)`` (not ``closure=True``) and
            rejects train-mode BatchNorm with running statistics (use ``model.eval()`` or
            ``"loop"``). Train-mode dropout draws one fixed mask per batch, on CPU the same as
            ``"loop"``; on CUDA, dropout under ``vmap`` draws a different (equally fixed) mask.
    """

    _jvp_capable = False
    """Whether ``backend="jvp"`` exists for this curvature (the Hessian's)."""

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable,
        data: Any,
        params: ParamSelector = None,
        *,
        closure: bool = False,
        chunk_size: int | None = None,
        blocks: str = "module",
        batch_size_fn: Callable[[Any], int] | None = None,
        seed: int = 0,
        backend: str = "auto",
        distributed: bool | Reducer = False,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        if backend not in ("auto", "loop", "vmap", "jvp"):
            raise ValueError(f"backend must be 'auto', 'loop', 'vmap' or 'jvp', got {backend!r}")
        if backend == "jvp" and closure:
            raise ValueError(
                "backend='jvp' needs loss_fn(outputs, targets) so that it can call the model functionally; "
                "with closure=True use backend='loop' or 'vmap'"
            )
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
        named = select_parameters(model, params)
        kinds = {(p.dtype, p.device) for _, p in named}
        if len(kinds) != 1:
            raise ValueError(f"selected parameters mix dtypes/devices {sorted(map(str, kinds))}; select one kind")
        self.model, self.loss_fn, self.closure = model, loss_fn, closure
        self.data = as_batches(data)
        self.param_names = tuple(n for n, _ in named)
        self.params = [p for _, p in named]
        self.blocks = make_blocks(named, blocks)
        self._block_of_param = [i for i, b in enumerate(self.blocks) for _ in b.params]
        P = sum(p.numel() for p in self.params)
        self.shape = (P, P)
        self.dtype, self.device = self.params[0].dtype, self.params[0].device
        self.chunk_size, self.batch_size_fn, self.seed = chunk_size, batch_size_fn, seed
        self.backend = choose_backend(model, self.device, closure, self._jvp_capable) if backend == "auto" else backend
        self.vectorize = self.backend == "vmap"
        self.num_matvecs = 0
        self.num_samples: int | None = None  # known after the first pass over the data
        self.reducer = _operator_reducer(distributed)
        if self.reducer.distributed:
            self._check_same_parameters()

    def _check_same_parameters(self) -> None:
        self.reducer.agree(
            {"parameters (names, shapes, dtype)": (self.param_names, [tuple(p.shape) for p in self.params],
                                                   str(self.dtype))},
            what="curvature operator handshake",
            advice="every rank must build the operator on the same model and parameter selection")

    # ---- per batch -------------------------------------------------------------------
    def _loss(self, outputs: Any, batch: Any, index: int) -> Tensor:
        loss = self.loss_fn(self.model, batch) if self.closure else self.loss_fn(outputs, batch[1])
        return self._check_finite(self._check_scalar(loss, index), index)

    @staticmethod
    def _check_scalar(loss: Any, index: int) -> Tensor:
        if not isinstance(loss, Tensor) or loss.ndim != 0:
            shape = list(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
            raise ValueError(
                f"loss_fn must return the mean loss of a batch as a scalar tensor; batch {index} gave {shape}. "
                "Use reduction='mean'."
            )
        return loss

    @staticmethod
    def _check_finite(loss: Tensor, index: int) -> Tensor:
        if not torch.isfinite(loss):
            raise NonFiniteError(f"the loss of batch {index} is {loss.item()}; curvature is undefined there")
        return loss

    def _check_pair(self, batch: Any, index: int) -> None:
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise ValueError(
                f"batch {index} is not an (inputs, targets) pair; for other batch layouts pass "
                "closure=True with loss_fn(model, batch)"
            )

    def _outputs(self, batch: Any, index: int) -> Any:
        if self.closure:
            return None
        self._check_pair(batch, index)
        return call_model(self.model, batch[0])

    def _batch_product(self, batch: Any, index: int, V: Tensor, sink: Sink) -> None:
        raise NotImplementedError

    # ---- data-set accumulation -------------------------------------------------------------
    def _reduce(self, rows: Tensor, out: Tensor, make_sink: Callable, name_nonfinite: bool = False) -> Tensor:
        """``sum_b n_b * sink(C_b rows) / sum_b n_b`` into ``out`` (over all ranks' batches when
        distributed); names the first non-finite batch."""
        count = 0
        with untouched(self.model, self.device):
            for index, batch in seeded_batches(self.data, self.seed, self.device):
                batch = to_device(batch, self.device)
                n = batch_size(batch, self.batch_size_fn)
                self._batch_product(batch, index, rows, make_sink(out, float(n)))
                if name_nonfinite and not torch.isfinite(out).all():
                    raise NonFiniteError(f"the curvature product of batch {index} is not finite")
                count += n
        if count == 0:
            raise ValueError("data yielded no batches (or only empty ones); pass at least one non-empty batch")
        out, (total,) = self.reducer.sum_with_totals(out, count, what="curvature product", same=rows)
        self.num_samples = round(total)
        if not name_nonfinite and not torch.isfinite(out.sum()) and not torch.isfinite(out).all():
            self._reduce(rows, torch.zeros_like(out), make_sink, name_nonfinite=True)  # rare: run again to name it
        return out.div_(total)

    def loss_and_gradient(self, gradient: bool = True) -> tuple[float, Tensor | None]:
        """The data-set mean loss and (unless ``gradient=False``) its gradient ``[P]``.

        Batches are weighted by their size exactly as in the products, with the same per-batch
        seeds (dropout masks) and the model left as it was. Parameters the loss does not depend
        on get zero gradient. Distributed: over all ranks' samples, one all-reduce.
        """
        total, count = 0.0, 0
        grad = torch.zeros(self.shape[0] if gradient else 0, dtype=torch.float64 if not gradient else self.dtype,
                           device=self.device)
        with untouched(self.model, self.device), torch.set_grad_enabled(gradient):
            for index, batch in seeded_batches(self.data, self.seed, self.device):
                batch = to_device(batch, self.device)
                n = batch_size(batch, self.batch_size_fn)
                loss = self._loss(self._outputs(batch, index), batch, index)
                if gradient:
                    parts = torch.autograd.grad(loss, self.params, allow_unused=True)
                    grad.add_(torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                                         for g, p in zip(parts, self.params)]), alpha=n)
                total += n * float(loss.detach())
                count += n
        if count == 0:
            raise ValueError("data yielded no batches (or only empty ones); pass at least one non-empty batch")
        grad, (total, count) = self.reducer.sum_with_totals(grad, total, count, what="loss and gradient")
        self.num_samples = round(count)
        return total / count, (grad.div_(count) if gradient else None)

    def _matmat(self, V: Tensor) -> Tensor:
        rows = V.T.contiguous()  # probes as rows; free when V is column-major, as our probes are
        out = torch.zeros_like(rows)
        return self._reduce(rows, out, lambda acc, w: product_sink(acc, self.params, w)).T

    def quadratic_forms(self, V: Tensor) -> Tensor:
        """Per-block ``v^T C v`` without holding ``C V``: each product is reduced when it exists.

        ``V`` may be int8 signs (converted one chunk at a time), so a chunk of probes costs a
        quarter of float32's memory and no block of products is ever stored.
        """
        rows = self._as_block(V).T.contiguous()
        out = torch.zeros(len(self.blocks), rows.shape[0], dtype=self.dtype, device=self.device)
        result = self._reduce(rows, out, lambda acc, w: quadratic_form_sink(acc, self._block_of_param, w))
        self.num_matvecs += rows.shape[0]
        return result


class HessianOperator(CurvatureOperator):
    r"""The Hessian :math:`\nabla^2_\theta L` of the data-set mean loss (see :class:`CurvatureOperator`).

    Exact Hessian-vector products (Pearlmutter 1994); per batch, all probes share one forward
    and one gradient graph. A parameter without gradient, or one that enters the loss linearly,
    has zero curvature (zero rows), not an error.
    """

    _jvp_capable = True

    def _batch_product(self, batch: Any, index: int, V: Tensor, sink: Sink) -> None:
        if self.backend == "jvp":
            self._batch_product_jvp(batch, index, V, sink)
            return
        loss = self._loss(self._outputs(batch, index), batch, index)
        hessian_product(loss, self.params, V, sink, self.chunk_size, self.vectorize)

    def _batch_product_jvp(self, batch: Any, index: int, V: Tensor, sink: Sink) -> None:
        self._check_pair(batch, index)
        batchnorm = _train_mode_batchnorm(self.model)
        if batchnorm is not None:
            raise ValueError(
                f"backend='jvp' cannot differentiate train-mode BatchNorm {batchnorm!r}: "
                "it updates its running statistics in place inside the function transforms. "
                "Call model.eval() (BatchNorm then uses its running statistics) or use backend='loop' or 'vmap'"
            )

        def loss_fn(outputs: Any, targets: Any) -> Tensor:
            return self._check_scalar(self.loss_fn(outputs, targets), index)

        try:
            hessian_product_jvp(
                self.model, loss_fn, batch[0], batch[1], self.param_names, V, sink, self.chunk_size,
                check_loss=lambda loss: self._check_finite(loss, index),
            )
        except RuntimeError as error:
            if "in-place operation" not in str(error):
                raise
            raise ValueError(
                f"backend='jvp' failed on batch {index}: the model mutates a tensor in place inside the function "
                f"transforms ({error}); use backend='loop' or 'vmap'"
            ) from error


class GGNOperator(CurvatureOperator):
    r"""The generalized Gauss-Newton matrix :math:`G = J^\top H_\ell J` of the data-set mean loss.

    :math:`H_\ell` is in closed form for cross-entropy, MSE and binary cross-entropy
    (:mod:`secondorder.operators.output_hessians`); positive semi-definite for convex losses.
    Needs the model's outputs, so the closure form is not available.
    """

    def __init__(self, model: nn.Module, loss_fn: Callable, data: Any, params: ParamSelector = None, **kwargs):
        if kwargs.get("backend") == "jvp":
            raise ValueError(
                "backend='jvp' is for HessianOperator only; GGNOperator takes backend='loop' or 'vmap' (or 'auto')"
            )
        if kwargs.get("closure"):
            raise ValueError(
                "GGNOperator needs the model outputs, which a loss closure hides; pass loss_fn(outputs, targets) "
                "(use a dict of inputs for models called with keywords), or use HessianOperator with closure=True"
            )
        super().__init__(model, loss_fn, data, params, **kwargs)

    def _batch_product(self, batch: Any, index: int, V: Tensor, sink: Sink) -> None:
        outputs = self._outputs(batch, index)
        self._loss(outputs, batch, index)
        if not isinstance(outputs, Tensor):
            raise TypeError(f"GGNOperator needs the model to return a tensor; batch {index} gave {type(outputs).__name__}")
        hessian = output_hessian(self.loss_fn, outputs, batch[1])
        ggn_product(outputs, hessian, self.params, V, sink, self.chunk_size, self.vectorize)
