"""MACs per layer for the BOPs budget, counted by hooks against hand counts."""

from __future__ import annotations

import torch
from torch import nn

from secondorder.datasets import Mnist1dCNN
from secondorder.quant import layer_macs, quantize


def test_macs_of_convolutions_and_linear_layers():
    model = Mnist1dCNN()
    want = {"conv1": 40 * 16 * 1 * 5, "conv2": 40 * 32 * 16 * 5, "fc": 32 * 10}
    assert layer_macs(model, torch.randn(3, 1, 40)) == want
    assert layer_macs(quantize(model, {"conv2": 4}), torch.randn(3, 1, 40)) == want  # wrapped layers too
    grouped = nn.Sequential(nn.Conv2d(4, 8, 3, groups=2, padding=1), nn.Flatten(), nn.Linear(8 * 5 * 5, 2))
    assert layer_macs(grouped, torch.randn(2, 4, 5, 5)) == {"0": 8 * 25 * 2 * 9, "2": 200 * 2}


def test_model_left_as_it_was():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Dropout(0.5), nn.Linear(4, 2)).train()
    stats = model[1].running_mean.clone()
    rng = torch.get_rng_state()
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    assert layer_macs(model, x) == {"0": 12, "3": 8}
    assert model.training and torch.equal(model[1].running_mean, stats) and torch.equal(torch.get_rng_state(), rng)
    assert not model[0]._forward_hooks
