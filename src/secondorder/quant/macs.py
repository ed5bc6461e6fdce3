"""Multiply-accumulates per layer, for HAWQ-V3's bit-operation (BOPs) budget.

``BOPs_i(b_w, b_a) = MACs_i * b_w * b_a``; the MACs are counted from the layers' output shapes on
one example batch (per sample): Linear ``in_features * out_elements``; ConvNd
``out_elements * in_channels / groups * prod(kernel_size)``; any other layer holding a matrix
weight ``out_elements * weight.numel() / weight.shape[0]`` (each output element a dot product with
one row of the weight).
"""

from __future__ import annotations

import math
from typing import Any, cast

import torch
from torch import nn

from secondorder.data import call_model
from secondorder.quant.quantizers import quantizable_layers

__all__ = ["layer_macs"]


def _macs(module: nn.Module, output: torch.Tensor, batch: int) -> int:
    per_sample = output.numel() // max(batch, 1)
    if isinstance(module, nn.Linear):
        return per_sample * module.in_features
    if isinstance(module, nn.modules.conv._ConvNd):
        return per_sample * (module.in_channels // module.groups) * math.prod(module.kernel_size)
    if isinstance(module, nn.Embedding):
        return 0  # a lookup, no multiplications
    w = cast(torch.Tensor, module.weight)
    return per_sample * (w.numel() // w.shape[0])


def layer_macs(model: nn.Module, inputs: Any) -> dict[str, int]:
    """MACs per sample of every quantizable layer on ``inputs`` (a batch; its first dimension is the batch).

    One forward under ``torch.no_grad()`` with hooks; the model's mode, buffers and RNG are kept.
    """
    from secondorder.data import first_tensor, untouched

    layers = quantizable_layers(model)
    first = first_tensor(inputs)
    batch = first.shape[0] if first is not None else 1
    found: dict[str, int] = {}
    hooks = [module.register_forward_hook(
        lambda m, args, out, name=name: found.__setitem__(name, found.get(name, 0) + _macs(m, out, batch)))
        for name, module in layers]
    device = next(model.parameters()).device
    try:
        with untouched(model, device), torch.no_grad():
            call_model(model, inputs)
    finally:
        for h in hooks:
            h.remove()
    return {name: found.get(name, 0) for name, _ in layers}
