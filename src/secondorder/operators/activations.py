r"""The Hessian of one batch's loss with respect to layers' input activations (HAWQ-V2's activation curvature).

For the named layers :math:`i` with input activations :math:`a_i` (a layer's first positional
input; for a :class:`~secondorder.quant.QuantizedLayer`, the input its ``act_quantizer`` quantizes),
:class:`ActivationHessianOperator` is :math:`\nabla^2_a L` for :math:`L = \mathrm{loss\_fn}(\mathrm{model}(x), y)`
at the current model, with :math:`a = (\mathrm{vec}\,a_1, \mathrm{vec}\,a_2, \dots)` concatenated in
the order the layers are named, each flattened in its own layout (sample-major when the batch
dimension leads). One :class:`~secondorder.operators.base.Block` per layer, named after it.

Mechanism: forward pre-hooks add a zero perturbation :math:`\varepsilon_i` (requiring grad) to each
layer's input, :math:`g = \partial L/\partial\varepsilon` is built once per product call with a
graph, and :math:`HV` is a second backward of :math:`g` per column (``backend="loop"``) or per
chunk of columns (``"vmap"``, ``is_grads_batched``). Each product call reruns the forward, as
:class:`~secondorder.operators.curvature.HessianOperator` does, with the batch's seed in force
(one dropout mask), the buffers and the global RNG restored, the mode never changed, the
parameters' ``.grad`` never touched and the hooks always removed.

With a mean-reduced loss and no coupling between samples (BatchNorm in eval mode), the Hessian is
block diagonal over samples with blocks :math:`H_s/B`, so its trace is the mean per-sample trace
:math:`\frac1B\sum_s \mathrm{Tr}(\nabla^2_{a_s}\ell_s)`. With train-mode BatchNorm the samples
are coupled and the operator is the Hessian of the batch loss as the optimizer sees it.

A layer called more than once per forward (weight sharing) has no single input activation and is
refused. Only the per-batch product lives here: combining batches (and the activation ranges) is
:func:`secondorder.quant.activation_sensitivities`.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from secondorder import validation
from secondorder.data import is_single_batch
from secondorder.operators.base import Block, LinearOperator
from secondorder.operators.curvature import _finite_rows
from secondorder.operators.products import _batched_grad
from secondorder.operators.risk import EmpiricalRisk, NonFiniteError, check_finite, check_scalar

__all__ = ["ActivationHessianOperator"]


def _checked_layers(model: nn.Module, layers: Any) -> tuple[str, ...]:
    """``layers`` as a tuple of distinct quantizable layer names, or a clear error."""
    from secondorder.quant.quantizers import quantizable_layers  # here: secondorder.quant imports the operators

    if isinstance(layers, str) or not isinstance(layers, Sequence):
        raise TypeError(f"layers must be a list of layer names, got {layers!r}"
                        + (f"; pass [{layers!r}]" if isinstance(layers, str) else ""))
    names = tuple(layers)
    if not names:
        raise ValueError("layers must name at least one layer")
    valid = [n for n, _ in quantizable_layers(model)]
    unknown = [n for n in names if n not in valid]
    if unknown:
        raise ValueError(f"unknown layers {unknown}; quantizable layers are {valid}")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"layers {repeated} are named more than once; name each layer once")
    return names


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer; CPU for a model with neither): where batches go."""
    t: Tensor | None = next(model.parameters(), None)
    t = t if t is not None else next(model.buffers(), None)
    return t.device if t is not None else torch.device("cpu")


class _Perturbations:
    """Forward pre-hooks adding a zero perturbation (a leaf requiring grad) to each layer's first input."""

    def __init__(self, model: nn.Module, names: tuple[str, ...]):
        self.modules = {n: model.get_submodule(n) for n in names}
        self.names = names
        self.eps: dict[str, Tensor] = {}

    def _hook(self, name: str) -> Callable:
        def pre(module: nn.Module, args: tuple, kwargs: dict) -> tuple:
            if name in self.eps:
                raise ValueError(f"layer {name!r} is called more than once in one forward pass (shared weights?); its "
                                 "input activation is not one tensor, so it has no activation Hessian: leave it out "
                                 "of layers")
            x = args[0] if args else None
            if not isinstance(x, Tensor):
                got = "no positional input" if not args else f"a {type(x).__name__}"
                raise TypeError(f"layer {name!r} was called with {got}; the activation Hessian perturbs a layer's "
                                "first positional input, which must be a tensor")
            if not x.is_floating_point():
                raise TypeError(f"layer {name!r} gets a {x.dtype} input (indices, e.g. of an Embedding), which "
                                "cannot be perturbed; leave it out of layers")
            eps = torch.zeros_like(x, requires_grad=True)
            self.eps[name] = eps
            return (x + eps, *args[1:]), kwargs

        return pre

    @contextmanager
    def registered(self) -> Iterator[_Perturbations]:
        self.eps = {}
        handles = [m.register_forward_pre_hook(self._hook(n), with_kwargs=True) for n, m in self.modules.items()]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def ordered(self, index: int) -> list[Tensor]:
        """The perturbations in layer order; every layer must have run."""
        missing = [n for n in self.names if n not in self.eps]
        if missing:
            raise ValueError(f"layers {missing} were not called in the forward pass of batch {index}, so the loss "
                             "does not depend on their inputs; leave them out of layers")
        return [self.eps[n] for n in self.names]


class ActivationHessianOperator(LinearOperator):
    r"""The Hessian of one batch's mean loss w.r.t. the named layers' input activations (see the module docstring).

    Construction runs the forward once (without gradients) to learn the activations' shapes and
    to refuse, with a clear error, unknown layers, a layer the forward does not call or calls
    twice, and integer (index) inputs. Layers whose input the loss does not depend on, or only
    linearly, have zero rows.

    Args:
        model: the network, called as ``model(inputs)`` (``model(**inputs)`` for a dict) in the
            mode it is in; left exactly as it was.
        loss_fn: ``loss_fn(outputs, targets)`` returning the batch's **mean** loss.
        batch: one ``(inputs, targets)`` batch (a tuple, or a two-item list as a DataLoader gives).
        layers: layer names as :func:`~secondorder.quant.quantizable_layers` lists them; the
            operator's blocks, in this order.
        seed: seeds the batch's RNG (dropout masks; one fixed mask for every product).
        backend: ``"loop"`` (one double backward per column), ``"vmap"`` (one batched backward per
            chunk of columns) or ``"auto"`` (``"vmap"`` on CUDA, ``"loop"`` elsewhere, as
            :func:`~secondorder.operators.curvature.choose_backend` measured for parameters).
        chunk_size: with ``"vmap"``, at most this many columns per batched backward.

    Attributes:
        layers: the layer names; ``blocks[i].name == layers[i]``.
        activation_shapes: ``{layer: shape of its input activation}`` (batch dimension included).
        batch_size: the batch's number of samples (the first tensor's leading size), so that a
            block of ``size`` coordinates holds ``size / batch_size`` entries per sample.

    """

    backends = ("loop", "vmap")

    def __init__(self, model: nn.Module, loss_fn: Callable, batch: Any, layers: Sequence[str], *, seed: int = 0,
                 backend: str = "auto", chunk_size: int | None = None):
        if not (is_single_batch(batch) or (isinstance(batch, list) and len(batch) == 2
                                           and isinstance(batch[0], (Tensor, Mapping)))):
            raise TypeError(f"ActivationHessianOperator takes one (inputs, targets) batch, got a "
                            f"{type(batch).__name__}; activation_sensitivities combines the batches of a data set")
        self.risk = EmpiricalRisk(model, loss_fn, [tuple(batch) if isinstance(batch, list) else batch], seed=seed)
        self.layers = _checked_layers(model, layers)
        validation.one_of(backend, "backend", ("auto", *self.backends))
        self.chunk_size = validation.optional_positive_int(chunk_size, "chunk_size")
        self.device = model_device(model)
        self.backend = ("vmap" if self.device.type == "cuda" else "loop") if backend == "auto" else backend
        self._perturbations = _Perturbations(model, self.layers)
        found: dict[str, Any] = {}

        def discover(index: int, batch: Any, n: int) -> None:
            with torch.no_grad():
                eps, _ = self._forward(batch, index)
            found["eps"], found["n"] = eps, n

        self.risk.for_each_batch(self.device, discover)
        eps = found["eps"]
        kinds = sorted({f"{e.dtype} on {e.device}" for e in eps})
        if len(kinds) != 1:
            raise ValueError(f"the layers' input activations mix dtypes or devices ({', '.join(kinds)}); one "
                             "operator needs one kind: name layers of one kind")
        self.activation_shapes = {n: tuple(e.shape) for n, e in zip(self.layers, eps)}
        self.batch_size: int = found["n"]
        start, blocks = 0, []
        for name, e in zip(self.layers, eps):
            blocks.append(Block(name, start, start + e.numel()))
            start += e.numel()
        self.blocks = tuple(blocks)
        self.shape = (start, start)
        self.dtype, self.device = eps[0].dtype, eps[0].device
        self.num_matvecs = 0

    model = property(lambda self: self.risk.model)
    loss_fn = property(lambda self: self.risk.loss_fn)
    seed = property(lambda self: self.risk.seed)

    def _forward(self, batch: Any, index: int) -> tuple[list[Tensor], Tensor]:
        """The perturbations (layer order) and the checked loss of one forward with the hooks in place."""
        with self._perturbations.registered() as hooks:
            outputs = self.risk.outputs(batch, index)
        eps = hooks.ordered(index)
        loss = check_finite(check_scalar(self.loss_fn(outputs, batch[1]), index), index)
        return eps, loss

    def _matmat(self, V: Tensor) -> Tensor:
        rows = _finite_rows(V.T.contiguous())  # [K, P], one column of V per row
        out = torch.zeros_like(rows)

        def visit(index: int, batch: Any, n: int) -> None:
            eps, loss = self._forward(batch, index)
            shapes = [tuple(e.shape) for e in eps]
            if shapes != list(self.activation_shapes.values()):
                raise ValueError(f"the layers' input shapes changed since the operator was built: "
                                 f"{dict(zip(self.layers, shapes))}, were {self.activation_shapes}")
            grads = torch.autograd.grad(loss, eps, create_graph=True, allow_unused=True)
            live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
            if not live:  # the loss is at most linear in every activation: zero curvature
                return
            step = (self.chunk_size or rows.shape[0]) if self.backend == "vmap" else 1
            starts = range(0, rows.shape[0], step)
            for c, lo in enumerate(starts):
                chunk = rows[lo : lo + step]
                pieces = [chunk[:, b.start : b.stop].reshape(chunk.shape[0], *e.shape)
                          for b, e in zip(self.blocks, eps)]
                products = _batched_grad([grads[i] for i in live], eps, [pieces[i] for i in live],
                                         retain=c < len(starts) - 1)
                for b, p in zip(self.blocks, products):
                    if p is not None:
                        out[lo : lo + chunk.shape[0], b.start : b.stop] = p.reshape(chunk.shape[0], -1)

        self.risk.for_each_batch(self.device, visit)
        if not bool(torch.isfinite(out).all()):
            raise NonFiniteError("the activation Hessian product of the batch is not finite")
        return out.T
