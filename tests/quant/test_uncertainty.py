"""Uncertainty-aware allocation: confidence bounds, win probabilities and stability against closed forms."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest

from secondorder.quant.allocation import allocate_bits
from secondorder.quant.sensitivity import LayerSensitivity, Sensitivities
from secondorder.quant.uncertainty import (
    beats_probability,
    confidence_omega,
    omega_from_traces,
    parametric_stability,
    redraw_stability,
)


@dataclass(frozen=True)
class Entry:
    name: str
    size: int
    trace: float
    trace_stderr: float
    errors: dict


def normal_cdf(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2))


def test_confidence_omega_is_omega_at_the_shifted_trace():
    layers = (LayerSensitivity("a", 10, 4.0, 0.5, 1.0, 0.0, {2: 3.0, 4: 1.0}),
              LayerSensitivity("b", 5, -1.0, 0.2, 1.0, 0.0, {2: 2.0, 4: 0.5}))
    sens = Sensitivities(layers, 0)
    assert confidence_omega(layers, 0.0) == sens.hawq_v2()
    assert confidence_omega(layers, 2.0) == omega_from_traces(layers, {"a": 5.0, "b": -0.6})
    with pytest.raises(ValueError, match="z must be"):
        confidence_omega(layers, math.nan)


def test_beats_probability_matches_monte_carlo():
    rng = np.random.default_rng(0)
    entries = [Entry(f"l{i}", int(rng.integers(1, 20)), float(rng.uniform(0, 5)), float(rng.uniform(0.1, 2)),
                     {2: float(rng.uniform(2, 3)), 4: float(rng.uniform(0.5, 1)), 8: 0.01}) for i in range(5)]
    a = {"l0": 2, "l1": 4, "l2": 8, "l3": 4, "l4": 2}
    b = {"l0": 4, "l1": 2, "l2": 4, "l3": 8, "l4": 4}
    draws = 200_000
    traces = {x.name: x.trace + x.trace_stderr * rng.standard_normal(draws) for x in entries}
    total = {k: sum(traces[x.name] / x.size * x.errors[c[x.name]] for x in entries) for k, c in (("a", a), ("b", b))}
    mc = float(np.mean(total["a"] < total["b"]))
    p = beats_probability(entries, a, b)
    assert abs(p - mc) <= 4 * math.sqrt(p * (1 - p) / draws)
    assert beats_probability(entries, a, b) + beats_probability(entries, b, a) == pytest.approx(1.0, abs=1e-12)
    assert beats_probability(entries, a, a) == 0.5
    exact = [Entry(x.name, x.size, x.trace, 0.0, x.errors) for x in entries]
    assert beats_probability(exact, a, b) == float(sum(omega_from_traces(exact, {x.name: x.trace for x in exact})[n][a[n]]
                                                       - omega_from_traces(exact, {x.name: x.trace for x in exact})[n][b[n]]
                                                       for n in a) < 0)


@pytest.mark.parametrize("gap", [0.0, 0.7, 2.0])
def test_parametric_stability_equals_the_closed_form_flip_probability(gap):
    # two one-weight layers, room for one at 8 bits: the one with the larger trace gets it
    # (traces 5 standard errors above 0, so neither layer prefers 2 bits for a negative trace)
    entries = [Entry("a", 1, 5.0 + gap, 1.0, {2: 1.0, 8: 0.0}), Entry("b", 1, 5.0, 0.5, {2: 1.0, 8: 0.0})]
    sizes = {"a": 1, "b": 1}

    def solve(table):
        return allocate_bits(table, sizes, 10)

    chosen = solve(omega_from_traces(entries, {"a": 5.0 + gap + 1e-9, "b": 5.0}))
    assert chosen.bits == {"a": 8, "b": 2}
    s = parametric_stability([entries], solve, chosen, redraws=2000, seed=1)
    exact = normal_cdf(gap / math.sqrt(1.0 + 0.25))
    assert abs(s.frequency - exact) <= 4 * math.sqrt(exact * (1 - exact) / 2000)
    assert s.redraws == 2000 and s.distinct == 2 and s.method == "parametric"
    assert sum(c for _, c in s.most_common) == 2000
    assert parametric_stability([entries], solve, chosen, redraws=50, seed=1) == \
        parametric_stability([entries], solve, chosen, redraws=50, seed=1)


def test_zero_error_bars_are_always_stable_and_probe_redraws_are_counted():
    entries = [Entry("a", 3, 2.0, 0.0, {2: 1.0, 4: 0.2}), Entry("b", 2, 1.0, 0.0, {2: 1.0, 4: 0.3})]
    sizes = {"a": 3, "b": 2}

    def solve(table):
        return allocate_bits(table, sizes, 16)

    chosen = solve(omega_from_traces(entries, {"a": 2.0, "b": 1.0}))
    s = parametric_stability([entries], solve, chosen, redraws=30)
    assert s.frequency == 1.0 and s.stderr == 0.0 and s.distinct == 1
    tables = {0: {"a": 2.0, "b": 1.0}, 1: {"a": 0.1, "b": 9.0}, 2: {"a": 2.0, "b": 1.0}}
    r = redraw_stability(lambda seed: [omega_from_traces(entries, tables[seed])], solve, chosen, range(3))
    assert r.method == "probes" and r.redraws == 3 and r.frequency == pytest.approx(2 / 3) and r.distinct == 2
    with pytest.raises(ValueError, match="redraws"):
        parametric_stability([entries], solve, chosen, redraws=0)
