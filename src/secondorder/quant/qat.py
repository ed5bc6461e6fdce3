"""Post-training quantization and short quantization-aware fine-tuning, with HAWQ-V1's multi-stage order.

``quantize`` returns a copy of the model whose chosen layers compute with fake-quantized weights
(and optionally inputs); ``finetune`` trains such a copy with the straight-through estimator.
HAWQ (Dong et al., ICCV 2019) fine-tunes in stages: the layer with the largest
``lambda_max(H_i) * ||Q(W_i) - W_i||^2`` is quantized and trained first, then the next, earlier
layers staying quantized (and, by default, still training). ``calibrate`` sets the activation
quantizers' static ranges from calibration data (post-training activation quantization).
"""

from __future__ import annotations

from collections.abc import Mapping, Sized
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from secondorder.data import as_batches, batch_size, call_model, seeded_batches, to_device, untouched
from secondorder.operators.activations import model_device
from secondorder.quant.quantizers import ActivationQuantizer, QuantizedLayer, wrap_layers

__all__ = ["calibrate", "finetune", "quantize"]


def quantize(model: nn.Module, bits: Mapping[str, int | None], act_bits: Mapping[str, int | None] | None = None,
             granularity: str = "channel", group_size: int | None = None, calibration: Any = None) -> nn.Module:
    """A copy of ``model`` with the layers in ``bits`` fake-quantized (post-training quantization).

    The caller's model is not modified; the copy keeps its mode. With ``calibration`` data (one
    batch or a re-iterable of batches) the activation quantizers of ``act_bits`` get their ranges
    from them (:func:`calibrate`), so the copy runs in eval mode at once; without, they record
    their ranges in training mode, as before.
    """
    qmodel = wrap_layers(model, bits, act_bits, granularity, group_size)
    return qmodel if calibration is None else calibrate(qmodel, calibration)


def _inputs(batch: Any) -> Any:
    """A batch's inputs: the first item of an ``(inputs, targets)`` tuple or list, else the batch itself."""
    return batch[0] if isinstance(batch, (tuple, list)) and batch else batch


def _each_layer_input(model: nn.Module, data: Any, layers: Sequence[str], visit: Callable[[str, Tensor], None],
                     progress: bool = False, desc: str = "calibration") -> int:
    """Call ``model`` on every batch's inputs and ``visit(layer, x)`` with each named layer's first
    positional input ``x`` (detached), every time the layer runs; returns the number of samples.

    The one pass that calibration ranges come from (:func:`calibrate` and
    :func:`~secondorder.quant.activation_sensitivities`): no gradient, the model's modes untouched,
    its buffers and the global RNG restored, batch ``k`` run with the RNG seeded ``k`` (a train-mode
    dropout draws the same masks on every pass), hooks always removed. ``data``: one batch or a
    re-iterable, each ``(inputs, targets)`` (targets unused) or the inputs alone. Refuses no
    batches, an empty batch, a non-floating input and a layer that never runs.
    """
    batches = as_batches(data)
    seen: set[str] = set()

    def hook(name: str) -> Callable:
        def pre(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = args[0] if args else None
            if not isinstance(x, Tensor) or not x.is_floating_point():
                got = f"a {x.dtype} tensor" if isinstance(x, Tensor) else type(x).__name__
                raise TypeError(f"layer {name!r} gets {got} as its first positional input; activation ranges need "
                                "a floating-point tensor (leave index inputs, e.g. of an Embedding, out)")
            seen.add(name)
            visit(name, x.detach())

        return pre

    from tqdm import tqdm

    device = model_device(model)
    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n), with_kwargs=True) for n in layers]
    count = 0
    try:
        with untouched(model, device), torch.no_grad():
            for index, batch in tqdm(seeded_batches(batches, 0, device), desc=desc, unit="batch", leave=False,
                                     total=len(batches) if isinstance(batches, Sized) else None,
                                     disable=not progress):
                batch = to_device(batch, device)
                n = batch_size(_inputs(batch), None)
                if n == 0:
                    raise ValueError(f"batch {index} is empty (0 samples); drop empty batches from the data")
                call_model(model, _inputs(batch))
                count += n
    finally:
        for handle in handles:
            handle.remove()
    if count == 0:
        raise ValueError("data yielded no batches; pass at least one non-empty batch")
    missing = [n for n in layers if n not in seen]
    if missing:
        raise ValueError(f"layers {missing} never ran on the data, so they have no activation range")
    return count


def _observe_ranges(model: nn.Module, data: Any, observers: dict[str, ActivationQuantizer],
                    progress: bool = False) -> int:
    """Fold each named layer's input over ``data`` into ``observers[layer]`` (an ActivationQuantizer
    whose ``momentum`` is -1, reset first): their ranges become the global min and max widened to
    contain 0, the numbers an :class:`ActivationQuantizer` records. Returns the number of samples.
    """
    for q in observers.values():
        q.initialized.fill_(False)

    def visit(name: str, x: Tensor) -> None:
        observers[name]._observe(x)

    return _each_layer_input(model, data, list(observers), visit, progress)


def calibrate(qmodel: nn.Module, data: Any, progress: bool = False) -> nn.Module:
    """Set the range of every activation quantizer with bits in ``qmodel`` (from :func:`quantize`) from ``data``.

    One pass over ``data`` (one batch or a re-iterable; ``(inputs, targets)`` or inputs alone)
    without gradients; every quantizer's range becomes the global min and max of its input over
    all batches, widened to contain 0, whatever its ``momentum`` (a previous range is replaced).
    During the pass the activation quantizers pass their inputs through unquantized, so each
    range is that of the network with full-precision activations (weights as ``qmodel``
    quantizes them): the ranges :func:`~secondorder.quant.activation_sensitivities` reports for
    the model with the same weights. No module's mode changes (BatchNorm keeps its own, its
    running statistics are restored), and the global RNG is restored. Returns ``qmodel``.
    """
    wrapped = _quantized(qmodel)
    chosen = {n: m.act_quantizer for n, m in wrapped.items() if m.act_bits is not None}
    if not chosen:
        raise ValueError("calibrate needs a model from quantize(..., act_bits=...) with activation bits; none of "
                         f"its {len(wrapped)} quantized layers quantizes its input activation")
    observers = {n: ActivationQuantizer(None, momentum=-1).to(device=q.running_min.device, dtype=q.running_min.dtype)
                 for n, q in chosen.items()}
    saved = {n: m.act_bits for n, m in wrapped.items()}
    try:
        for m in wrapped.values():
            m.act_bits = None
        _observe_ranges(qmodel, data, observers, progress)
    finally:
        for n, m in wrapped.items():
            m.act_bits = saved[n]
    with torch.no_grad():
        for n, q in chosen.items():
            for name in ("running_min", "running_max", "initialized"):
                getattr(q, name).copy_(getattr(observers[n], name))
    return qmodel


def _quantized(model: nn.Module) -> dict[str, QuantizedLayer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantizedLayer)}


def _train(model: nn.Module, loss_fn: Callable, batches: list, epochs: int, optimizer: torch.optim.Optimizer,
           losses: list[float], progress: bool, desc: str) -> None:
    from tqdm import tqdm

    for _ in tqdm(range(epochs), desc=desc, unit="epoch", disable=not progress, leave=False):
        for inputs, targets in batches:
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(call_model(model, inputs), targets)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"the fine-tuning loss became {loss.item()} after {len(losses)} steps")
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))


def finetune(
    qmodel: nn.Module,
    loss_fn: Callable,
    data: Any,
    *,
    epochs: int = 1,
    lr: float = 1e-2,
    momentum: float = 0.9,
    order: Sequence[str] | None = None,
    freeze_quantized: bool = False,
    make_optimizer: Callable[[list], torch.optim.Optimizer] | None = None,
    progress: bool = False,
) -> list[float]:
    """Quantization-aware training of a model returned by :func:`quantize`, in place; returns the losses.

    Without ``order``: ``epochs`` passes over ``data`` (a batch or re-iterable of ``(inputs,
    targets)``) with every quantized layer at its bits. With ``order`` (HAWQ-V1's multi-stage
    schedule, e.g. layers sorted by descending ``Sensitivities.eigenvalue_weighted()`` at their
    bits): all layers start at full precision and stage k quantizes ``order[k]`` and trains
    ``epochs`` passes; with ``freeze_quantized`` the layers quantized in earlier stages stop
    training. SGD with momentum unless ``make_optimizer(params)`` gives another. The model's
    mode is restored afterwards; ``progress`` shows a bar per stage.
    """
    layers = _quantized(qmodel)
    if not layers:
        raise ValueError("finetune needs a model from quantize(...): it has no quantized layers")
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    batches = list(as_batches(data))
    make_optimizer = make_optimizer or (lambda params: torch.optim.SGD(params, lr=lr, momentum=momentum))
    was_training, losses = qmodel.training, list[float]()
    qmodel.train()
    try:
        if order is None:
            _train(qmodel, loss_fn, batches, epochs, make_optimizer([p for p in qmodel.parameters()
                                                                     if p.requires_grad]), losses,
                   progress, "fine-tuning")
            return losses
        unknown = [n for n in order if n not in layers]
        if unknown:
            raise ValueError(f"order names {unknown}, which are not quantized layers; these are {list(layers)}")
        target = {n: layers[n].weight_bits for n in order}
        for n in order:
            layers[n].weight_bits = None
        frozen: list[nn.Parameter] = []
        try:
            for n in order:
                layers[n].weight_bits = target[n]
                params = [p for p in qmodel.parameters() if p.requires_grad]
                _train(qmodel, loss_fn, batches, epochs, make_optimizer(params), losses, progress,
                       f"fine-tuning (stage {n})")
                if freeze_quantized:
                    for p in layers[n].parameters():
                        if p.requires_grad:
                            p.requires_grad_(False)
                            frozen.append(p)
        finally:
            for n in order:
                layers[n].weight_bits = target[n]
            for p in frozen:
                p.requires_grad_(True)
        return losses
    finally:
        qmodel.train(was_training)
