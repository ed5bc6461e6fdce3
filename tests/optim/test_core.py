"""The optimizer core: refresh-period aliases, eps, sparse gradients, refused steps, old checkpoints."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from secondorder.optim import AdaHessian, SophiaG, SophiaH
from tests.optim.trajectories import run


@pytest.mark.parametrize("case, old, new", [
    ("adahessian_every3_wd", {"update_each": 3}, {"curvature_every": 3}),
    ("sophia_h", {"k": 2}, {"curvature_every": 2}),
    ("sophia_g", {"k": 2}, {"curvature_every": 2}),
])
def test_former_refresh_period_names_warn_and_mean_the_same(case, old, new, monkeypatch):
    from tests.optim import trajectories

    make, kwargs = trajectories.CASES[case]
    base = {k: v for k, v in kwargs.items() if k not in ("update_each", "curvature_every", "k")}
    monkeypatch.setitem(trajectories.CASES, case, (make, {**base, **new}))
    expected = run(case, "float64")
    monkeypatch.setitem(trajectories.CASES, case, (make, {**base, **old}))
    with pytest.warns(DeprecationWarning, match="use curvature_every="):
        got = run(case, "float64")
    assert all(torch.equal(a, b) for a, b in zip(got["params"], expected["params"]))


@pytest.mark.parametrize("make, old", [(AdaHessian, "update_each"), (SophiaH, "k"), (SophiaG, "k")])
def test_deprecation_warning_names_the_callers_line(make, old):
    with pytest.warns(DeprecationWarning) as caught:
        make(nn.Linear(3, 2).parameters(), **{old: 2})
    assert caught[0].filename == __file__


@pytest.mark.parametrize("make", [AdaHessian, SophiaH, SophiaG])
@pytest.mark.parametrize("eps", [0.0, -1e-8])
def test_non_positive_eps_is_refused(make, eps):
    """eps = 0 made 0/0 = NaN on a coordinate with zero gradient and curvature (a dead ReLU)."""
    with pytest.raises(ValueError, match="eps must be positive"):
        make(nn.Linear(3, 2).parameters(), eps=eps)


class _Bag(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(10, 4, sparse=True)
        self.head = nn.Linear(4, 3)

    def forward(self, idx):
        return self.head(torch.tanh(self.embed(idx))).mean(1)


def _closure(model, logits: bool):
    idx, y = torch.tensor([[1, 2], [3, 4], [5, 6]]), torch.tensor([0, 1, 2])

    def evaluate():
        out = model(idx)
        loss = F.cross_entropy(out, y)
        return (loss, out) if logits else loss

    return evaluate


@pytest.mark.parametrize("make", [AdaHessian, SophiaH, SophiaG])
@pytest.mark.parametrize("refresh", [True, False])
def test_sparse_gradients_get_one_clear_error_and_change_nothing(make, refresh):
    model = _Bag()
    opt = make(model.parameters(), curvature_every=2)
    if not refresh:  # the second step is a gradient-only step
        model.embed.sparse = False
        opt.step(_closure(model, make is SophiaG))
        model.embed.sparse = True
    params = copy.deepcopy(list(model.parameters()))
    saved = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=r"gradient of parameter 0 \(shape \[10, 4\]\).* is sparse"):
        opt.step(_closure(model, make is SophiaG))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
    _assert_same_state(opt.state_dict(), saved)


def _assert_same_state(a, b):
    assert a["param_groups"] == b["param_groups"] and a["state"].keys() == b["state"].keys()
    for key in a["state"]:
        for name, value in a["state"][key].items():
            other = b["state"][key][name]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other
    extra, other = a["second_order"], b["second_order"]
    assert torch.equal(extra.pop("generator"), other.pop("generator")) and extra == other


@pytest.mark.parametrize("make", [AdaHessian, SophiaH])
def test_a_refused_step_leaves_the_probe_generator_as_it_was(make):
    """Issue 14's first case: after a NaN loss the run continues bitwise like one that never saw it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    twin = copy.deepcopy(model)
    X, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 2, (8,))
    opt, opt_twin = make(model.parameters(), curvature_every=1), make(twin.parameters(), curvature_every=1)
    opt.step(lambda: F.cross_entropy(model(X), y))
    opt_twin.step(lambda: F.cross_entropy(twin(X), y))
    with pytest.raises(FloatingPointError, match="parameters were not changed"):
        opt.step(lambda: F.cross_entropy(model(X), y) * float("nan"))
    for _ in range(3):
        opt.step(lambda: F.cross_entropy(model(X), y))
        opt_twin.step(lambda: F.cross_entropy(twin(X), y))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))


def test_a_state_saved_before_per_parameter_counters_resumes_identically():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    X, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 2, (8,))
    opt = AdaHessian(model.parameters(), lr=0.05, curvature_every=2)
    for _ in range(3):
        opt.step(lambda: F.cross_entropy(model(X), y))
    old = copy.deepcopy(opt.state_dict())
    for state in old["state"].values():  # the format written before issue 13
        del state["step"], state["curvature_step"]
    resumed_model = copy.deepcopy(model)
    resumed = AdaHessian(resumed_model.parameters(), lr=0.05, curvature_every=2)
    resumed.load_state_dict(old)
    for _ in range(3):
        opt.step(lambda: F.cross_entropy(model(X), y))
        resumed.step(lambda: F.cross_entropy(resumed_model(X), y))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), resumed_model.parameters()))


def test_each_parameter_counts_its_own_steps_for_its_bias_correction():
    """A parameter that first gets a gradient at step 3 is bias-corrected as at its step 1 (like torch's Adam)."""
    a, b = nn.Parameter(torch.ones(2, dtype=torch.float64)), nn.Parameter(torch.ones(2, dtype=torch.float64))
    opt = AdaHessian([a, b], lr=0.1)
    for _ in range(2):
        opt.step(lambda: (a * a).sum())
    opt.step(lambda: (a * a).sum() + (b * b).sum())
    assert opt.state[a]["step"] == 3 and opt.state[b]["step"] == 1
    fresh_b = nn.Parameter(torch.ones(2, dtype=torch.float64))
    AdaHessian([fresh_b], lr=0.1).step(lambda: (fresh_b * fresh_b).sum())
    assert torch.equal(b, fresh_b)
