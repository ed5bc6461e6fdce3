import math

import pytest
import torch

from secondorder.newton import (
    LocalSolves,
    combine,
    determinantal_weights,
    draw_sketches,
    local_directions,
    machine_generators,
    newton_solve,
    one_step_error,
    scaled_regularization,
    sketched_hessians,
)

from .helpers import F64, coherent_factor, gen, logistic_problem

LAM = 0.05


def ratio_within_standard_errors(numerators, denominators, target, k=5.0):
    """Is sum(num)/sum(den) within k delta-method standard errors of target (entrywise)?"""
    ratio = numerators.sum(0) / denominators.sum()
    resid = numerators - denominators[:, None] * ratio
    se = resid.std(0) / (denominators.mean() * numerators.shape[0] ** 0.5)
    return bool(((ratio - target).abs() <= k * se).all())


def test_determinantal_averaging_is_unbiased_for_newton_step():
    """E[det(Ĥ) Ĥ^{-1}] / E[det Ĥ] = H^{-1} for Poissonized row sampling (DM'19, Thm 1)."""
    a = coherent_factor()
    d = a.shape[1]
    grad = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    exact = torch.linalg.solve(a.T @ a + LAM * torch.eye(d, dtype=F64), grad)
    sketches = draw_sketches(a, 5, LAM, "poisson", machine_generators(3, 20000))
    solves = local_directions(sketched_hessians(sketches, LAM), grad)
    dets = torch.exp(solves.logdets - solves.logdets.max())
    assert ratio_within_standard_errors(solves.directions * dets[:, None], dets, exact)
    # uniform averaging of the same local steps is biased (power of the check)
    ones = torch.ones_like(dets)
    assert not ratio_within_standard_errors(solves.directions, ones, exact)


def test_local_directions_solve_and_logdet():
    h = torch.stack([torch.diag(torch.tensor([1.0, 2.0, 4.0], dtype=F64)), 3 * torch.eye(3, dtype=F64)])
    g = torch.tensor([1.0, 1.0, 1.0], dtype=F64)
    solves = local_directions(h, g)
    torch.testing.assert_close(solves.directions[0], torch.tensor([1.0, 0.5, 0.25], dtype=F64))
    torch.testing.assert_close(solves.logdets, torch.tensor([math.log(8.0), 3 * math.log(3.0)], dtype=F64))


def test_determinantal_weights_survive_huge_logdets():
    logdets = torch.tensor([5000.0, 5000.0 + math.log(3.0), -5000.0], dtype=F64)
    torch.testing.assert_close(determinantal_weights(logdets), torch.tensor([0.25, 0.75, 0.0], dtype=F64))


def test_combine_uniform_determinantal_and_scale():
    solves = LocalSolves(torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=F64),
                         torch.tensor([0.0, math.log(3.0)], dtype=F64))
    uni = combine(solves, "uniform", step_scale=0.5)
    torch.testing.assert_close(uni.direction, torch.tensor([0.25, 0.25], dtype=F64))
    assert uni.effective_sample_size == pytest.approx(2.0)
    det = combine(solves, "determinantal")
    torch.testing.assert_close(det.direction, torch.tensor([0.25, 0.75], dtype=F64))
    assert det.effective_sample_size == pytest.approx(1 / (0.25**2 + 0.75**2))


def test_scaled_regularization_rule():
    rule = scaled_regularization(0.1, 3.0, 12)
    assert rule.local_lam == pytest.approx(0.075) and rule.step_scale == pytest.approx(0.75)
    with pytest.raises(ValueError, match="increase the sketch size"):
        scaled_regularization(0.1, 12.0, 12)


def test_uniform_plateaus_while_determinantal_keeps_falling():
    problem = logistic_problem(n=200, d=4, lam=0.01, seed=2)
    w = newton_solve(problem).w / 2

    def mean_error(q, averaging):
        return sum(one_step_error(problem, w, machines=q, sketch_size=8, sketch="poisson",
                                  averaging=averaging, seed=s).error for s in range(3)) / 3

    uni_small, uni_large = mean_error(20, "uniform"), mean_error(2000, "uniform")
    det_small, det_large = mean_error(20, "determinantal"), mean_error(2000, "determinantal")
    assert uni_large > 0.7 * uni_small and uni_large > 0.5  # bias floor: more machines do not help
    assert det_large < 0.3 * det_small  # consistent: error keeps falling with q
    assert det_large < 0.1 * uni_large


def test_bad_combine_inputs():
    solves = LocalSolves(torch.ones(2, 3, dtype=F64), torch.zeros(2, dtype=F64))
    with pytest.raises(ValueError, match="averaging"):
        combine(solves, "median")
    with pytest.raises(ValueError, match="step_scale"):
        combine(solves, "uniform", step_scale=0.0)
    with pytest.raises(ValueError, match="not positive definite"):
        local_directions(-torch.eye(3, dtype=F64).expand(2, 3, 3), torch.ones(3, dtype=F64))
    with pytest.raises(ValueError, match=r"\[q, d, d\]"):
        local_directions(torch.eye(3, dtype=F64), torch.ones(3, dtype=F64))
    with pytest.raises(ValueError, match="at least one"):
        sketched_hessians([], 0.1)
    with pytest.raises(ValueError, match="finite"):
        determinantal_weights(torch.tensor([0.0, float("nan")], dtype=F64))


def test_sketched_hessians_pads_variable_sizes():
    a = coherent_factor()
    sketches = draw_sketches(a, 5, LAM, "poisson", [gen(0), gen(1), gen(2)])
    batched = sketched_hessians(sketches, LAM)
    for k, s in enumerate(sketches):
        torch.testing.assert_close(batched[k], s.gram + LAM * torch.eye(3, dtype=F64),
                                   rtol=1e-13, atol=1e-15)
