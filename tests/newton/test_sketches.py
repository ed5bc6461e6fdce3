import itertools

import pytest
import torch

from secondorder.newton import (
    RidgeDPP,
    effective_dimension,
    gaussian_sketch,
    less_sketch,
    leverage_sketch,
    poisson_sketch,
    ridge_leverage_scores,
    surrogate_sketch,
    uniform_sketch,
)

from .helpers import F64, coherent_factor, gen, within_standard_errors

LAM = 0.05


def draw(kind, a, m, g):
    if kind == "uniform":
        return uniform_sketch(a, m, g)
    if kind == "leverage":
        return leverage_sketch(a, m, LAM, g)
    if kind == "poisson":
        return poisson_sketch(a, m, g)
    if kind == "less":
        return less_sketch(a, m, LAM, g)
    return gaussian_sketch(a, m, g)


@pytest.mark.parametrize("kind", ["uniform", "leverage", "poisson", "gaussian", "less"])
def test_sketched_gram_is_unbiased(kind):
    a = coherent_factor()
    g = gen(11)
    grams = torch.stack([draw(kind, a, 5, g).gram for _ in range(3000)])
    assert within_standard_errors(grams, a.T @ a)
    # the same check rejects a mis-scaled sketch (power)
    assert not within_standard_errors(grams * 0.9, a.T @ a)


def test_sketch_shapes_and_scaling():
    a = coherent_factor(n=40, d=3)
    s = uniform_sketch(a, 7, gen(0))
    assert s.rows.shape == (7, 3) and s.indices.shape == (7,)
    torch.testing.assert_close(s.rows, a[s.indices] * (40 / 7) ** 0.5, rtol=0, atol=1e-15)
    assert gaussian_sketch(a, 7, gen(0)).indices is None


def test_sketches_are_reproducible_from_the_generator():
    a = coherent_factor()
    for kind in ["uniform", "leverage", "poisson", "gaussian", "less"]:
        assert torch.equal(draw(kind, a, 6, gen(3)).rows, draw(kind, a, 6, gen(3)).rows)


def test_less_rows_are_signed_weighted_sums_of_sampled_rows():
    a = coherent_factor(n=30, d=3)
    s = less_sketch(a, 5, LAM, gen(2), nonzeros=1)
    # one non-zero per row: each sketched row is +-a_i / sqrt(m p_i) for a sampled i
    p = ridge_leverage_scores(a, LAM) / ridge_leverage_scores(a, LAM).sum()
    candidates = a / torch.sqrt(5 * p)[:, None]
    for row in s.rows:
        dist = torch.minimum((candidates - row).norm(dim=1), (candidates + row).norm(dim=1))
        assert float(dist.min()) < 1e-12
    assert less_sketch(a, 5, LAM, gen(2)).rows.shape == (5, 3)
    with pytest.raises(ValueError, match="nonzeros"):
        less_sketch(a, 5, LAM, gen(2), nonzeros=0)


def test_less_inversion_bias_is_correctable_like_a_gaussian_sketch():
    """The LESS paper's claim: like a dense Gaussian sketch, and unlike uniform row sampling, the
    LESS inverse is nearly unbiased after the scaled-regularization correction
    gamma E[(A~^T A~ + gamma lam I)^-1], gamma = 1 - d_lam/m, for a coherent A."""
    a = coherent_factor(n=60, d=4, heavy=3, seed=1)
    m = 12
    exact = torch.linalg.inv(a.T @ a + LAM * torch.eye(4, dtype=F64))
    gamma = 1 - effective_dimension(a, LAM) / m
    g = gen(5)

    def bias(kind):
        inv = torch.stack([gamma * torch.linalg.inv(draw(kind, a, m, g).gram + gamma * LAM * torch.eye(4, dtype=F64))
                           for _ in range(2000)]).mean(0)
        return float((inv - exact).norm() / exact.norm())

    less, gaussian, uniform = bias("less"), bias("gaussian"), bias("uniform")
    assert less < 0.3 * uniform and less < 1.5 * gaussian, (less, gaussian, uniform)


def test_ridge_leverage_scores_sum_to_effective_dimension():
    a = coherent_factor()
    assert abs(float(ridge_leverage_scores(a, LAM).sum()) - effective_dimension(a, LAM)) < 1e-12


def dpp_exact_probabilities(a, lam):
    """P(T) = det(L_T) / det(I + L) for every subset T of the rows, L = AA^T / lam."""
    n = a.shape[0]
    kernel = a @ a.T / lam
    norm = float(torch.linalg.det(torch.eye(n, dtype=F64) + kernel))
    probs = {}
    for size in range(n + 1):
        for subset in itertools.combinations(range(n), size):
            sub = kernel[list(subset)][:, list(subset)]
            probs[subset] = max(float(torch.linalg.det(sub)) if size else 1.0, 0.0) / norm
    return probs


def test_dpp_sampler_matches_enumeration():
    a = torch.randn(5, 3, dtype=F64, generator=gen(4)) / 2
    lam = 0.2
    exact = dpp_exact_probabilities(a, lam)
    assert abs(sum(exact.values()) - 1) < 1e-12
    dpp = RidgeDPP.from_factor(a, lam)
    g = gen(7)
    draws = 6000
    samples = [tuple(dpp.sample(g).tolist()) for _ in range(draws)]
    counts = {s: 0 for s in exact}
    for s in samples:
        counts[s] += 1  # a repeated index or unsorted tuple would raise KeyError
    for subset, p in exact.items():
        if len(subset) > a.shape[1]:  # rank(L) = d: larger sets are impossible
            assert counts[subset] == 0
            continue
        se = max((p * (1 - p) / draws) ** 0.5, 1e-3)
        assert abs(counts[subset] / draws - p) <= 5 * se, subset
    # marginals P(i in T) = diag(K), K = L (I + L)^{-1}
    kernel = a @ a.T / lam
    marg = torch.diagonal(kernel @ torch.linalg.inv(torch.eye(5, dtype=F64) + kernel))
    indicators = torch.tensor([[float(i in s) for i in range(5)] for s in samples], dtype=F64)
    assert within_standard_errors(indicators, marg)
    sizes = torch.tensor([float(len(s)) for s in samples], dtype=F64)
    assert within_standard_errors(sizes, torch.tensor(effective_dimension(a, lam), dtype=F64))


def test_surrogate_sketch_inverse_is_exactly_unbiased():
    """(1 - d_lam/m) E[(Ã^T Ã + lam' I)^{-1}] = (A^T A + lam I)^{-1} (NeurIPS'20 surrogate identity)."""
    a = coherent_factor()
    m, d = 5, a.shape[1]
    d_lam = effective_dimension(a, LAM)
    gamma = 1 - d_lam / m
    eye = torch.eye(d, dtype=F64)
    target = torch.linalg.inv(a.T @ a + LAM * eye)
    dpp = RidgeDPP.from_factor(a, LAM)
    g = gen(21)
    invs = torch.stack([
        gamma * torch.linalg.inv(surrogate_sketch(a, m, LAM, g, dpp=dpp).gram + gamma * LAM * eye)
        for _ in range(4000)
    ])
    assert within_standard_errors(invs, target)
    # plain i.i.d. uniform sampling with lam is visibly biased on the same problem (power)
    plain = torch.stack([
        torch.linalg.inv(uniform_sketch(a, m, g).gram + LAM * eye) for _ in range(4000)
    ])
    assert not within_standard_errors(plain, target)


def test_surrogate_sketch_with_leverage_probabilities_is_unbiased():
    a = coherent_factor(seed=1)
    m, d = 5, a.shape[1]
    gamma = 1 - effective_dimension(a, LAM) / m
    eye = torch.eye(d, dtype=F64)
    g = gen(22)
    invs = torch.stack([
        gamma * torch.linalg.inv(
            surrogate_sketch(a, m, LAM, g, distribution="leverage").gram + gamma * LAM * eye)
        for _ in range(2000)
    ])
    assert within_standard_errors(invs, torch.linalg.inv(a.T @ a + LAM * eye))


def test_surrogate_rows_contain_the_dpp_part():
    a = coherent_factor()
    s = surrogate_sketch(a, 6, LAM, gen(0))
    k = s.dpp_indices.numel()
    assert torch.equal(s.indices[s.indices.numel() - k:], s.dpp_indices)
    assert s.rows.shape == (s.indices.numel(), 3)


@pytest.mark.parametrize("m", [2, 3])
def test_sketch_size_at_most_d_rejected(m):
    a = coherent_factor(d=3)
    for make in [lambda: uniform_sketch(a, m, gen(0)), lambda: leverage_sketch(a, m, LAM, gen(0)),
                 lambda: gaussian_sketch(a, m, gen(0)), lambda: poisson_sketch(a, m, gen(0)),
                 lambda: surrogate_sketch(a, m, LAM, gen(0))]:
        with pytest.raises(ValueError, match="must exceed the dimension"):
            make()


def test_bad_sketch_inputs():
    a = coherent_factor()
    with pytest.raises(ValueError, match="integer"):
        uniform_sketch(a, 5.5, gen(0))
    with pytest.raises(ValueError, match="distribution"):
        surrogate_sketch(a, 5, LAM, gen(0), distribution="gaussian")
    bad = a.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        uniform_sketch(bad, 5, gen(0))
