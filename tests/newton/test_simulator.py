import pytest
import torch

from secondorder.newton import (
    RidgeDPP,
    RidgeRegression,
    SimulatedCluster,
    SketchConfig,
    effective_dimension,
    gaussian_sketch,
    less_sketch,
    leverage_sketch,
    machine_generators,
    newton_solve,
    one_step_error,
    poisson_sketch,
    random_shards,
    simulate,
    subsampled_newton,
    surrogate_sketch,
    uniform_sketch,
)

from .helpers import F64, logistic_problem

SKETCHES = ["uniform", "leverage", "poisson", "gaussian", "less", "less-uniform", "surrogate", "surrogate-leverage"]


def single_machine_direction(problem, w, g, generator, m, sketch, scaled):
    """What one machine computes on its own, with the single-sketch functions and a dense solve."""
    a = problem.hessian_factor(w)
    lam = problem.lam
    d_lam = effective_dimension(a, lam)
    gamma = 1 - d_lam / m if scaled else 1.0
    make = {
        "uniform": lambda: uniform_sketch(a, m, generator),
        "leverage": lambda: leverage_sketch(a, m, lam, generator),
        "poisson": lambda: poisson_sketch(a, m, generator),
        "gaussian": lambda: gaussian_sketch(a, m, generator),
        "less": lambda: less_sketch(a, m, lam, generator),
        "less-uniform": lambda: less_sketch(a, m, lam, generator, distribution="uniform"),
        "surrogate": lambda: surrogate_sketch(a, m, lam, generator, dpp=RidgeDPP.from_factor(a, lam)),
        "surrogate-leverage": lambda: surrogate_sketch(a, m, lam, generator, distribution="leverage",
                                                       dpp=RidgeDPP.from_factor(a, lam)),
    }[sketch]
    rows = make().rows
    h = rows.T @ rows + gamma * lam * torch.eye(problem.dim, dtype=F64)
    return gamma * torch.linalg.solve(h, g), torch.linalg.slogdet(h).logabsdet


@pytest.mark.parametrize("sketch", SKETCHES)
@pytest.mark.parametrize("averaging", ["uniform", "determinantal"])
def test_batched_machines_equal_sequential_machines(sketch, averaging):
    problem = logistic_problem(n=50, d=4, seed=1)
    w = newton_solve(problem).w / 2
    g = problem.gradient(w)
    q, m = 5, 9
    scaled = sketch.startswith("surrogate") or sketch == "leverage"
    config = SketchConfig(m, sketch, averaging, scaled)
    step = SimulatedCluster(problem, machines=q, config=config, seed=7).direction(w, g)
    pairs = [single_machine_direction(problem, w, g, gen, m, sketch, scaled)
             for gen in machine_generators(7, q)]
    dirs = torch.stack([p for p, _ in pairs])
    logdets = torch.stack([ld for _, ld in pairs])
    if averaging == "uniform":
        expected = dirs.mean(0)
    else:
        a = torch.exp(logdets - logdets.max())
        expected = (a[:, None] * dirs).sum(0) / a.sum()
    torch.testing.assert_close(step.combined.direction, expected, rtol=1e-12, atol=1e-14)


def test_simulate_equals_sequential_iterations():
    problem = logistic_problem(n=50, d=4, seed=2)
    start = newton_solve(problem).w / 2
    q, m = 4, 8
    result = simulate(problem, machines=q, sketch_size=m, iterations=3, averaging="determinantal",
                      line_search=False, w0=start, seed=5)
    gens = machine_generators(5, q)  # each machine's stream continues across iterations
    w = start
    for t in range(3):
        g = problem.gradient(w)
        pairs = [single_machine_direction(problem, w, g, gen, m, "uniform", False) for gen in gens]
        dirs = torch.stack([p for p, _ in pairs])
        logdets = torch.stack([ld for _, ld in pairs])
        a = torch.exp(logdets - logdets.max())
        w = w - (a[:, None] * dirs).sum(0) / a.sum()
        torch.testing.assert_close(result.iterates[t + 1], w, rtol=1e-12, atol=1e-14)


def test_machines_are_independent_and_reproducible():
    gens_a, gens_b = machine_generators(0, 3), machine_generators(0, 3)
    draws_a = [torch.rand(4, generator=g) for g in gens_a]
    draws_b = [torch.rand(4, generator=g) for g in gens_b]
    assert all(torch.equal(x, y) for x, y in zip(draws_a, draws_b))
    assert not torch.equal(draws_a[0], draws_a[1])
    assert not torch.equal(draws_a[0], torch.rand(4, generator=machine_generators(1, 1)[0]))


@pytest.mark.parametrize("sketch, tol", [("surrogate", 1e-8), ("leverage", 1e-4), ("gaussian", 1e-3)])
def test_simulate_converges_with_line_search_from_zero(sketch, tol):
    problem = logistic_problem(n=120, d=5, lam=0.01, seed=3)
    result = simulate(problem, machines=20, sketch_size=15, iterations=12, sketch=sketch, seed=1)
    assert result.iterates.shape == (13, 5)
    assert result.relative_errors[0] == pytest.approx(1.0)
    assert float(result.relative_errors[-1]) < tol
    assert result.times.shape == (12,) and bool((result.times > 0).all())
    assert bool((result.step_sizes > 0).all())


def test_surrogate_one_step_error_has_no_bias_floor():
    problem = logistic_problem(n=200, d=4, lam=0.01, seed=2)
    w = newton_solve(problem).w / 2
    surrogate = one_step_error(problem, w, machines=1000, sketch_size=8, sketch="surrogate", seed=0)
    plain = one_step_error(problem, w, machines=1000, sketch_size=8, sketch="uniform", seed=0)
    assert surrogate.error < 0.1 < plain.error
    assert surrogate.effective_sample_size == pytest.approx(1000)


def test_thousand_machines_d30_is_fast():
    problem = logistic_problem(n=500, d=30, lam=0.01, seed=4)
    result = simulate(problem, machines=1000, sketch_size=90, iterations=2, seed=0,
                      averaging="determinantal", scaled_regularization=True)
    assert float(result.times.max()) < 5.0
    assert float(result.relative_errors[-1]) < float(result.relative_errors[0])


def test_bad_simulator_inputs():
    problem = logistic_problem()
    with pytest.raises(ValueError, match="sketch must be one of"):
        simulate(problem, machines=2, sketch_size=8, sketch="countsketch")
    with pytest.raises(ValueError, match="surrogate sketch is defined"):
        simulate(problem, machines=2, sketch_size=8, sketch="surrogate", scaled_regularization=False)
    with pytest.raises(ValueError, match="machines"):
        simulate(problem, machines=0, sketch_size=8)
    with pytest.raises(ValueError, match="must exceed the dimension"):
        simulate(problem, machines=2, sketch_size=4)
    with pytest.raises(ValueError, match="averaging"):
        simulate(problem, machines=2, sketch_size=8, averaging="mean")
    with pytest.raises(ValueError, match="iterations"):
        simulate(problem, machines=2, sketch_size=8, iterations=-1)
    zero_labels = RidgeRegression(problem.features, torch.zeros(problem.num_samples), 0.1)
    with pytest.raises(ValueError, match="optimum"):  # w = 0 is its exact minimizer
        one_step_error(zero_labels, torch.zeros(problem.dim), machines=2, sketch_size=8)


def test_sharded_machines_sketch_only_their_own_rows():
    problem = logistic_problem(n=40, d=3, seed=6)
    w = newton_solve(problem).w / 2
    g = problem.gradient(w)
    shards = random_shards(40, 4, seed=1)
    config = SketchConfig(8, "uniform", "determinantal", True, "estimated")
    step = SimulatedCluster(problem, machines=4, config=config, shards=shards, seed=3).direction(w, g)
    dirs, logdets, dims = [], [], []
    for shard, generator in zip(shards, machine_generators(3, 4)):
        a = problem.subset(shard).hessian_factor(w)  # rows of the shard, normalized by its size
        dims.append(effective_dimension(a, problem.lam))
        dirs.append((a, uniform_sketch(a, 8, generator).rows))
    d_lam = sum(dims) / 4  # "estimated": the machines' mean of their own d_lambda
    gamma = 1 - d_lam / 8
    for _, rows in dirs:
        h = rows.T @ rows + gamma * problem.lam * torch.eye(3, dtype=F64)
        dirs_k = gamma * torch.linalg.solve(h, g)
        logdets.append((dirs_k, torch.linalg.slogdet(h).logabsdet))
    a_k = torch.exp(torch.stack([ld for _, ld in logdets]) - max(ld for _, ld in logdets))
    expected = (a_k[:, None] * torch.stack([p for p, _ in logdets])).sum(0) / a_k.sum()
    torch.testing.assert_close(step.combined.direction, expected, rtol=1e-12, atol=1e-14)
    assert step.effective_dim == pytest.approx(d_lam, rel=1e-12)
    exact = SimulatedCluster(problem, machines=4, config=SketchConfig(8, effective_dim="exact"), shards=shards)
    assert exact.direction(w, g).effective_dim == pytest.approx(
        effective_dimension(problem.hessian_factor(w), problem.lam), rel=1e-12)


def test_random_shards_partition_and_bad_shards():
    shards = random_shards(10, 3, seed=0)
    assert sorted(torch.cat(shards).tolist()) == list(range(10)) and [len(s) for s in shards] == [4, 3, 3]
    with pytest.raises(ValueError, match="cannot split 2 rows into 3"):
        random_shards(2, 3)
    problem = logistic_problem(n=12, d=3)
    config = SketchConfig(8)
    with pytest.raises(ValueError, match="got 2 shards for 3 machines"):
        SimulatedCluster(problem, machines=3, config=config, shards=random_shards(12, 2))
    with pytest.raises(ValueError, match=r"shards \[1\] are empty"):
        SimulatedCluster(problem, machines=2, config=config, shards=[torch.arange(12), []])
    with pytest.raises(ValueError, match="1 rows are in none and 1 in several"):
        SimulatedCluster(problem, machines=2, config=config, shards=[torch.arange(6), torch.arange(5, 11)])
    with pytest.raises(ValueError, match="effective_dim must be one of"):
        SketchConfig(8, effective_dim="guess")


def test_local_cg_solves_the_local_systems_of_cholesky():
    problem = logistic_problem(n=80, d=4, lam=0.01, seed=7)
    w = newton_solve(problem).w / 2
    g = problem.gradient(w)
    chol = SimulatedCluster(problem, machines=6, config=SketchConfig(12, scaled_regularization=True), seed=2)
    cg = SimulatedCluster(problem, machines=6, seed=2,
                          config=SketchConfig(12, scaled_regularization=True, local_solver="cg", cg_iterations=12))
    torch.testing.assert_close(cg.direction(w, g).combined.direction, chol.direction(w, g).combined.direction,
                               rtol=1e-10, atol=1e-12)
    few = SimulatedCluster(problem, machines=6, seed=2, config=SketchConfig(12, local_solver="cg", cg_iterations=1))
    one_step = few.direction(w, g).combined.direction  # one CG step: the Cauchy point along g
    assert float((one_step - chol.direction(w, g).combined.direction).norm()) > 1e-3
    with pytest.raises(ValueError, match="determinantal averaging needs the local log-determinants"):
        SketchConfig(12, averaging="determinantal", local_solver="cg")
    with pytest.raises(ValueError, match="local_solver must be one of"):
        SketchConfig(12, local_solver="qr")


def test_subsampled_newton_is_one_machine():
    problem = logistic_problem(n=200, d=5, lam=0.01, seed=8)
    run = subsampled_newton(problem, sample_size=60, iterations=8, seed=4)
    same = simulate(problem, machines=1, sketch_size=60, iterations=8, seed=4)
    assert torch.equal(run.iterates, same.iterates)
    assert float(run.relative_errors[-1]) < 1e-3
