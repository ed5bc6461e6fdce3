"""Inter-layer dependencies and the threshold bisection against brute force and direct evaluation."""

from __future__ import annotations

import copy
import itertools
import math
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from secondorder.data import evaluate
from secondorder.quant.dependencies import (
    bisection_search,
    calibration_damage,
    measure_dependencies,
    threshold_path,
)
from secondorder.quant.qat import quantize


def additive(single, interactions=None):
    """A damage function: sum of single damages plus pair interactions where both layers are low."""
    interactions = interactions or {}

    def damage(bits):
        total = sum(single[n][b] for n, b in bits.items())
        for (i, j), value in interactions.items():
            if bits[i] < max(single[i]) and bits[j] < max(single[j]):
                total += value
        return total

    return damage


def test_threshold_path_by_damage_per_bit_saved():
    damage = {"a": {2: 6.0, 4: 1.0, 8: 0.0}, "b": {2: 3.0, 4: 2.0, 8: 0.0}}
    sizes = {"a": 1, "b": 2}
    # a: 8->4 costs 1/4 per bit, 8->2 costs 1 per bit; b: 8->4 costs 2/8, 8->2 3/12 (running max 1/4)
    path = threshold_path(damage, sizes)
    assert [t for t, _ in path] == [-math.inf, 0.25, 1.0]
    assert [c for _, c in path] == [{"a": 8, "b": 8}, {"a": 4, "b": 2}, {"a": 2, "b": 2}]
    scaled = threshold_path({n: {b: 7 * v for b, v in t.items()} for n, t in damage.items()}, sizes)
    assert [c for _, c in scaled] == [c for _, c in path]  # only the order of the rates matters


@pytest.mark.parametrize("seed", range(6))
def test_bisection_equals_the_exhaustive_scan_of_the_path(seed):
    rng = random.Random(seed)
    names = [f"l{i}" for i in range(6)]
    widths = (2, 3, 4, 8)
    single = {}
    for n in names:  # damage falls with the bits: monotone along the path
        values = sorted((rng.uniform(0, 1) for _ in widths[:-1]), reverse=True)
        single[n] = {**dict(zip(widths[:-1], values)), 8: 0.0}
    interactions = {p: rng.uniform(0, 0.5) for p in itertools.pairwise(names)}
    damage = additive(single, interactions)
    sizes = {n: rng.randint(1, 50) for n in names}
    path = threshold_path(single, sizes)
    window = rng.uniform(0.5, 3.0)
    exhaustive = max(k for k, (_, c) in enumerate(path) if damage(c) <= window)
    calls = []
    result = bisection_search(path, lambda c: calls.append(1) or damage(c), window, sizes)
    assert result.position == exhaustive and result.bits == path[exhaustive][1]
    assert result.damage == damage(result.bits) <= window and result.monotone
    assert len(calls) <= math.ceil(math.log2(len(path))) + 1
    assert result.size_bits == sum(sizes[n] * b for n, b in result.bits.items())


@pytest.mark.parametrize("seed", range(8))
def test_bisection_is_the_cheapest_in_the_window_on_a_brute_forced_instance(seed):
    # two widths, equal sizes, additive damage: the threshold path holds the global optimum
    rng = random.Random(100 + seed)
    names = [f"l{i}" for i in range(7)]
    single = {n: {4: rng.uniform(0.1, 1.0), 8: 0.0} for n in names}
    sizes = dict.fromkeys(names, 10)
    damage = additive(single)
    window = rng.uniform(0.3, 3.0)
    inside = [dict(zip(names, bits)) for bits in itertools.product((4, 8), repeat=len(names))
              if damage(dict(zip(names, bits))) <= window]
    cheapest = min(sum(sizes[n] * b for n, b in c.items()) for c in inside)
    result = bisection_search(threshold_path(single, sizes), damage, window, sizes)
    assert result.size_bits == cheapest and result.damage <= window


def test_dependencies_find_what_the_separable_order_misses():
    # a and b are harmless alone and ruinous together; c is in between
    single = {"a": {4: 1.0, 8: 0.0}, "b": {4: 1.2, 8: 0.0}, "c": {4: 1.5, 8: 0.0}}
    interactions = {("a", "b"): 10.0}
    damage = additive(single, interactions)
    sizes = dict.fromkeys(single, 10)
    augmented = {n: dict(t) for n, t in single.items()}
    for (i, j), v in interactions.items():
        augmented[i][4] += v / 2
        augmented[j][4] += v / 2
    plain = bisection_search(threshold_path(single, sizes), damage, 2.6, sizes)
    aware = bisection_search(threshold_path(augmented, sizes), damage, 2.6, sizes)
    brute = min((dict(zip(single, bits)) for bits in itertools.product((4, 8), repeat=3)
                 if damage(dict(zip(single, bits))) <= 2.6), key=lambda c: sum(c.values()))
    assert plain.bits == {"a": 4, "b": 8, "c": 8}
    assert aware.bits == {"a": 4, "b": 8, "c": 4} and sum(aware.bits.values()) == sum(brute.values())


def small_model(seed=0):
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x = torch.randn(40, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (40,), generator=g)
    return model.eval(), [(x[:20], y[:20]), (x[20:], y[20:])]


@pytest.mark.parametrize("metric", ["loss", "accuracy"])
def test_measured_damages_equal_direct_post_training_quantization(metric):
    model, data = small_model()
    before = copy.deepcopy(model.state_dict())
    deps = measure_dependencies(model, F.cross_entropy, data, bits=(2, 3), pairs="all", metric=metric)
    base = evaluate(model, F.cross_entropy, data)
    key = "loss" if metric == "loss" else "accuracy"
    sign = 1 if metric == "loss" else -1

    def direct(bits):
        return sign * (evaluate(quantize(model, bits), F.cross_entropy, data)[key] - base[key])

    assert deps.layers == ("0", "2", "4") and deps.baseline == base[key]
    assert deps.evaluations == (3 + 3) * 2
    for n, b in itertools.product(deps.layers, (2, 3)):
        assert deps.single[n][b] == pytest.approx(direct({n: b}), abs=1e-12)
    for (i, j), b in itertools.product(itertools.combinations(deps.layers, 2), (2, 3)):
        assert deps.pairs[(i, j)][b] == pytest.approx(direct({i: b, j: b}), abs=1e-12)
        assert deps.interaction(j, i, b) == deps.pairs[(i, j)][b] - deps.single[i][b] - deps.single[j][b]
    augmented = deps.augmented()
    for b in (2, 3):  # the augmented damages sum to the pairwise model of all layers at b
        model_sum = sum(deps.single[n][b] for n in deps.layers) + sum(
            deps.interaction(i, j, b) for i, j in deps.pairs)
        assert sum(augmented[n][b] for n in deps.layers) == pytest.approx(model_sum, abs=1e-12)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and not model.training
    neighbours = measure_dependencies(model, F.cross_entropy, data, bits=(2,))
    assert list(neighbours.pairs) == [("0", "2"), ("2", "4")]


def test_calibration_damage_counts_and_leaves_the_model():
    model, data = small_model(1)
    damage = calibration_damage(model, F.cross_entropy, data, ["0", "4"])
    assert damage({}) == 0.0 and damage({"0": 8}) == pytest.approx(
        evaluate(quantize(model, {"0": 8}), F.cross_entropy, data)["loss"] - evaluate(model, F.cross_entropy, data)["loss"])
    assert damage.evaluations == 2 and not any(isinstance(m, type(damage.model[0])) for m in model.modules())


def test_bad_input():
    model, data = small_model()
    single = {"a": {4: 1.0, 8: 0.0}}
    with pytest.raises(ValueError, match="max_drop"):
        bisection_search(threshold_path(single, {"a": 1}), additive(single), -0.1, {"a": 1})
    with pytest.raises(ValueError, match="even the highest bit widths"):
        bisection_search(threshold_path(single, {"a": 1}), lambda c: 1.0, 0.5, {"a": 1})
    with pytest.raises(ValueError, match="same bit widths"):
        threshold_path({"a": {4: 1.0, 8: 0.0}, "b": {2: 1.0, 8: 0.0}}, {"a": 1, "b": 1})
    with pytest.raises(ValueError, match="at least two bit widths"):
        threshold_path({"a": {8: 0.0}}, {"a": 1})
    with pytest.raises(ValueError, match="unknown layers"):
        measure_dependencies(model, F.cross_entropy, data, layers=["nope"])
    with pytest.raises(ValueError, match="metric"):
        measure_dependencies(model, F.cross_entropy, data, metric="f1")
    with pytest.raises(ValueError, match="pairs"):
        measure_dependencies(model, F.cross_entropy, data, pairs="some")
    with pytest.raises(ValueError, match="bit"):
        measure_dependencies(model, F.cross_entropy, data, bits=(1,))
