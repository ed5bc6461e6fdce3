"""Which weights are prunable, and masks kept through fine-tuning steps and state_dict round trips."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from secondorder.prune import PruningMask, finetune, masked, prunable_parameters


@pytest.fixture(autouse=True)
def _keep_global_rng():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        yield


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(1, 3, 3)
        self.norm = nn.BatchNorm1d(3)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(12, 4), nn.ReLU(), nn.Linear(4, 2))

    def forward(self, x):
        return self.head(self.norm(self.conv(x)))


def half_mask(model: nn.Module) -> PruningMask:
    return PruningMask({n: torch.arange(p.numel()).reshape(p.shape) % 2 == 0 for n, p in prunable_parameters(model)})


def test_default_prunable_are_linear_and_conv_weights():
    model = Net()
    assert [n for n, _ in prunable_parameters(model)] == ["conv.weight", "head.1.weight", "head.3.weight"]
    assert [n for n, _ in prunable_parameters(model, "head")] == ["head.1.weight", "head.3.weight"]
    assert [n for n, _ in prunable_parameters(model, ["conv", "head.3.bias"])] == ["conv.weight", "head.3.bias"]
    assert [n for n, _ in prunable_parameters(model, lambda n, p: p.ndim == 1)][0] == "conv.bias"
    with pytest.raises(ValueError, match="did you mean 'conv'"):
        prunable_parameters(model, "conv2")
    with pytest.raises(ValueError, match="holds no Linear/Conv weight"):
        prunable_parameters(model, "norm")
    with pytest.raises(ValueError, match="no parameters to prune"):
        prunable_parameters(nn.Sequential(nn.BatchNorm1d(3)))


@pytest.mark.parametrize("make", [
    lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-2),
    lambda ps: torch.optim.Adam(ps, lr=1e-2),
])
def test_masks_survive_fine_tuning_steps(make):
    model = Net()
    mask = half_mask(model)
    x, y = torch.randn(16, 1, 6), torch.randint(0, 2, (16,))
    losses = finetune(model, mask, nn.functional.cross_entropy, [(x[:8], y[:8]), (x[8:], y[8:])], epochs=3,
                      make_optimizer=make)
    assert len(losses) == 6 and mask.holds(model)
    kept = dict(model.named_parameters())["head.1.weight"][mask["head.1.weight"]]
    assert bool((kept != 0).all())
    opt = make(list(model.parameters()))
    with masked(model, mask, opt) as handle:  # the hooks: masked gradients are zero, steps keep the zeros
        nn.functional.cross_entropy(model(x), y).backward()
        for name, p in handle.mask.items():
            assert bool((dict(model.named_parameters())[name].grad[~p] == 0).all())
        opt.step()
        assert mask.holds(model)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()  # hooks removed: the pruned weights move again
    assert not mask.holds(model)


def test_state_dict_round_trip():
    model = Net()
    mask = half_mask(model)
    finetune(model, mask, nn.functional.cross_entropy, (torch.randn(8, 1, 6), torch.randint(0, 2, (8,))))
    buffer = io.BytesIO()
    torch.save({"state_dict": model.state_dict(), "masks": mask.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    again, restored = Net(), PruningMask.from_state_dict(saved["masks"])
    again.load_state_dict(saved["state_dict"])
    assert restored == mask and restored.holds(again) and restored.sparsity() == mask.sparsity()
    assert restored.layer_sparsity() == pytest.approx({n: 0.5 for n in mask.names}, abs=0.1)
    with masked(again, restored) as handle:
        state = handle.state_dict()
    assert set(state) == {"model", "masks"} and PruningMask(state["masks"]) == mask


def test_masks_are_checked_against_the_model():
    model = Net()
    with pytest.raises(ValueError, match="does not have"):
        PruningMask({"fc.weight": torch.ones(3)}).apply(model)
    with pytest.raises(ValueError, match="shapes"):
        PruningMask({"conv.weight": torch.ones(3)}).apply(model)
    with pytest.raises(ValueError, match="at least one"):
        PruningMask({})
