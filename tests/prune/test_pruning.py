"""prune / prune_gradually: exact sparsities, the OBS and OBD paths against their formulas, bad input
refused before anything changes, the model's mode and the global RNG untouched."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from secondorder import HessianOperator, MFACOperator, diagonal
from secondorder.prune import (
    PruningMask,
    mean_loss,
    obs_saliency,
    obs_update,
    prunable_parameters,
    prune,
    prune_gradually,
    select_pruned,
    target_count,
)


def make_problem(seed: int = 0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    g = torch.Generator().manual_seed(seed + 1)
    X, y = torch.randn(64, 6, generator=g), torch.randint(0, 3, (64,), generator=g)
    return model, [(X[i:i + 8], y[i:i + 8]) for i in range(0, 64, 8)]


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for _, p in prunable_parameters(model)])


def state(model: nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.7, 0.99])
def test_magnitude_hits_the_sparsity_exactly_with_ties(sparsity):
    model, data = make_problem()
    with torch.no_grad():  # many ties: magnitudes in {0.5, 1, 1.5}
        for _, p in prunable_parameters(model):
            p.copy_((torch.arange(p.numel()).reshape(p.shape) % 3 + 1) * 0.5 * (-1) ** torch.arange(p.numel())
                    .reshape(p.shape))
    before = flat(model)
    result = prune(model, F.cross_entropy, data, sparsity, method="magnitude")
    after = flat(model)
    n = target_count(sparsity, 72)
    assert int((after == 0).sum()) == n == result.num_pruned and result.sparsity == n / 72
    assert sum(x.pruned for x in result.layers) == n and [x.name for x in result.layers] == ["0.weight", "2.weight"]
    pruned = after == 0
    if 0 < n < 72:
        assert before[pruned].abs().max() <= before[~pruned].abs().min()  # the smallest magnitudes
    assert torch.equal(after[~pruned], before[~pruned])  # magnitude pruning does not move the others
    assert result.mask.holds(model) and torch.equal(~result.mask.flat(), pruned)
    assert result.loss_after == pytest.approx(mean_loss(model, F.cross_entropy, data))


def test_mfac_one_step_is_the_obs_formula():
    model, data = make_problem()
    names = [n for n, _ in prunable_parameters(model)]
    reference = copy.deepcopy(model)
    result = prune(model, F.cross_entropy, data, 0.5, method="mfac", steps=1, block_size=16, damping=1e-3)
    op = MFACOperator.from_model(reference, F.cross_entropy, data, 1e-3, params=names, block_size=16)
    w = flat(reference)
    Q = select_pruned(obs_saliency(w.double(), op.inverse_diagonal().double()), 36)
    want = (w.double() + obs_update(op, w, Q)).float()
    want[Q] = 0
    torch.testing.assert_close(flat(model), want, rtol=0, atol=0)
    assert result.num_pruned == 36 and result.steps == 1 and result.method == "mfac"
    assert [p.data_ptr() for p in model.parameters()] != []  # biases untouched:
    assert torch.equal(model[0].bias, reference[0].bias) and torch.equal(model[2].bias, reference[2].bias)


def test_mfac_increments_reach_the_target_with_nested_choices():
    model, data = make_problem()
    obs = prune(model, F.cross_entropy, data, 0.6, method="mfac", steps=4, block_size=16, damping=1e-4,
                rows="sample")
    assert obs.num_pruned == 43 and obs.steps == 4 and obs.mask.holds(model)
    assert int((flat(model) == 0).sum()) == 43 and obs.loss_before != obs.loss_after


def test_diagonal_uses_the_given_diagonal():
    model, data = make_problem()
    w = flat(model).double()
    rank = torch.randperm(72, generator=torch.Generator().manual_seed(5)).double() + 1
    h = 2 * rank / w.square()  # saliency w^2 h / 2 = rank: the 20 of least rank go
    result = prune(model, F.cross_entropy, data, 20 / 72, method="diagonal", hessian_diagonal=h)
    assert torch.equal(~result.mask.flat(), rank <= 20)
    by_name = {"0.weight": h[:48].reshape(8, 6), "2.weight": h[48:].reshape(3, 8)}
    again, _ = make_problem()
    assert prune(again, F.cross_entropy, data, 20 / 72, method="diagonal", hessian_diagonal=by_name).mask == result.mask


def test_diagonal_estimate_is_the_librarys():
    model, data = make_problem()
    names = [n for n, _ in prunable_parameters(model)]
    h = diagonal(HessianOperator(model, F.cross_entropy, data, names, seed=3), 8, method="xdiag", seed=3).value
    given = prune(copy.deepcopy(model), F.cross_entropy, data, 0.5, method="diagonal", hessian_diagonal=h)
    estimated = prune(model, F.cross_entropy, data, 0.5, method="diagonal", num_matvecs=8, seed=3)
    assert estimated.mask == given.mask


def test_masks_only_grow_and_gradual_schedule():
    model, data = make_problem()
    first = prune(model, F.cross_entropy, data, 0.3, method="magnitude")
    second = prune(model, F.cross_entropy, data, 0.6, method="mfac", mask=first.mask, steps=2, block_size=16)
    assert bool((~second.mask.flat())[~first.mask.flat()].all()) and second.num_pruned == 43
    with pytest.raises(ValueError, match="masks only grow"):
        prune(model, F.cross_entropy, data, 0.2, mask=second.mask)
    fresh, _ = make_problem()
    stages = prune_gradually(fresh, F.cross_entropy, data, (0.25, 0.5, 0.75), method="mfac", steps=2, block_size=16,
                             fine_tune_epochs=1)
    masks = [s.pruning.mask.flat() for s in stages]
    assert [s.pruning.num_pruned for s in stages] == [18, 36, 54]
    assert all(bool((~b)[~a].all()) for a, b in zip(masks, masks[1:])) and stages[-1].pruning.mask.holds(fresh)
    assert all(s.fine_tuned_loss is not None and len(s.fine_tune_losses) == 8 for s in stages)
    with pytest.raises(ValueError, match="increasing"):
        prune_gradually(fresh, F.cross_entropy, data, (0.5, 0.5))


def nan_gradient_loss(outputs, targets):
    """A finite loss whose gradient is NaN (0 * d sqrt(x)/dx at x = 0)."""
    return F.cross_entropy(outputs, targets) + (0 * (outputs - outputs.detach()).sqrt()).sum()


@pytest.mark.parametrize("kwargs, error, message", [
    ({"sparsity": 1.0}, ValueError, r"\[0, 1\)"),
    ({"sparsity": -0.1}, ValueError, r"\[0, 1\)"),
    ({"sparsity": float("nan")}, ValueError, r"\[0, 1\)"),
    ({"sparsity": True}, ValueError, r"\[0, 1\)"),
    ({"params": ["0.wieght"]}, ValueError, "did you mean '0.weight'"),
    ({"method": "random"}, ValueError, "method"),
    ({"steps": 0}, ValueError, "steps"),
    ({"damping": 0.0}, ValueError, "damping"),
    ({"hessian_diagonal": torch.ones(72)}, ValueError, "method='diagonal'"),
    ({"method": "diagonal", "hessian_diagonal": torch.ones(5)}, ValueError, "entries"),
    ({"loss_fn": nan_gradient_loss}, ValueError, "not finite"),
])
def test_bad_input_raises_before_anything_changes(kwargs, error, message):
    model, data = make_problem()
    before = state(model)
    args = {"sparsity": 0.5, "loss_fn": F.cross_entropy, "block_size": 16, **kwargs}
    with pytest.raises(error, match=message):
        prune(model, args.pop("loss_fn"), data, args.pop("sparsity"), **args)
    assert same(state(model), before)


def test_a_failure_at_a_later_increment_restores_the_weights():
    model, data = make_problem()
    before, calls = state(model), [0]

    def loss(outputs, targets):  # the second recomputation's gradients are NaN
        calls[0] += 1
        return nan_gradient_loss(outputs, targets) if calls[0] > 2 * len(data) else F.cross_entropy(outputs, targets)

    with pytest.raises(ValueError, match="not finite"):
        prune(model, loss, data, 0.5, method="mfac", steps=3, block_size=16)
    assert calls[0] > 2 * len(data) and same(state(model), before)


@pytest.mark.parametrize("method", ["magnitude", "mfac", "diagonal"])
@pytest.mark.parametrize("training", [True, False])
def test_mode_and_global_rng_untouched(method, training):
    model, data = make_problem()
    model.train(training)
    rng = torch.get_rng_state()
    prune(model, F.cross_entropy, data, 0.5, method=method, steps=2, block_size=16, num_matvecs=4)
    assert model.training is training and torch.equal(torch.get_rng_state(), rng)


def test_to_dict_is_json_ready():
    import json

    model, data = make_problem()
    result = prune(model, F.cross_entropy, data, 0.5, method="magnitude")
    saved = json.loads(json.dumps(result.to_dict()))
    assert saved["num_pruned"] == 36 and saved["layers"][0]["name"] == "0.weight" and "mask" not in saved
    assert isinstance(result.mask, PruningMask)
