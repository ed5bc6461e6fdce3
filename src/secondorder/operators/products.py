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

Which is faster is a property of the hardware, chosen by measurement (``benchmarks/README.md``),
and these measurements are what ``backend="auto"``
(:func:`~secondorder.operators.curvature.choose_backend`) follows: on a 2-core CPU the batched
backward was no faster per probe for an MLP and twice as slow for a small CNN (vmapped
convolution backward), and forward-over-reverse (``vmap(jvp(grad))``) was no better, so the
operators loop on CPU. On an H100 batching fills the device: per product, relative to
PyHessian, an MLP took 0.32x batched (0.50x forward-over-reverse), and a small CNN 0.36x by
forward-over-reverse against 1.04x batched, so a Hessian of a model with convolutions goes
forward-over-reverse there and everything else batched.

The Hessian has a third, opt-in route, :func:`hessian_product_jvp`: **forward-over-reverse**,
``vmap(jvp(grad(f)))`` with ``torch.func`` over a functional call of the model, so each chunk of
probes is one forward-mode pass through one reverse pass, with no retained graph. On an H100,
per Hessian-vector product (16 probes) on a small CNN, it took 0.55 ms against 1.97 ms for the
double backward (PyHessian: 1.91 ms): worth it on GPU, above all for convolutions, whose
vmapped double backward is slow. It needs ``loss_fn(outputs, targets)`` (to call the model
functionally) and recomputes the forward per chunk (restoring the RNG state so that dropout draws
one mask: on CPU the double backward's, on CUDA a different one); it cannot run train-mode
BatchNorm with running statistics (an in-place buffer update inside the transforms).
``torch.func.hessian`` (``jacfwd(jacrev)``) is wrong through an affine LayerNorm in torch 2.13;
``vmap(jvp(grad))`` is right there (tested against dense references).

* Hessian (Pearlmutter 1994): :math:`Hv = \nabla_\theta (\nabla_\theta L \cdot v)`.
* Gauss-Newton: :math:`Gv = J^\top H_\ell J v`; :math:`Jv` by the double-backward trick
  (:math:`J^\top u` is linear in a dummy :math:`u`, so :math:`\nabla_u (J^\top u \cdot v) = Jv`),
  :math:`H_\ell` in closed form (:mod:`secondorder.operators.output_hessians`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Callable

import torch
from torch import Tensor, nn

from secondorder.operators.params import split_rows

Sink = Callable[[int, list[Tensor], tuple], None]
"""Receives (index of the chunk's first probe, its cotangent pieces, its per-parameter products)."""


def _accumulate(
    V: Tensor,
    params: Sequence[Tensor],
    chunk_size: int | None,
    vectorize: bool,
    differentiate: Callable[[list[Tensor], bool], tuple],
    sink: Sink,
) -> None:
    """Feed the probes chunk by chunk (one by one unless ``vectorize``) to ``differentiate``
    (per-parameter cotangent pieces, is-last-chunk) -> per-parameter products, and on to ``sink``.
    """
    chunks = V.split((chunk_size or V.shape[0]) if vectorize else 1)
    start = 0
    for i, chunk in enumerate(chunks):
        pieces = split_rows(chunk.to(params[0].dtype), params)
        sink(start, pieces, differentiate(pieces, i == len(chunks) - 1))
        start += chunk.shape[0]


def _batched_grad(outputs: list[Tensor], inputs: Sequence[Tensor], cotangents: list[Tensor], retain: bool) -> tuple:
    """``grad(outputs, inputs)`` for a leading batch of cotangents (no vmap for a batch of one)."""
    if cotangents[0].shape[0] == 1:
        grads = torch.autograd.grad(
            outputs, inputs, [c[0] for c in cotangents], retain_graph=retain, allow_unused=True
        )
        return tuple(g.unsqueeze(0) if g is not None else None for g in grads)
    return torch.autograd.grad(
        outputs, inputs, cotangents, retain_graph=retain, allow_unused=True, is_grads_batched=True
    )


def check_dense(grads: Sequence, params: Sequence[Tensor], where: str = "") -> None:
    """Refuse sparse gradients (``nn.Embedding(sparse=True)``), naming the parameter, before any product."""
    for i, (g, p) in enumerate(zip(grads, params)):
        if g is not None and g.layout != torch.strided:
            raise ValueError(
                f"the gradient of parameter {i} (shape {list(p.shape)}){where} is sparse ({g.layout}); curvature "
                "needs dense gradients: build the embedding with sparse=False"
            )


def _differentiable_grads(outputs: Tensor, params: Sequence[Tensor], cotangent: Tensor | None = None) -> tuple:
    """First derivatives built with a graph to differentiate again, and the indices that have one."""
    grads = torch.autograd.grad(outputs, params, cotangent, create_graph=True, allow_unused=True)
    check_dense(grads, params)
    return grads, [i for i, g in enumerate(grads) if g is not None and g.requires_grad]


def hessian_product(
    loss: Tensor,
    params: Sequence[Tensor],
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
    params: Sequence[Tensor],
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


def _rng_state(device: torch.device) -> tuple:
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def _set_rng_state(state: tuple, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def hessian_product_jvp(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], Tensor],
    inputs: Any,
    targets: Any,
    names: Sequence[str],
    V: Tensor,
    sink: Sink,
    chunk_size: int | None = None,
    check_loss: Callable[[Tensor], object] | None = None,
) -> tuple:
    """Products ``H v_k`` by forward-over-reverse, for the rows of ``V``, into ``sink``.

    ``H`` is the Hessian of ``f(theta) = loss_fn(model(inputs), targets)`` w.r.t. the model's
    parameters ``names`` (the others, and the buffers, as they are in the model); ``inputs`` is
    passed as keywords when it is a mapping, positionally otherwise. Chunks of ``chunk_size``
    probes (all at once if ``None``) are each one ``vmap(jvp(grad(f)))``; the model runs once
    per chunk, and every chunk starts from the RNG state this call began with, with
    ``randomness="same"``, so a train-mode dropout draws one mask for all probes of all chunks.
    On CPU that is the mask a plain forward draws from that state; on CUDA (torch 2.11, H100)
    dropout under ``vmap`` draws a different, equally fixed, mask than the fused kernel of a plain
    forward, so there the jvp and double-backward operators are Hessians for different masks
    (each one fixed matrix; compare backends in eval mode). ``check_loss`` sees the (detached) loss
    before the first chunk reaches the sink; the loss's shape may also be checked by ``loss_fn``
    itself (it runs inside the transforms, where only static properties can be inspected).

    Returns the gradient (detached) as :func:`hessian_product` does, but with zeros, not
    ``None``, for parameters the loss does not depend on (functional differentiation cannot
    tell them apart). Runs under ``no_grad`` outside the transforms, so the model's parameters
    build no autograd graph.
    """
    own = dict(model.named_parameters())
    params = [own[n] for n in names]
    primals = {n: p.detach() for n, p in zip(names, params)}
    args, kwargs = ((), dict(inputs)) if isinstance(inputs, Mapping) else ((inputs,), {})

    # Floating-point targets enter the forward-mode pass as primals with a materialized zero
    # tangent: captured, they get an immutable ZeroTensor tangent, on which the forward
    # derivative of mse_loss's backward fails in torch 2.13 ("ZeroTensors are immutable").
    dual_targets = isinstance(targets, Tensor) and targets.is_floating_point()
    extra = (targets.detach(),) if dual_targets else ()
    extra_tangents = (torch.zeros_like(targets),) if dual_targets else ()

    def loss_and_value(theta: dict[str, Tensor], *target: Tensor) -> tuple[Tensor, Tensor]:
        outputs = torch.func.functional_call(model, theta, args, kwargs)
        loss = loss_fn(outputs, target[0] if target else targets)
        return loss, loss.detach()

    gradient_of = torch.func.grad(loss_and_value, argnums=0, has_aux=True)

    def hvp(tangents: dict[str, Tensor]) -> tuple:
        return torch.func.jvp(gradient_of, (primals, *extra), (tangents, *extra_tangents), has_aux=True)

    batched = torch.func.vmap(hvp, out_dims=(None, 0, None), randomness="same")  # type: ignore[arg-type]
    device = params[0].device
    rng = _rng_state(device)
    K = V.shape[0]
    gradient = None
    with torch.no_grad():
        if K == 0:
            gradient, loss = gradient_of(primals, *extra)
            if check_loss is not None:
                check_loss(loss)
        start = 0
        for chunk in (V.split(chunk_size or K) if K else ()):
            _set_rng_state(rng, device)  # one dropout mask for every chunk
            pieces = split_rows(chunk.to(params[0].dtype), params)
            gradient, products, loss = batched(dict(zip(names, pieces)))
            if start == 0 and check_loss is not None:
                check_loss(loss)
            sink(start, pieces, tuple(products[n] for n in names))
            start += chunk.shape[0]
    assert gradient is not None  # K == 0 computes it alone, K > 0 with the first chunk
    return tuple(gradient[n] for n in names)
