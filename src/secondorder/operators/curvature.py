r"""Curvature operators of a model's mean loss over a batch or a whole data set.

A :class:`CurvatureOperator` is an :class:`~secondorder.operators.risk.EmpiricalRisk` (batches,
size weights, per-batch seeds, the model restored, loss, gradient and sample count) and a
per-batch product (:mod:`secondorder.operators.products`) chosen by ``backend``; the data-set
product is the size-weighted mean of the per-batch ones, summed over the ranks by the operator's
reducer when data-parallel.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

from secondorder import validation
from secondorder.distributed.process_group import current_world
from secondorder.distributed.reducer import LOCAL, Reducer, reducer_for
from secondorder.operators.base import LinearOperator
from secondorder.operators.output_hessians import output_hessian
from secondorder.operators.params import ParamSelector, make_blocks, select_parameters
from secondorder.operators.products import Sink, ggn_product, hessian_product, hessian_product_jvp
from secondorder.operators.risk import EmpiricalRisk, NonFiniteError, check_finite, check_scalar
from secondorder.operators.sinks import product_sink, quadratic_form_sink

__all__ = ["CurvatureOperator", "GGNOperator", "HessianOperator", "NonFiniteError", "choose_backend"]


def _train_mode_batchnorm(model: nn.Module) -> str | None:
    """The name of a train-mode BatchNorm that updates running statistics, if the model has one."""
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training and module.track_running_stats:
            return name or type(module).__name__
    return None


def choose_backend(model: nn.Module, device: torch.device, closure: bool, jvp_capable: bool) -> str:
    """What ``backend="auto"`` means: ``"loop"`` on CPU; on CUDA ``"jvp"`` for a Hessian of a
    model with convolutions when it can run (no loss closure, no train-mode BatchNorm), else
    ``"vmap"``. The measurements behind it are in :mod:`secondorder.operators.products`.
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
    r"""Shared data-set accumulation for :class:`HessianOperator` and :class:`GGNOperator`.

    Args:
        model: the network; called as ``model(inputs)`` (or ``model(**inputs)`` for a dict), in
            the mode it is in (see :mod:`secondorder.operators.risk` for BatchNorm and dropout).
        loss_fn: ``loss_fn(outputs, targets)`` returning the **mean** loss of a batch; with
            ``closure=True`` instead ``loss_fn(model, batch)`` returning that scalar.
        data: one ``(inputs, targets)`` batch (a tuple) or a re-iterable of batches (list,
            DataLoader). A one-shot generator is rejected.
        params: ``None`` for all trainable parameters, names or module prefixes, or a
            ``(name, parameter) -> bool`` filter.
        closure: select the ``loss_fn(model, batch)`` form explicitly.
        chunk_size: with ``backend="vmap"`` or ``"jvp"``, at most this many probes share one
            batched backward or one ``vmap(jvp(grad))`` (all at once if ``None``); it bounds the
            vectorized intermediates. (How many probes ``trace`` and ``diagonal`` draw at once is
            their own ``probe_chunk``.)
        blocks: ``"module"`` (one block per layer) or ``"parameter"`` (per tensor).
        batch_size_fn: the number of samples in a batch, when the first tensor of a batch
            does not say it.
        seed: seeds the per-batch RNG for dropout masks.
        distributed: data-parallel over the ``torch.distributed`` group (``True``, or a
            :class:`~secondorder.distributed.reducer.Reducer`): ``data`` is this rank's
            shard, and every product, quadratic form, loss and gradient is the mean over *all*
            ranks' samples, :math:`\sum_r n_r C_r V / \sum_r n_r`, by one all-reduce per call (all
            K probes, and the sample count, in one buffer). Every rank gets the same bits, so
            the algorithms (trace, diagonal, eigenvalues, density, solves, ``analyze``) run
            unchanged and in lockstep as long as every rank calls them with the same arguments
            and seeds (probes come from the seed, never from communication). Construction is
            collective: it checks that all ranks select the same parameters. Dropout masks are
            seeded by the rank's batch index, so they differ from a single process's on the
            concatenated data. Without an initialized process group it is a world of one.
        backend: one of the class's :attr:`backends` or ``"auto"`` (:func:`choose_backend`):
            ``"loop"``, one double backward per probe on the retained graph; ``"vmap"``, one
            batched backward per chunk of probes; for the Hessian also ``"jvp"``,
            forward-over-reverse ``vmap(jvp(grad(loss)))`` over a functional call of the model
            (no retained graph; needs ``loss_fn(outputs, targets)`` and no train-mode BatchNorm
            with running statistics; train-mode dropout draws one fixed mask per batch, on CPU
            the same as ``"loop"``, on CUDA a different one). What each costs where:
            :mod:`secondorder.operators.products`.

    """

    backends: tuple[str, ...] = ("loop", "vmap")
    """The per-batch products this curvature has (``backend=`` takes these or ``"auto"``)."""

    takes_closure = True
    """Whether ``closure=True`` (``loss_fn(model, batch)``) is possible."""

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
        self.risk = EmpiricalRisk(model, loss_fn, data, closure, batch_size_fn, seed)
        self.backend = self._checked_backend(backend, closure)
        self.chunk_size = validation.optional_positive_int(chunk_size, "chunk_size")
        named = select_parameters(model, params)
        kinds = {(p.dtype, p.device) for _, p in named}
        if len(kinds) != 1:
            raise ValueError(f"selected parameters mix dtypes/devices {sorted(map(str, kinds))}; select one kind")
        self.param_names = tuple(n for n, _ in named)
        self.params = [p for _, p in named]
        self.blocks = make_blocks(named, blocks)
        self._block_of_param = [i for i, b in enumerate(self.blocks) for _ in b.params]
        P = sum(p.numel() for p in self.params)
        self.shape = (P, P)
        self.dtype, self.device = self.params[0].dtype, self.params[0].device
        if self.backend == "auto":
            self.backend = choose_backend(model, self.device, closure, "jvp" in self.backends)
        self.num_matvecs = 0
        self.reducer = _operator_reducer(distributed)
        if self.reducer.distributed:
            self._check_same_parameters()

    def _checked_backend(self, backend: str, closure: bool) -> str:
        """``backend`` if this class has it (or ``"auto"``) and it fits ``closure``."""
        name = type(self).__name__
        choices = ("auto", *self.backends)
        if backend not in choices:
            listed = ", ".join(map(repr, choices[:-1])) + f" or {choices[-1]!r}"
            raise ValueError(f"{name}: backend must be {listed}, got {backend!r}")
        if closure and not self.takes_closure:
            raise ValueError(
                f"{name} needs the model outputs, which a loss closure hides; pass loss_fn(outputs, targets) "
                "(use a dict of inputs for models called with keywords), or use HessianOperator with closure=True"
            )
        if closure and backend == "jvp":
            raise ValueError(
                "backend='jvp' needs loss_fn(outputs, targets) so that it can call the model functionally; "
                "with closure=True use backend='loop' or 'vmap'"
            )
        return backend

    # the empirical risk's fields, as the operator's own
    model = property(lambda self: self.risk.model)
    loss_fn = property(lambda self: self.risk.loss_fn)
    data = property(lambda self: self.risk.data)
    seed = property(lambda self: self.risk.seed)
    num_samples = property(lambda self: self.risk.num_samples, doc="Known after the first pass over the data.")

    def _check_same_parameters(self) -> None:
        self.reducer.agree(
            {"parameters (names, shapes, dtype)": (self.param_names, [tuple(p.shape) for p in self.params],
                                                   str(self.dtype))},
            what="curvature operator handshake",
            advice="every rank must build the operator on the same model and parameter selection")

    # ---- per batch -------------------------------------------------------------------
    def _batch_product(self, batch: Any, index: int, V: Tensor, sink: Sink) -> None:
        raise NotImplementedError

    # ---- data-set accumulation -------------------------------------------------------------
    def _reduce(self, rows: Tensor, out: Tensor, make_sink: Callable, name_nonfinite: bool = False) -> Tensor:
        """``sum_b n_b * sink(C_b rows) / sum_b n_b`` into ``out`` (over all ranks' batches when
        distributed); names the first non-finite batch.
        """

        def visit(index: int, batch: Any, n: int) -> None:
            self._batch_product(batch, index, rows, make_sink(out, float(n)))
            if name_nonfinite and not torch.isfinite(out).all():
                raise NonFiniteError(f"the curvature product of batch {index} is not finite")

        count = self.risk.for_each_batch(self.device, visit)
        out, (total,) = self.reducer.sum_with_totals(out, count, what="curvature product", same=rows)
        self.risk.num_samples = round(total)
        if not name_nonfinite and not torch.isfinite(out.sum()) and not torch.isfinite(out).all():
            self._reduce(rows, torch.zeros_like(out), make_sink, name_nonfinite=True)  # rare: run again to name it
        return out.div_(total)

    def loss_and_gradient(self, gradient: bool = True) -> tuple[float, Tensor | None]:
        """The data-set mean loss and (unless ``gradient=False``) its gradient ``[P]``.

        Batches are weighted by their size exactly as in the products, with the same per-batch
        seeds (dropout masks) and the model left as it was. Parameters the loss does not depend
        on get zero gradient. Distributed: over all ranks' samples, one all-reduce.
        """
        return self.risk.loss_and_gradient(self.params, self.reducer, gradient)

    def _matmat(self, V: Tensor) -> Tensor:
        rows = _finite_rows(V.T.contiguous())  # probes as rows; free when V is column-major, as our probes are
        out = torch.zeros_like(rows)
        return self._reduce(rows, out, lambda acc, w: product_sink(acc, self.params, w)).T

    def quadratic_forms(self, V: Tensor) -> Tensor:
        """Per-block ``v^T C v`` without holding ``C V``: each product is reduced when it exists.

        ``V`` may be int8 signs (converted one chunk at a time), so a chunk of probes costs a
        quarter of float32's memory and no block of products is ever stored.
        """
        rows = _finite_rows(self._as_block(V).T.contiguous())
        out = torch.zeros(len(self.blocks), rows.shape[0], dtype=self.dtype, device=self.device)
        result = self._reduce(rows, out, lambda acc, w: quadratic_form_sink(acc, self._block_of_param, w))
        self.num_matvecs += rows.shape[0]
        return result


def _finite_rows(rows: Tensor) -> Tensor:
    """``rows`` (the vectors to multiply, one per row) if finite, else an error naming the first bad one.

    A NaN vector would otherwise surface a whole data pass later as a non-finite product of batch 0.
    """
    if rows.is_floating_point() and not bool(torch.isfinite(rows).all()):
        bad = int((~torch.isfinite(rows)).any(1).nonzero()[0])
        raise ValueError(f"vector {bad} of the {rows.shape[0]} multiplied has NaN or infinite entries; "
                         "the operator multiplies finite vectors only")
    return rows


class HessianOperator(CurvatureOperator):
    r"""The Hessian :math:`\nabla^2_\theta L` of the data-set mean loss (see :class:`CurvatureOperator`).

    Exact Hessian-vector products (Pearlmutter 1994); per batch, all probes share one forward
    and one gradient graph. A parameter without gradient, or one that enters the loss linearly,
    has zero curvature (zero rows), not an error.
    """

    backends = ("loop", "vmap", "jvp")

    def _batch_product(self, batch: Any, index: int, V: Tensor, sink: Sink) -> None:
        if self.backend == "jvp":
            self._batch_product_jvp(batch, index, V, sink)
            return
        loss = self.risk.loss(self.risk.outputs(batch, index), batch, index)
        hessian_product(loss, self.params, V, sink, self.chunk_size, self.backend == "vmap")

    def _batch_product_jvp(self, batch: Any, index: int, V: Tensor, sink: Sink) -> None:
        self.risk.check_pair(batch, index)
        batchnorm = _train_mode_batchnorm(self.model)
        if batchnorm is not None:
            raise ValueError(
                f"backend='jvp' cannot differentiate train-mode BatchNorm {batchnorm!r}: "
                "it updates its running statistics in place inside the function transforms. "
                "Call model.eval() (BatchNorm then uses its running statistics) or use backend='loop' or 'vmap'"
            )

        def loss_fn(outputs: Any, targets: Any) -> Tensor:
            return check_scalar(self.loss_fn(outputs, targets), index)

        try:
            hessian_product_jvp(
                self.model, loss_fn, batch[0], batch[1], self.param_names, V, sink, self.chunk_size,
                check_loss=lambda loss: check_finite(loss, index),
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

    takes_closure = False

    def _batch_product(self, batch: Any, index: int, V: Tensor, sink: Sink) -> None:
        outputs = self.risk.outputs(batch, index)
        self.risk.loss(outputs, batch, index)
        if not isinstance(outputs, Tensor):
            raise TypeError(f"GGNOperator needs the model to return a tensor; batch {index} gave {type(outputs).__name__}")
        hessian = output_hessian(self.loss_fn, outputs, batch[1])
        ggn_product(outputs, hessian, self.params, V, sink, self.chunk_size, self.backend == "vmap")
