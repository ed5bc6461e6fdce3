"""Bit allocation (HAWQ-V2 Pareto DP, HAWQ-V3 ILP) against exhaustive enumeration."""

from __future__ import annotations

import dataclasses
import itertools
import math
import time

import numpy as np
import pytest

from secondorder.quant.allocation import (
    Allocation,
    allocate_bits,
    allocate_bits_ilp,
    brute_force,
    enumerate_configurations,
    interpolated_budget,
    pareto_frontier,
    uniform_cost,
)

BITS = (2, 3, 4, 8)


def random_instance(rng: np.random.Generator, n_layers: int, *, integer_costs: bool = False) -> dict:
    """Sensitivities, sizes, MACs and a latency table for ``n_layers`` layers with bits {2,3,4,8}."""
    names = [f"layer{i}" for i in range(n_layers)]

    def cost() -> float:
        return float(rng.integers(0, 6)) if integer_costs else float(rng.exponential())

    return {
        "sensitivity": {n: {b: cost() for b in BITS} for n in names},
        # integer costs with sizes 1..3: many exact ties in (size, cost), to check the tie-breaking
        "sizes": {n: int(rng.integers(1, 4 if integer_costs else 40)) for n in names},
        "macs": {n: int(rng.integers(1, 60)) for n in names},
        "latency": {n: {b: float(rng.uniform(0.1, 1.0)) for b in BITS} for n in names},
    }


def random_structure(rng: np.random.Generator, names: list[str]) -> dict:
    """Randomly no ties/pins, a tie group of 2-3 layers, and/or the first/last layer pinned."""
    out: dict = {}
    if rng.random() < 0.5:
        group = rng.choice(len(names), size=int(rng.integers(2, 4)), replace=False)
        out["tied"] = [tuple(names[i] for i in group)]
    if rng.random() < 0.5:
        out["pinned"] = {names[0]: 8} if rng.random() < 0.5 else {names[0]: 8, names[-1]: 4}
        if "tied" in out and {names[0], names[-1]} <= set(out["tied"][0]) and len(out["pinned"]) == 2:
            out["pinned"][names[-1]] = 8  # one tie group cannot hold two different pins
    return out


def span(configs: list[Allocation], key: str) -> tuple[float, float]:
    values = [getattr(a, key) for a in configs]
    return min(values), max(values)


def meets(a: Allocation, budgets: dict) -> bool:
    return all(getattr(a, key) <= budgets[q] for q, key in (("size", "size_bits"), ("bops", "bops"), ("latency", "latency")) if q in budgets)


def assert_meets(a: Allocation, structure: dict, size=None, bops=None, latency=None) -> None:
    """Every budget, tie and pin holds in ``a``."""
    if size is not None:
        assert a.size_bits <= size
    if bops is not None:
        assert a.bops <= bops
    if latency is not None:
        assert a.latency <= latency * (1 + 1e-9)
    for group in structure.get("tied", []):
        assert len({a.bits[n] for n in group}) == 1
    for name, b in structure.get("pinned", {}).items():
        assert a.bits[name] == b


# --------------------------------------------------------------------------- DP


@pytest.mark.parametrize("integer_costs", [False, True])
def test_dp_equals_brute_force_on_random_instances(integer_costs):
    rng = np.random.default_rng(1234 + integer_costs)
    for _ in range(25):
        inst = random_instance(rng, int(rng.integers(4, 7)), integer_costs=integer_costs)
        sens, sizes = inst["sensitivity"], inst["sizes"]
        structure = random_structure(rng, list(sens))
        low, high = span(enumerate_configurations(sens, sizes, **structure), "size_bits")
        budgets = [low, high, low + 1, int(rng.integers(low, high + 1)), float(rng.uniform(low, high))]
        for budget in budgets:
            dp = allocate_bits(sens, sizes, budget, **structure)
            oracle = brute_force(sens, sizes, size_budget_bits=budget, **structure)
            # the same summation and the same tie-breaking: identical, even with integer (tied) costs
            assert dp.sensitivity == oracle.sensitivity
            assert dp.bits == oracle.bits
            assert dp.size_bits == oracle.size_bits
            assert dp.solver == "dp" and oracle.solver == "brute-force"
            assert_meets(dp, structure, size=budget)


def test_dp_tie_breaking_prefers_smaller_size_then_lexicographic_bits():
    sizes = {"a": 10, "b": 10}
    flat = {"a": {2: 0.0, 8: 0.0}, "b": {2: 0.0, 8: 0.0}}
    assert allocate_bits(flat, sizes, 1000).bits == {"a": 2, "b": 2}  # equal cost: smaller size
    swap = {"a": {2: 1.0, 8: 0.0}, "b": {2: 1.0, 8: 0.0}}  # (2,8) and (8,2): same cost, same size
    for solve in (allocate_bits, lambda s, n, b: brute_force(s, n, size_budget_bits=b)):
        assert solve(swap, sizes, 100).bits == {"a": 2, "b": 8}


def test_dp_tie_breaking_across_different_partial_solutions():
    # (1, 4, 1) and (2, 1, 3) both cost 3 at 13 bits; their partial solutions differ in size and cost
    sens = {"a": {1: 2.0, 2: 0.0, 4: 3.0}, "b": {1: 3.0, 4: 0.0}, "c": {1: 1.0, 3: 0.0}}
    sizes = {"a": 4, "b": 2, "c": 1}
    assert allocate_bits(sens, sizes, 13).bits == {"a": 1, "b": 4, "c": 1}
    assert brute_force(sens, sizes, size_budget_bits=13).bits == {"a": 1, "b": 4, "c": 1}


def test_dp_equals_brute_force_with_per_layer_candidate_sets_and_many_ties():
    rng = np.random.default_rng(77)
    for _ in range(120):
        names = "abcd"[: int(rng.integers(2, 5))]
        sens = {
            n: {int(b): float(rng.integers(0, 4)) for b in rng.choice([1, 2, 3, 4, 8], int(rng.integers(1, 4)), replace=False)}
            for n in names
        }
        sizes = {n: int(rng.integers(0, 5)) for n in names}
        low, high = span(enumerate_configurations(sens, sizes), "size_bits")
        for budget in {low, (low + high) // 2, high, int(rng.integers(low, high + 1))}:
            oracle = brute_force(sens, sizes, size_budget_bits=budget)
            assert allocate_bits(sens, sizes, budget) == dataclasses.replace(oracle, solver="dp")


def test_dp_is_exact_beyond_a_table_the_size_of_the_budget():
    # sizes that share no factor: a DP over size in coarse units would round them
    sens = {"a": {4: 3.0, 8: 0.0}, "b": {4: 2.0, 8: 0.0}, "c": {4: 2.0, 8: 0.0}}
    sizes = {"a": 1_000_003, "b": 500_009, "c": 500_011}
    budget = 4 * (1_000_003 + 500_009 + 500_011) + 4 * 1_000_003  # exactly 'a' at 8 bits
    assert allocate_bits(sens, sizes, budget).bits == {"a": 8, "b": 4, "c": 4}
    assert allocate_bits(sens, sizes, budget - 1).bits == {"a": 4, "b": 8, "c": 4}


# --------------------------------------------------------------------------- ILP


CONSTRAINT_SETS = [c for r in range(4) for c in itertools.combinations(("size", "bops", "latency"), r)]


@pytest.mark.parametrize("constrained", CONSTRAINT_SETS, ids=lambda c: "+".join(c) or "none")
def test_ilp_equals_brute_force_with_every_combination_of_budgets(constrained):
    rng = np.random.default_rng([7, *(len(c) for c in constrained), CONSTRAINT_SETS.index(constrained)])
    solved = infeasible = 0
    for _ in range(8):
        inst = random_instance(rng, int(rng.integers(4, 6)))
        data = {"macs": inst["macs"], "latency": inst["latency"]}
        if rng.random() < 0.3:
            data["act_bits"] = {next(iter(inst["sizes"])): 8}
        structure = random_structure(rng, list(inst["sizes"]))
        configs = enumerate_configurations(inst["sensitivity"], inst["sizes"], **data, **structure)
        budgets = {}
        for quantity, key in (("size", "size_bits"), ("bops", "bops"), ("latency", "latency")):
            if quantity in constrained:
                low, high = span(configs, key)
                budgets[quantity] = low + rng.uniform(0.05, 0.8) * (high - low)
        kwargs = dict(
            size_budget_bits=budgets.get("size"), bops_budget=budgets.get("bops"),
            latency_budget=budgets.get("latency"), **data, **structure,
        )
        try:
            oracle = brute_force(inst["sensitivity"], inst["sizes"], **kwargs)
        except ValueError as error:
            assert "no configuration meets all budgets together" in str(error)
            with pytest.raises(ValueError, match="no configuration meets all budgets together"):
                allocate_bits_ilp(inst["sensitivity"], inst["sizes"], **kwargs)
            infeasible += 1
            continue
        ilp = allocate_bits_ilp(inst["sensitivity"], inst["sizes"], **kwargs)
        assert ilp.sensitivity == pytest.approx(oracle.sensitivity, rel=1e-12, abs=1e-12)
        near_optimal = [a for a in configs if meets(a, budgets) and a.sensitivity <= oracle.sensitivity * (1 + 1e-9)]
        if len(near_optimal) == 1:  # the optimum is unique: the same bits
            assert ilp.bits == oracle.bits
            assert ilp.bops == oracle.bops and ilp.latency == oracle.latency
        assert ilp.solver == "milp"
        assert_meets(ilp, structure, **budgets)
        assert_meets(oracle, structure, **budgets)
        solved += 1
    assert solved >= 4


def test_ilp_respects_act_bits_in_bops():
    sens = {"a": {4: 1.0, 8: 0.0}, "b": {4: 1.0, 8: 0.5}}
    sizes, macs = {"a": 10, "b": 10}, {"a": 100, "b": 100}
    # weights and activations follow each other: a@8 costs 6400 BOPs, b@8 6400, a@4 / b@4 1600
    follow = allocate_bits_ilp(sens, sizes, macs=macs, bops_budget=8000)
    assert follow.bits == {"a": 8, "b": 4} and follow.bops == 8000.0
    # activations of 'a' fixed at 2 bits: a@8 costs only 1600, so both fit at 8 bits
    fixed = allocate_bits_ilp(sens, sizes, macs=macs, act_bits={"a": 2}, bops_budget=8000)
    assert fixed.bits == {"a": 8, "b": 8} and fixed.bops == 1600.0 + 6400.0


# --------------------------------------------------------------------------- Pareto frontier


def brute_force_frontier(configs: list[Allocation]) -> list[tuple[int, float]]:
    points = sorted({(a.size_bits, a.sensitivity) for a in configs})
    frontier, best = [], math.inf
    for size, cost in points:
        if cost < best:
            frontier.append((size, cost))
            best = cost
    return frontier


def test_pareto_frontier_is_the_brute_force_frontier():
    rng = np.random.default_rng(99)
    for _ in range(15):
        inst = random_instance(rng, int(rng.integers(4, 7)), integer_costs=bool(rng.random() < 0.3))
        sens, sizes = inst["sensitivity"], inst["sizes"]
        structure = random_structure(rng, list(sens))
        frontier = pareto_frontier(sens, sizes, **structure)
        configs = enumerate_configurations(sens, sizes, **structure)
        sizes_on, costs_on = [a.size_bits for a in frontier], [a.sensitivity for a in frontier]
        assert all(x < y for x, y in zip(sizes_on, sizes_on[1:]))
        assert all(x > y for x, y in zip(costs_on, costs_on[1:]))
        for a in configs:  # every configuration is dominated by (or on) the frontier
            assert any(f.size_bits <= a.size_bits and f.sensitivity <= a.sensitivity for f in frontier)
        assert list(zip(sizes_on, costs_on)) == brute_force_frontier(configs)
        for a in frontier:
            assert_meets(a, structure)
            assert allocate_bits(sens, sizes, a.size_bits, **structure) == a


# --------------------------------------------------------------------------- budgets, ties, pins


def hawq_like(n_layers: int = 6) -> tuple[dict, dict, dict]:
    """Omega strictly decreasing in bits (more bits, less damage), bits {4, 8}."""
    rng = np.random.default_rng(5)
    names = [f"conv{i}" for i in range(n_layers)]
    traces = rng.lognormal(0.0, 1.0, n_layers)
    sens = {n: {4: float(t * 4.0**-4), 8: float(t * 4.0**-8)} for n, t in zip(names, traces)}
    sizes = {n: int(rng.integers(100, 1000)) for n in names}
    macs = {n: int(rng.integers(1000, 9000)) for n in names}
    return sens, sizes, macs


def test_interpolated_budgets_at_the_ends_give_uniform_allocations():
    sens, sizes, macs = hawq_like()
    (size4, bops4), (size8, bops8) = uniform_cost(sizes, 4, macs), uniform_cost(sizes, 8, macs)
    all4, all8 = {n: 4 for n in sens}, {n: 8 for n in sens}
    for alpha, expected in ((0.0, all4), (1.0, all8)):
        size_limit = interpolated_budget(size4, size8, alpha)
        bops_limit = interpolated_budget(bops4, bops8, alpha)
        assert allocate_bits(sens, sizes, size_limit).bits == expected
        assert allocate_bits_ilp(sens, sizes, size_budget_bits=size_limit).bits == expected
        assert allocate_bits_ilp(sens, sizes, macs=macs, bops_budget=bops_limit).bits == expected
    middle = allocate_bits_ilp(sens, sizes, size_budget_bits=interpolated_budget(size4, size8, 0.5))
    assert size4 < middle.size_bits <= (size4 + size8) / 2 and len(set(middle.bits.values())) == 2


def test_interpolated_budget_and_uniform_cost_values():
    assert interpolated_budget(100.0, 200.0, 0.25) == 125.0
    for alpha in (-0.1, 1.5, math.nan):
        with pytest.raises(ValueError, match=r"alpha must be a real number in \[0, 1\]"):
            interpolated_budget(0.0, 1.0, alpha)
    sizes, macs = {"a": 10, "b": 20}, {"a": 3, "b": 5}
    assert uniform_cost(sizes, 4) == (120, None)
    assert uniform_cost(sizes, 4, macs) == (120, float(3 * 16 + 5 * 16))
    assert uniform_cost(sizes, 4, macs, act_bits={"b": 8}) == (120, float(3 * 16 + 5 * 32))


def test_ties_and_pins_hold_against_the_unconstrained_optimum():
    sens = {
        "first": {4: 5.0, 8: 0.0},  # wants 8, pinned at 4
        "down": {4: 0.0, 8: 3.0},  # wants 4, tied with 'main'
        "main": {4: 9.0, 8: 0.0},  # wants 8
        "last": {4: 0.0, 8: 1.0},  # wants 4, pinned at 8
    }
    sizes = {n: 10 for n in sens}
    structure = {"pinned": {"first": 4, "last": 8}, "tied": [("main", "down")]}
    expected = {"first": 4, "down": 8, "main": 8, "last": 8}
    results = [
        allocate_bits(sens, sizes, 1000, **structure),
        allocate_bits_ilp(sens, sizes, size_budget_bits=1000, **structure),
        brute_force(sens, sizes, size_budget_bits=1000, **structure),
        pareto_frontier(sens, sizes, **structure)[-1],
    ]
    for a in results:
        assert a.bits == expected
        assert a.sensitivity == 5.0 + 3.0 + 0.0 + 1.0
    assert len(enumerate_configurations(sens, sizes, **structure)) == 2
    # tight: 'main'+'down' must go to 4 together
    tight = allocate_bits(sens, sizes, 40 + 40 + 40 + 80 + 79, **structure)  # one short of main+down at 8
    assert tight.bits == {"first": 4, "down": 4, "main": 4, "last": 8}


# --------------------------------------------------------------------------- infeasibility


def test_infeasible_budgets_state_the_smallest_feasible_value():
    sens = {"a": {4: 1.0, 8: 0.0}, "b": {4: 1.0, 8: 0.0}, "c": {2: 2.0, 8: 0.0}}
    sizes = {"a": 100, "b": 50, "c": 10}
    smallest = 4 * 100 + 4 * 50 + 2 * 10  # 620
    for solve in (
        lambda **k: allocate_bits(sens, sizes, 619, **k),
        lambda **k: allocate_bits_ilp(sens, sizes, size_budget_bits=619, **k),
        lambda **k: brute_force(sens, sizes, size_budget_bits=619, **k),
    ):
        with pytest.raises(ValueError, match=rf"size budget 619 bits is below the smallest feasible model, {smallest} bits"):
            solve()
        with pytest.raises(ValueError, match=rf"smallest feasible model, {smallest + 400} bits"):
            solve(pinned={"a": 8})
        with pytest.raises(ValueError, match=rf"smallest feasible model, {smallest + 600} bits"):
            solve(pinned={"b": 8}, tied=[("a", "b")])
    assert allocate_bits(sens, sizes, smallest).bits == {"a": 4, "b": 4, "c": 2}
    macs = {"a": 1, "b": 2, "c": 3}  # smallest BOPs: 16 + 32 + 12
    latency = {"a": {4: 2.0, 8: 1.0}, "b": {4: 1.0, 8: 3.0}, "c": {2: 0.5, 8: 0.25}}  # fastest: 1 + 1 + 0.25
    for solve in (allocate_bits_ilp, brute_force):
        with pytest.raises(ValueError, match=r"BOPs budget 59 is below the smallest achievable BOPs, 60") as info:
            solve(sens, sizes, macs=macs, bops_budget=59, latency=latency, latency_budget=2.0)
        assert "latency budget 2 is below the smallest achievable latency, 2.25" in str(info.value)
        # each alone achievable, not together: size wants 'a' at 4 bits, latency at 8
        with pytest.raises(ValueError, match="no configuration meets all budgets together") as info:
            solve(sens, sizes, size_budget_bits=smallest, latency=latency, latency_budget=2.5)
        assert f"size budget {smallest} bits (smallest alone: {smallest})" in str(info.value)
        assert "latency budget 2.5 (smallest alone: 2.25)" in str(info.value)


# --------------------------------------------------------------------------- bad input


GOOD = {"a": {4: 1.0, 8: 0.0}, "b": {4: 1.0, 8: 0.0}, "c": {4: 1.0, 8: 0.0}}
SIZES = {"a": 1, "b": 2, "c": 3}


@pytest.mark.parametrize(
    ("sensitivity", "sizes", "kwargs", "message"),
    [
        ({**GOOD, "a": {0: 1.0}}, SIZES, {}, r"sensitivity\['a'\]: bit width 0 is not an integer in 1..32"),
        ({**GOOD, "b": {33: 1.0}}, SIZES, {}, r"sensitivity\['b'\]: bit width 33 is not an integer in 1..32"),
        ({**GOOD, "c": {4.0: 1.0}}, SIZES, {}, r"sensitivity\['c'\]: bit width 4.0 is not an integer in 1..32"),
        ({**GOOD, "c": {True: 1.0}}, SIZES, {}, r"bit width True is not an integer"),
        ({**GOOD, "a": {4: math.nan}}, SIZES, {}, r"sensitivity\['a'\]\[4\] must be a finite real number"),
        ({**GOOD, "a": {4: math.inf}}, SIZES, {}, r"must be a finite real number"),
        ({**GOOD, "a": {}}, SIZES, {}, r"sensitivity\['a'\] must be a non-empty dict"),
        ({}, {}, {}, "sensitivity has no layers"),
        (GOOD, {"a": 1, "b": 2, "d": 4}, {}, r"same layer names as sensitivity; missing: \['c'\], extra: \['d'\]"),
        (GOOD, {**SIZES, "b": -1}, {}, r"sizes\['b'\] must be non-negative"),
        (GOOD, {**SIZES, "b": 2.5}, {}, r"sizes\['b'\] must be a non-negative int"),
        (GOOD, SIZES, {"pinned": {"x": 4}}, r"pinned names unknown layers \['x'\]; valid layer names: \['a', 'b', 'c'\]"),
        (GOOD, SIZES, {"pinned": {"a": 2}}, r"pinned\['a'\] = 2 is not a candidate bit width .* candidates: \[4, 8\]"),
        (GOOD, SIZES, {"pinned": {"a": 64}}, r"pinned\['a'\]: bit width 64 is not an integer in 1..32"),
        (GOOD, SIZES, {"tied": [("a", "zz")]}, r"tied\[0\] names unknown layers \['zz'\]; valid layer names"),
        (GOOD, SIZES, {"tied": [("a", "b"), ("b", "c")]}, r"layer 'b' of tied\[1\] is also in tied\[0\]"),
        (GOOD, SIZES, {"tied": [("a", "a")]}, r"layer 'a' of tied\[0\] is twice in that group"),
        (GOOD, SIZES, {"tied": ["ab"]}, r"tied\[0\] must be a non-empty tuple of layer names"),
        ({**GOOD, "c": {2: 1.0, 8: 0.0}}, SIZES, {"tied": [("a", "c")]}, "tied layers must have the same candidate"),
        (GOOD, SIZES, {"tied": [("a", "b")], "pinned": {"a": 4, "b": 8}}, "tied layers are pinned to different"),
    ],
)
def test_bad_input_raises_with_a_clear_message(sensitivity, sizes, kwargs, message):
    for solve in (
        lambda: allocate_bits(sensitivity, sizes, 100, **kwargs),
        lambda: pareto_frontier(sensitivity, sizes, **kwargs),
        lambda: allocate_bits_ilp(sensitivity, sizes, size_budget_bits=100, **kwargs),
        lambda: brute_force(sensitivity, sizes, size_budget_bits=100, **kwargs),
        lambda: enumerate_configurations(sensitivity, sizes, **kwargs),
    ):
        with pytest.raises(ValueError, match=message):
            solve()


def test_budgets_need_their_data_and_the_data_must_fit():
    latency = {n: {4: 1.0, 8: 2.0} for n in GOOD}
    macs = {n: 1 for n in GOOD}
    cases = [
        ({"bops_budget": 10}, "bops_budget needs macs"),
        ({"latency_budget": 1.0}, "latency_budget needs latency"),
        ({"act_bits": {"a": 8}}, "act_bits only enter the BOPs, which need macs"),
        ({"macs": {"a": 1}}, r"macs must have the same layer names as sensitivity; missing: \['b', 'c'\]"),
        ({"macs": macs, "act_bits": {"q": 8}}, r"act_bits names unknown layers \['q'\]"),
        ({"latency": {**latency, "c": {4: 1.0}}}, r"latency\['c'\] has no entry for candidate bit widths \[8\]"),
        ({"size_budget_bits": math.nan}, "size_budget_bits must be a finite real number"),
    ]
    for kwargs, message in cases:
        for solve in (allocate_bits_ilp, brute_force):
            with pytest.raises(ValueError, match=message):
                solve(GOOD, SIZES, **kwargs)
    with pytest.raises(ValueError, match="size_budget_bits must be a finite real number"):
        allocate_bits(GOOD, SIZES, math.inf)


def test_enumeration_refuses_more_than_a_million_configurations():
    sens = {f"l{i}": {b: 0.0 for b in BITS} for i in range(10)}  # 4**10 = 1048576
    sizes = {n: 1 for n in sens}
    with pytest.raises(ValueError, match="1048576 configurations is more than the 1000000"):
        enumerate_configurations(sens, sizes)
    with pytest.raises(ValueError, match="1048576 configurations"):
        brute_force(sens, sizes, size_budget_bits=100)
    pins = {f"l{i}": 2 for i in range(6)}
    assert len(enumerate_configurations(sens, sizes, pinned=pins)) == 4**4  # pins shrink it
    assert len(enumerate_configurations(sens, sizes, tied=[("l0", "l1", "l2"), ("l3", "l4", "l5", "l6", "l7")])) == 4**4


# --------------------------------------------------------------------------- scale and the result type


def test_large_instance_dp_is_fast_and_matches_the_ilp():
    rng = np.random.default_rng(2021)
    names = [f"block{i}.conv" for i in range(50)]
    sizes = {n: int(rng.integers(500_000, 2_000_000)) for n in names}
    sens = {}
    for n in names:
        trace = rng.lognormal(0.0, 2.0)
        sens[n] = {b: float(trace * 4.0**-b * rng.uniform(0.8, 1.2)) for b in BITS}
    low, high = uniform_cost(sizes, 2)[0], uniform_cost(sizes, 8)[0]
    structure = {"pinned": {names[0]: 8, names[-1]: 8}, "tied": [(names[3], names[5])]}
    for alpha in (0.2, 0.5, 0.8):
        budget = interpolated_budget(low, high, alpha)
        start = time.perf_counter()
        dp = allocate_bits(sens, sizes, budget, **structure)
        elapsed = time.perf_counter() - start
        assert elapsed < 1.0, f"DP took {elapsed:.2f} s"
        ilp = allocate_bits_ilp(sens, sizes, size_budget_bits=budget, **structure)
        assert dp.sensitivity == pytest.approx(ilp.sensitivity, rel=1e-9)
        assert dp.sensitivity <= ilp.sensitivity  # the DP is exact
        assert_meets(dp, structure, size=budget)
        assert_meets(ilp, structure, size=budget)


def test_allocation_properties():
    a = allocate_bits(GOOD, SIZES, 4 * 6)
    assert a.bits == {"a": 4, "b": 4, "c": 4}
    assert a.size_bits == 24 and a.size_bytes == 3.0 and a.average_bits == 4.0
    assert a.bops is None and a.latency is None and a.num_weights == 6
    with pytest.raises(AttributeError):
        a.sensitivity = 0.0  # frozen
    assert math.isnan(allocate_bits(GOOD, {n: 0 for n in GOOD}, 0).average_bits)
