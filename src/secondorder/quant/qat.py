"""Post-training quantization and short quantization-aware fine-tuning, with HAWQ-V1's multi-stage order.

``quantize`` returns a copy of the model whose chosen layers compute with fake-quantized weights
(and optionally inputs); ``finetune`` trains such a copy with the straight-through estimator.
HAWQ (Dong et al., ICCV 2019) fine-tunes in stages: the layer with the largest
``lambda_max(H_i) * ||Q(W_i) - W_i||^2`` is quantized and trained first, then the next, earlier
layers staying quantized (and, by default, still training).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import nn

from secondorder.data import as_batches, call_model
from secondorder.quant.quantizers import QuantizedLayer, wrap_layers

__all__ = ["finetune", "quantize"]


def quantize(model: nn.Module, bits: dict[str, int], act_bits: dict[str, int] | None = None,
             granularity: str = "channel", group_size: int | None = None) -> nn.Module:
    """A copy of ``model`` with the layers in ``bits`` fake-quantized (post-training quantization).

    The caller's model is not modified; the copy keeps its mode.
    """
    return wrap_layers(model, bits, act_bits, granularity, group_size)


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
