"""The Hessian over training: tracker records against exact Hessians; checkpoints leave the model alone."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from secondorder.analysis import HessianTracker, hessian_evolution
from tests.cases import tiny_problem
from tests.references import dense_hessian


def test_tracker_matches_exact_hessians_along_training():
    model, data = tiny_problem(3)
    names = [n for n, _ in model.named_parameters()]
    tracker = HessianTracker(F.cross_entropy, data, trace_matvecs=60, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    exact = []
    for step in range(3):
        point = tracker(step, model)
        H = dense_hessian(model, F.cross_entropy, data, names)
        exact.append(H)
        assert abs(point.top_eigenvalue - float(torch.linalg.eigvalsh(H)[-1])) <= point.top_residual + 1e-10
        assert abs(point.trace - float(H.trace())) <= 4 * point.trace_stderr + 1e-9
        opt.zero_grad()
        sum(F.cross_entropy(model(X), y) * len(y) for X, y in data).div(32).backward()
        opt.step()
    assert [p.step for p in tracker.points] == [0, 1, 2]
    assert tracker.points[0].loss > tracker.points[2].loss  # training went somewhere


def test_evolution_over_checkpoints_equals_the_tracker(tmp_path):
    model, data = tiny_problem(4)
    first = copy.deepcopy(model.state_dict())
    second = {k: v * 1.3 for k, v in first.items()}
    torch.save(second, tmp_path / "second.pt")
    live = copy.deepcopy(model.state_dict())
    points = hessian_evolution(model, {10: first, 20: tmp_path / "second.pt"}, F.cross_entropy, data, seed=1)
    assert all(torch.equal(live[k], v) for k, v in model.state_dict().items())  # the caller's model untouched
    other = copy.deepcopy(model)
    other.load_state_dict(second)
    direct = HessianTracker(F.cross_entropy, data, seed=1)(20, other)
    assert points[1] == direct and points[0].step == 10
    with pytest.raises(ValueError, match="no checkpoints"):
        hessian_evolution(model, {}, F.cross_entropy, data)
    with pytest.raises(RuntimeError, match="size mismatch|Missing key|Unexpected key"):
        hessian_evolution(model, [(0, {"0.weight": torch.zeros(2, 2)})], F.cross_entropy, data)
