r"""Pure per-batch curvature products: one forward and one gradient graph serve all K probes.

Both products take the probes as a ``[K, P]`` block (one probe per row, possibly compact
int8 signs, converted chunk by chunk) and hand each chunk's per-parameter products to a
``sink`` (:mod:`secondorder.operators.sinks`) that adds them up or reduces them to quadratic
forms at once, so no ``[K, P]`` block of products need exist. The graph is built once per
batch and retained across probes, which are then differentiated either

* one at a time (``vectorize=False``), each a plain double backward through the retained
  graph, or
* ``chunk_size`` at a time (``vectorize=True``), each chunk one batched backward
  (``torch.autograd.grad(..., is_grads_batched=True)``, a vmap over the chunk).

Which is faster is a property of the hardware, chosen by measurement (``benchmarks/README.md``):
on a 2-core CPU the batched backward was no faster per probe for an MLP and twice as slow for
a small CNN (vmapped convolution backward), and forward-over-reverse (``vmap(jvp(grad))``) was
no better, so the operators loop on CPU and batch on GPU, where batching fills the device.

* Hessian (Pearlmutter 1994): :math:`Hv = \nabla_\theta (\nabla_\theta L \cdot v)`.
* Gauss-Newton: :math:`Gv = J^\top H_\ell J v`; :math:`Jv` by the double-backward trick
  (:math:`J^\top u` is linear in a dummy :math:`u`, so :math:`\nabla_u (J^\top u \cdot v) = Jv`),
  :math:`H_\ell` in closed form (:mod:`secondorder.operators.output_hessians`).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from secondorder.operators.params import split_rows

Sink = Callable[[int, list[Tensor], tuple], None]
"""Receives (index of the chunk's first probe, its cotangent pieces, its per-parameter products)."""


def _accumulate(
    V: Tensor,
    params: list[Tensor],
    chunk_size: int | None,
    vectorize: bool,
    differentiate: Callable[[list[Tensor], bool], tuple],
    sink: Sink,
) -> None:
    """Feed the probes chunk by chunk (one by one unless ``vectorize``) to ``differentiate``
    (per-parameter cotangent pieces, is-last-chunk) -> per-parameter products, and on to ``sink``."""
    chunks = V.split((chunk_size or V.shape[0]) if vectorize else 1)
    start = 0
    for i, chunk in enumerate(chunks):
        pieces = split_rows(chunk.to(params[0].dtype), params)
        sink(start, pieces, differentiate(pieces, i == len(chunks) - 1))
        start += chunk.shape[0]


def _batched_grad(outputs: list[Tensor], inputs: list[Tensor], cotangents: list[Tensor], retain: bool) -> tuple:
    """``grad(outputs, inputs)`` for a leading batch of cotangents (no vmap for a batch of one)."""
    if cotangents[0].shape[0] == 1:
        grads = torch.autograd.grad(
            outputs, inputs, [c[0] for c in cotangents], retain_graph=retain, allow_unused=True
        )
        return tuple(g.unsqueeze(0) if g is not None else None for g in grads)
    return torch.autograd.grad(
        outputs, inputs, cotangents, retain_graph=retain, allow_unused=True, is_grads_batched=True
    )


def _differentiable_grads(outputs: Tensor, params: list[Tensor], cotangent: Tensor | None = None) -> tuple:
    """First derivatives built with a graph to differentiate again, and the indices that have one."""
    grads = torch.autograd.grad(outputs, params, cotangent, create_graph=True, allow_unused=True)
    return grads, [i for i, g in enumerate(grads) if g is not None and g.requires_grad]


def hessian_product(
    loss: Tensor,
    params: list[Tensor],
    V: Tensor,
    sink: Sink,
    chunk_size: int | None = None,
    vectorize: bool = False,
) -> tuple:
    """Products ``H v_k`` for the Hessian of the scalar ``loss`` w.r.t. ``params``, for the rows of ``V``, into ``sink``.

    Returns the gradient (detached; ``None`` for parameters the loss does not depend on), which the
    products need anyway.
    """
    grads, live = _differentiable_grads(loss, params)
    gradient = tuple(g.detach() if g is not None else None for g in grads)
    if not live:  # every parameter enters at most linearly: zero curvature
        return gradient

    def differentiate(pieces: list[Tensor], last: bool) -> tuple:
        return _batched_grad([grads[i] for i in live], params, [pieces[i] for i in live], retain=not last)

    _accumulate(V, params, chunk_size, vectorize, differentiate, sink)
    return gradient


def ggn_product(
    outputs: Tensor,
    loss_hessian: Callable[[Tensor], Tensor],
    params: list[Tensor],
    V: Tensor,
    sink: Sink,
    chunk_size: int | None = None,
    vectorize: bool = False,
) -> None:
    """Products ``J^T H_l J v_k`` for model ``outputs`` and an output-space Hessian product, into ``sink``."""
    dummy = torch.zeros_like(outputs, requires_grad=True)
    jt_dummy, live = _differentiable_grads(outputs, params, dummy)
    if not live:
        return

    def differentiate(pieces: list[Tensor], last: bool) -> tuple:
        (jv,) = _batched_grad([jt_dummy[i] for i in live], [dummy], [pieces[i] for i in live], retain=True)
        return _batched_grad([outputs], params, [loss_hessian(jv)], retain=not last)

    _accumulate(V, params, chunk_size, vectorize, differentiate, sink)
