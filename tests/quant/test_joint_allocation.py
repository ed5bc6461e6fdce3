"""Joint weight + activation bit allocation (issue 19) against exhaustive enumeration."""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np
import pytest

from secondorder.quant.allocation import (
    Allocation,
    allocate_bits_ilp,
    allocate_joint,
    brute_force,
    brute_force_joint,
    enumerate_configurations,
    enumerate_joint,
    joint_frontier,
    pareto_frontier,
)

WEIGHT_SETS = ((2, 4), (4, 8), (2, 4, 8))
ACT_SETS = ((4, 8), (6, 8))
MAX_COUNT = 1500  # configurations per random instance: enumerated many times, keep it quick


def count(options_per_item: list[int]) -> int:
    return math.prod(options_per_item)


def random_joint(rng: np.random.Generator, *, integer_costs: bool = False, fixed_acts: bool = False) -> dict:
    """2-8 layers, 2-3 weight x 2 activation candidates, random ties and pins; at most MAX_COUNT configurations."""
    n = int(rng.integers(2, 9))
    names = [f"l{i}" for i in range(n)]
    wset, aset = WEIGHT_SETS[rng.integers(len(WEIGHT_SETS))], ACT_SETS[rng.integers(len(ACT_SETS))]

    def cost() -> float:
        return float(rng.integers(0, 4)) if integer_costs else float(rng.exponential())

    inst: dict = {
        "weight_sensitivity": {m: {b: cost() for b in wset} for m in names},
        "act_sensitivity": {m: {a: cost() for a in aset} for m in names},
        "sizes": {m: int(rng.integers(1, 4 if integer_costs else 40)) for m in names},
        "macs": {m: int(rng.integers(1, 60)) for m in names},
    }
    structure: dict = {}
    if n >= 3 and rng.random() < 0.5:
        group = rng.choice(n, size=int(rng.integers(2, 4)), replace=False)
        structure["tied"] = [tuple(names[i] for i in group)]
    if rng.random() < 0.4:
        structure["pinned"] = {names[0]: max(wset)}
    if fixed_acts:
        structure["act_bits"] = int(rng.choice(aset))
    elif rng.random() < 0.4:
        structure["act_pinned"] = {names[-1]: max(aset)}
    # pin more weights (then activations), from the last layer down, until the enumeration is small
    tied = set(structure.get("tied", [()])[0])
    for name in reversed(names):
        if enumerated_count(inst, structure) <= MAX_COUNT:
            break
        if name not in tied:
            structure.setdefault("pinned", {})[name] = min(wset)
            if enumerated_count(inst, structure) > MAX_COUNT and "act_bits" not in structure:
                structure.setdefault("act_pinned", {})[name] = min(aset)
    assert enumerated_count(inst, structure) <= MAX_COUNT
    return {**inst, "structure": structure}


def enumerated_count(inst: dict, structure: dict) -> int:
    """The number of configurations the pins and ties allow (counted here, independently)."""
    names = list(inst["sizes"])
    group_of = {m: g for g in structure.get("tied", []) for m in g}
    fixed_act = structure.get("act_bits")
    per_item = []
    for m in names:
        group = group_of.get(m, (m,))
        if sorted(group, key=names.index)[0] != m:
            continue
        w_pins = {structure.get("pinned", {}).get(x) for x in group} - {None}
        a_pins = {structure.get("act_pinned", {}).get(x) for x in group} - {None}
        n_w = 1 if w_pins else len(inst["weight_sensitivity"][m])
        n_a = 1 if a_pins or fixed_act is not None else len(inst["act_sensitivity"][m])
        per_item.append(n_w * n_a)
    return count(per_item)


def args(inst: dict) -> tuple:
    return inst["weight_sensitivity"], inst["act_sensitivity"], inst["sizes"], inst["macs"]


def assert_structure(a: Allocation, structure: dict) -> None:
    """Ties share both bit widths; pins and fixed activations hold."""
    assert a.act_bits is not None
    for group in structure.get("tied", []):
        assert len({a.bits[m] for m in group}) == 1 and len({a.act_bits[m] for m in group}) == 1
    for m, b in structure.get("pinned", {}).items():
        assert a.bits[m] == b
    for m, b in structure.get("act_pinned", {}).items():
        assert a.act_bits[m] == b
    if "act_bits" in structure:
        assert set(a.act_bits.values()) == {structure["act_bits"]}


def span(configs: list[Allocation], key: str) -> tuple[float, float]:
    values = [getattr(a, key) for a in configs]
    return min(values), max(values)


def pareto_set(configs: list[Allocation], key: str) -> list[Allocation]:
    """Non-dominated (key, cost) points of the enumeration; the first (lexicographic) config at each."""
    frontier: list[Allocation] = []
    for a in sorted(configs, key=lambda a: (getattr(a, key), a.sensitivity)):  # stable: lexicographic within
        if not frontier or a.sensitivity < frontier[-1].sensitivity:
            frontier.append(a)
    return frontier


# --------------------------------------------------------------------------- ILP against brute force


@pytest.mark.parametrize("constrained", [("size",), ("bops",), ("size", "bops")], ids="+".join)
def test_joint_ilp_equals_brute_force_on_random_instances(constrained):
    rng = np.random.default_rng([19, len(constrained), "bops" in constrained])
    for trial in range(12):
        inst = random_joint(rng, fixed_acts=trial % 4 == 3)
        structure = inst["structure"]
        configs = enumerate_joint(*args(inst), **structure)
        assert len(configs) == enumerated_count(inst, structure)
        budgets = {}
        for quantity, key in (("size_budget_bits", "size_bits"), ("bops_budget", "bops")):
            if quantity.split("_")[0] in constrained:
                low, high = span(configs, key)
                budgets[quantity] = low + rng.uniform(0.05, 0.8) * (high - low)
        # the smallest size and the smallest BOPs are the same configuration (every item at its
        # lowest bits), so budgets each achievable alone are achievable together
        oracle = brute_force_joint(*args(inst), **budgets, **structure)
        ilp = allocate_joint(*args(inst), **budgets, **structure)
        # the same bits, activation bits, and bitwise the same sum (unique optima: continuous costs)
        assert ilp == dataclasses.replace(oracle, solver="milp")
        assert_structure(ilp, structure)
        assert ilp.size_bits <= budgets.get("size_budget_bits", math.inf)
        assert ilp.bops <= budgets.get("bops_budget", math.inf)


def test_joint_model_and_tie_breaking_by_hand():
    w = {"a": {4: 1.0, 8: 0.25}, "b": {4: 2.0, 8: 0.5}}
    x = {"a": {4: 0.5, 8: 0.0}, "b": {4: 0.75, 8: 0.0}}
    sizes, macs = {"a": 10, "b": 20}, {"a": 100, "b": 50}
    a = allocate_joint(w, x, sizes, macs, bops_budget=4000)
    # (4,4)/(8,4): 1600 + 1600 BOPs, cost 1 + 0.5 + 0.5 + 0.75; anything else at <= 4000 costs more
    assert a.bits == {"a": 4, "b": 8} and a.act_bits == {"a": 4, "b": 4}
    assert (a.size_bits, a.bops, a.sensitivity, a.solver) == (10 * 4 + 20 * 8, 3200.0, 2.75, "milp")
    assert brute_force_joint(w, x, sizes, macs, bops_budget=4000) == dataclasses.replace(a, solver="brute-force")
    # equal cost and size: the smaller BOPs wins over the lexicographically smaller pairs
    one = {n: {4: 0.0} for n in "ab"}
    act = {n: {4: 1.0, 8: 0.0} for n in "ab"}
    # (a4, b8): 16 + 3200 BOPs, (a8, b4): 32 + 1600, both cost 1; (a8, b8) = 3232 is over budget
    best = brute_force_joint(one, act, {"a": 1, "b": 1}, {"a": 1, "b": 100}, bops_budget=3220)
    assert best.act_bits == {"a": 8, "b": 4} and (best.sensitivity, best.bops) == (1.0, 1632.0)
    # equal cost, size and BOPs: lexicographically smallest (w, a) pairs in layer order
    flat = {"a": {4: 0.0, 8: 0.0}}
    swap = brute_force_joint(flat, {"a": {4: 0.0, 8: 0.0}}, {"a": 0}, {"a": 1}, bops_budget=32)
    assert (swap.bits, swap.act_bits) == ({"a": 4}, {"a": 4})
    assert brute_force_joint(flat, {"a": {2: 1.0, 8: 0.0}}, {"a": 0}, {"a": 1}, bops_budget=32).act_bits == {"a": 8}
    # without macs: no BOPs, activations at their least sensitive
    free = allocate_joint(w, x, sizes, None, size_budget_bits=10 * 4 + 20 * 8)
    assert free.bops is None and free.act_bits == {"a": 8, "b": 8} and free.bits == {"a": 4, "b": 8}


def test_enumerate_joint_matches_an_independent_enumeration():
    rng = np.random.default_rng(190)
    for _ in range(6):
        inst = random_joint(rng)
        structure = inst["structure"]
        names = list(inst["sizes"])
        ws, xs = inst["weight_sensitivity"], inst["act_sensitivity"]
        pairs = [[(w, a) for w in ws[m] for a in xs[m]] for m in names]
        expected = {}
        for choice in itertools.product(*pairs):
            cfg = dict(zip(names, choice))
            if any(len({cfg[m] for m in g}) > 1 for g in structure.get("tied", [])):
                continue
            if any(cfg[m][0] != b for m, b in structure.get("pinned", {}).items()):
                continue
            if any(cfg[m][1] != b for m, b in structure.get("act_pinned", {}).items()):
                continue
            expected[choice] = (
                math.fsum(ws[m][w] + xs[m][a] for m, (w, a) in cfg.items()),
                sum(inst["sizes"][m] * w for m, (w, _) in cfg.items()),
                sum(inst["macs"][m] * w * a for m, (w, a) in cfg.items()),
            )
            if len(expected) > 3 * MAX_COUNT:
                break
        configs = enumerate_joint(*args(inst), **structure)
        got = {tuple((c.bits[m], c.act_bits[m]) for m in names): c for c in configs}
        assert list(got) == sorted(got) and len(got) == len(configs)  # lexicographic, no repeats
        assert set(got) == set(expected)
        for choice, (cost, size, bops) in expected.items():
            c = got[choice]
            assert c.sensitivity == pytest.approx(cost, rel=1e-12) and c.size_bits == size and c.bops == float(bops)
            assert c.solver == "brute-force" and c.num_weights == sum(inst["sizes"].values())


# --------------------------------------------------------------------------- frontiers


@pytest.mark.parametrize("fixed_acts", [False, True], ids=["free-acts", "fixed-acts"])
@pytest.mark.parametrize("resource", ["bops", "size"])
def test_joint_frontier_is_the_pareto_set_of_the_enumeration(fixed_acts, resource):
    rng = np.random.default_rng([1919, fixed_acts, resource == "bops"])
    key = "bops" if resource == "bops" else "size_bits"
    for trial in range(8):
        inst = random_joint(rng, integer_costs=trial % 3 == 2, fixed_acts=fixed_acts)
        structure = inst["structure"]
        frontier = joint_frontier(*args(inst), resource=resource, **structure)
        configs = enumerate_joint(*args(inst), **structure)
        values, costs = [getattr(a, key) for a in frontier], [a.sensitivity for a in frontier]
        assert all(x < y for x, y in zip(values, values[1:]))
        assert all(x > y for x, y in zip(costs, costs[1:]))
        # exactly the non-dominated points, each the lexicographically first configuration there
        assert frontier == [dataclasses.replace(a, solver="dp") for a in pareto_set(configs, key)]
        for a in frontier:
            assert_structure(a, structure)


def test_free_activation_frontier_is_never_above_the_fixed_one():
    rng = np.random.default_rng(2019)
    for _ in range(5):
        inst = random_joint(rng)
        structure = inst["structure"]
        structure.pop("act_pinned", None)
        aset = next(iter(inst["act_sensitivity"].values()))
        free = joint_frontier(*args(inst), **structure)
        for bits in aset:
            fixed = joint_frontier(*args(inst), act_bits=bits, **structure)
            assert all(set(a.act_bits.values()) == {bits} for a in fixed)
            for point in fixed:  # some free point with no more BOPs and no more cost
                assert any(f.bops <= point.bops and f.sensitivity <= point.sensitivity for f in free)
    # where low-bit activations are cheap, the free curve is strictly lower at equal BOPs
    w = {n: {4: 1.0, 8: 0.0} for n in "ab"}
    x = {n: {4: 0.01, 8: 0.0} for n in "ab"}
    sizes, macs = {"a": 10, "b": 10}, {"a": 10, "b": 10}
    at8 = joint_frontier(w, x, sizes, macs, act_bits=8)
    free = joint_frontier(w, x, sizes, macs)
    best_free = min(f.sensitivity for f in free if f.bops <= at8[0].bops)
    assert best_free < at8[0].sensitivity


def test_zero_act_sensitivity_with_fixed_activations_is_the_weight_only_allocation():
    rng = np.random.default_rng(1900)
    for trial in range(6):
        n = int(rng.integers(3, 8))
        names = [f"conv{i}" for i in range(n)]
        w = {m: {b: float(rng.exponential()) for b in (2, 4, 8)} for m in names}
        zero = {m: {4: 0.0, 8: 0.0} for m in names}
        sizes = {m: int(rng.integers(1, 40)) for m in names}
        macs = {m: int(rng.integers(1, 60)) for m in names}
        acts = int(rng.choice([4, 8]))
        structure = {"pinned": {names[0]: 8}, "tied": [(names[1], names[2])]} if trial % 2 else {}
        configs = enumerate_configurations(w, sizes, macs=macs, act_bits={m: acts for m in names}, **structure)
        (s_low, s_high), (b_low, b_high) = span(configs, "size_bits"), span(configs, "bops")
        fix = {"act_bits": acts} if trial % 3 else {"act_pinned": {m: acts for m in names}}
        for budgets in (
            {"size_budget_bits": (s_low + s_high) / 2},
            {"bops_budget": b_low + 0.3 * (b_high - b_low)},
            {"size_budget_bits": s_low + 0.7 * (s_high - s_low), "bops_budget": b_low + 0.6 * (b_high - b_low)},
        ):
            uniform = {m: acts for m in names}
            weight_only = allocate_bits_ilp(w, sizes, macs=macs, act_bits=uniform, **budgets, **structure)
            joint = allocate_joint(w, zero, sizes, macs, **budgets, **fix, **structure)
            assert joint == dataclasses.replace(weight_only, act_bits=uniform)
        # the fixed-activation size frontier is HAWQ-V2's Pareto frontier
        front = joint_frontier(w, zero, sizes, macs, resource="size", act_bits=acts, **structure)
        expected = pareto_frontier(w, sizes, **structure)
        assert [(a.bits, a.sensitivity, a.size_bits) for a in front] == [
            (a.bits, a.sensitivity, a.size_bits) for a in expected
        ]


def test_joint_frontier_matches_the_ilp_beyond_enumeration():
    rng = np.random.default_rng(1919)
    names = [f"block{i}" for i in range(16)]  # 6**16 configurations: no enumeration
    w = {m: {b: float(rng.lognormal() * 4.0**-b) for b in (2, 4, 8)} for m in names}
    x = {m: {a: float(rng.lognormal() * 4.0**-a) for a in (4, 8)} for m in names}
    sizes = {m: int(rng.integers(1000, 50_000)) for m in names}
    macs = {m: int(rng.integers(10**5, 10**7)) for m in names}
    frontier = joint_frontier(w, x, sizes, macs, pinned={names[0]: 8}, act_pinned={names[-1]: 8})
    assert len(frontier) > 50
    for point in frontier[:: len(frontier) // 4]:
        ilp = allocate_joint(w, x, sizes, macs, bops_budget=point.bops, pinned={names[0]: 8}, act_pinned={names[-1]: 8})
        assert ilp.bops <= point.bops
        assert ilp.sensitivity == pytest.approx(point.sensitivity, rel=1e-9)


def test_weight_only_results_have_no_act_bits():
    w = {"a": {4: 1.0, 8: 0.0}}
    assert brute_force(w, {"a": 3}, size_budget_bits=100).act_bits is None
    assert allocate_bits_ilp(w, {"a": 3}, size_budget_bits=100).act_bits is None
    assert Allocation({"a": 4}, 0.0, 12, None, None, "dp", 3).act_bits is None  # old constructions unchanged


# --------------------------------------------------------------------------- bad input


W = {"a": {4: 1.0, 8: 0.0}, "b": {4: 1.0, 8: 0.0}, "c": {4: 1.0, 8: 0.0}}
X = {"a": {4: 0.5, 8: 0.0}, "b": {4: 0.5, 8: 0.0}, "c": {4: 0.5, 8: 0.0}}
SIZES = {"a": 1, "b": 2, "c": 3}
MACS = {"a": 10, "b": 20, "c": 30}


@pytest.mark.parametrize(
    ("weights", "acts", "sizes", "macs", "kwargs", "message"),
    [
        (W, {"a": X["a"], "b": X["b"]}, SIZES, MACS, {},
         r"act_sensitivity must have the same layer names as weight_sensitivity; missing: \['c'\], extra: \[\]"),
        (W, {**X, "d": X["a"]}, SIZES, MACS, {}, r"act_sensitivity must have .*missing: \[\], extra: \['d'\]"),
        (W, {**X, "a": {0: 1.0}}, SIZES, MACS, {}, r"act_sensitivity\['a'\]: bit width 0 is not an integer in 1..32"),
        (W, {**X, "b": {33: 1.0}}, SIZES, MACS, {}, r"act_sensitivity\['b'\]: bit width 33 is not an integer in 1..32"),
        (W, {**X, "c": {8: math.nan}}, SIZES, MACS, {}, r"act_sensitivity\['c'\]\[8\] must be a finite real number"),
        (W, {**X, "c": {}}, SIZES, MACS, {}, r"act_sensitivity\['c'\] must be a non-empty dict"),
        (W, [1, 2], SIZES, MACS, {}, "act_sensitivity must be a dict keyed by layer name, got list"),
        ({**W, "a": {4.5: 1.0}}, X, SIZES, MACS, {}, r"weight_sensitivity\['a'\]: bit width 4.5 is not an integer"),
        ({}, {}, {}, {}, {}, "weight_sensitivity has no layers"),
        (W, X, {"a": 1, "b": 2}, MACS, {}, r"sizes must have the same layer names as weight_sensitivity"),
        (W, X, SIZES, {"a": 1}, {}, r"macs must have the same layer names as weight_sensitivity"),
        (W, X, SIZES, {**MACS, "a": -1}, {}, r"macs\['a'\] must be non-negative"),
        (W, X, SIZES, MACS, {"pinned": {"a": 2}}, r"pinned\['a'\] = 2 is not a candidate bit width of that layer"),
        (W, X, SIZES, MACS, {"act_pinned": {"a": 2}},
         r"act_pinned\['a'\] = 2 is not a candidate activation bit width of that layer; candidates: \[4, 8\]"),
        (W, X, SIZES, MACS, {"act_pinned": {"q": 8}}, r"act_pinned names unknown layers \['q'\]"),
        (W, X, SIZES, MACS, {"act_pinned": {"a": 64}}, r"act_pinned\['a'\]: bit width 64 is not an integer in 1..32"),
        (W, X, SIZES, MACS, {"act_bits": 6}, r"act_bits\['a'\] = 6 is not a candidate activation bit width"),
        (W, X, SIZES, MACS, {"act_bits": 0}, r"act_bits: bit width 0 is not an integer in 1..32"),
        (W, X, SIZES, MACS, {"act_bits": True}, r"act_bits: bit width True is not an integer"),
        (W, X, SIZES, MACS, {"act_bits": {"a": 8}}, r"act_bits must have the same layer names .*missing: \['b', 'c'\]"),
        (W, X, SIZES, MACS, {"act_bits": 8, "act_pinned": {"b": 4}},
         r"act_pinned\['b'\] = 4 contradicts act_bits\['b'\] = 8"),
        (W, {**X, "c": {2: 0.0, 8: 0.0}}, SIZES, MACS, {"tied": [("a", "c")]},
         "tied layers must have the same candidate activation bit widths"),
        ({**W, "c": {2: 0.0, 8: 0.0}}, X, SIZES, MACS, {"tied": [("a", "c")]},
         "tied layers must have the same candidate bit widths"),
        (W, X, SIZES, MACS, {"tied": [("a", "b")], "act_pinned": {"a": 4, "b": 8}},
         r"tied layers are pinned to different activation bit widths: \{'a': 4, 'b': 8\}"),
        (W, X, SIZES, MACS, {"tied": [("a", "b")], "pinned": {"a": 4, "b": 8}},
         "tied layers are pinned to different bit widths"),
        (W, X, SIZES, MACS, {"tied": [("a", "zz")]}, r"tied\[0\] names unknown layers \['zz'\]"),
    ],
)
def test_joint_bad_input_raises_with_a_clear_message(weights, acts, sizes, macs, kwargs, message):
    for solve in (
        lambda: allocate_joint(weights, acts, sizes, macs, size_budget_bits=100, **kwargs),
        lambda: brute_force_joint(weights, acts, sizes, macs, size_budget_bits=100, **kwargs),
        lambda: enumerate_joint(weights, acts, sizes, macs, **kwargs),
        lambda: joint_frontier(weights, acts, sizes, macs, **kwargs),
    ):
        with pytest.raises(ValueError, match=message):
            solve()


def test_joint_budgets_state_the_smallest_achievable_value_and_need_macs():
    smallest_size, smallest_bops = 4 * 6, 16 * 60  # all at (4, 4)
    for solve in (allocate_joint, brute_force_joint):
        with pytest.raises(ValueError, match=rf"size budget 23 bits is below the smallest feasible model, {smallest_size} "):
            solve(W, X, SIZES, MACS, size_budget_bits=23)
        with pytest.raises(ValueError, match=rf"BOPs budget 959 is below the smallest achievable BOPs, {smallest_bops} \("):
            solve(W, X, SIZES, MACS, bops_budget=959)
        # pins raise the smallest value: 'c' (30 MACs) at 8-bit activations adds 30 * 4 * 4
        with pytest.raises(ValueError, match=rf"smallest achievable BOPs, {smallest_bops + 480} "):
            solve(W, X, SIZES, MACS, bops_budget=959, act_pinned={"c": 8})
        with pytest.raises(ValueError, match=rf"smallest achievable BOPs, {10 * 8 * 8 + 20 * 16 + 30 * 16} "):
            solve(W, X, SIZES, MACS, bops_budget=959, act_bits={"a": 8, "b": 4, "c": 4}, pinned={"a": 8})
        with pytest.raises(ValueError, match="bops_budget needs macs"):
            solve(W, X, SIZES, None, bops_budget=10_000)
        with pytest.raises(ValueError, match="size_budget_bits must be a finite real number"):
            solve(W, X, SIZES, MACS, size_budget_bits=math.inf)
    with pytest.raises(ValueError, match="resource='bops' needs macs"):
        joint_frontier(W, X, SIZES, None)
    with pytest.raises(ValueError, match="resource must be 'size' or 'bops', got 'latency'"):
        joint_frontier(W, X, SIZES, MACS, resource="latency")
    assert [a.size_bits for a in joint_frontier(W, X, SIZES, None, resource="size")][0] == smallest_size
    with pytest.raises(ValueError, match="too large to count in int64"):
        joint_frontier(W, X, SIZES, {n: 2**60 for n in W})


def test_joint_enumeration_refuses_more_than_a_million_configurations():
    sens = {f"l{i}": {2: 0.0, 4: 0.0} for i in range(10)}  # (2 x 2)**10 = 1048576
    sizes = {n: 1 for n in sens}
    with pytest.raises(ValueError, match="1048576 configurations is more than the 1000000 .*use allocate_joint"):
        enumerate_joint(sens, sens, sizes, None)
    with pytest.raises(ValueError, match="1048576 configurations"):
        brute_force_joint(sens, sens, sizes, None, size_budget_bits=100)
    assert len(enumerate_joint(sens, sens, sizes, None, act_bits=2, pinned={"l0": 2, "l1": 2})) == 2**8
