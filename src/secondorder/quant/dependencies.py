r"""Inter-layer dependencies and a bisection search inside an accuracy window (Schaefer et al., 2023).

"Augmenting Hessians with inter-layer dependencies for mixed-precision post-training quantization"
observes that per-layer Hessian sensitivities order the layers poorly, because quantizing two
layers together can hurt much more (or less) than the sum of quantizing each alone. Here:

* :func:`measure_dependencies` measures, post-training and on calibration data, the damage
  :math:`d_i(b)` of quantizing layer :math:`i` alone at :math:`b` bits and the joint damage
  :math:`d_{ij}(b)` of each pair (neighbours in execution order, or all pairs) at :math:`b` bits,
  with the interaction :math:`I_{ij}(b) = d_{ij}(b) - d_i(b) - d_j(b)`. The damage is the increase
  of the calibration loss, or the drop of the calibration accuracy.
* :meth:`Dependencies.augmented` is the dependency-augmented damage of a layer,
  :math:`s_i(b) = d_i(b) + \tfrac12 \sum_j I_{ij}(b)` (each pair's interaction split between its
  two layers), which sums to the pairwise model of the damage of quantizing all layers at
  :math:`b`: :math:`\sum_i d_i + \sum_{i<j} I_{ij}`.
* :func:`threshold_path` turns any per-layer, per-bit damage table (the Hessian's
  :math:`\tfrac12\Omega_i(b)`, the second-order prediction of the loss increase, or the augmented
  :math:`s_i(b)`) into the configurations of a global threshold :math:`\tau` on the damage per
  weight bit saved, :math:`r_i(b) = s_i(b) / (n_i (b_{\max} - b))`: a layer takes the lowest bit
  width all of whose steps down from :math:`b_{\max}` cost at most :math:`\tau` per bit saved.
  Raising :math:`\tau` only lowers bit widths, so the configurations along the path get cheaper.
  Only the order of the rates matters, so a table may be scaled freely (HAWQ-V2's :math:`\Omega_i(b)`
  gives the same path as the predicted loss increase :math:`\tfrac12\Omega_i(b)`).
* :func:`bisection_search` bisects on the position along that path for the cheapest configuration
  whose measured damage stays inside the window (``max_drop``), in
  :math:`\lceil\log_2 K\rceil + 1` evaluations for a path of :math:`K` steps. When the measured damage
  is non-decreasing along the path, the result is the cheapest configuration on the path inside the
  window; in every case the returned configuration was measured inside it.

The dependency term is our design (the paper's abstract, not its full text, was available; see
``shared/research/algorithms-applications.md`` §2.9).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from secondorder import validation
from secondorder.data import evaluate
from secondorder.quant.qat import calibrate
from secondorder.quant.quantizers import QuantizedLayer, quantizable_layers, wrap_layers

__all__ = [
    "BisectionResult",
    "Dependencies",
    "bisection_search",
    "calibration_damage",
    "measure_dependencies",
    "threshold_path",
]

METRICS = ("loss", "accuracy")
PAIRS = ("neighbours", "all")
Configuration = dict[str, int]
DamageTable = Mapping[str, Mapping[int, float]]


@dataclass(frozen=True)
class Dependencies:
    r"""Measured single-layer and pairwise damages at each candidate bit width.

    ``single[i][b]`` is :math:`d_i(b)`, ``pairs[(i, j)][b]`` is :math:`d_{ij}(b)` (layers in
    ``layers`` order within a pair), ``baseline`` the metric of the unquantized model,
    ``evaluations`` the number of calibration passes spent.
    """

    layers: tuple[str, ...]
    bits: tuple[int, ...]
    metric: str
    baseline: float
    single: dict[str, dict[int, float]]
    pairs: dict[tuple[str, str], dict[int, float]]
    evaluations: int

    def interaction(self, first: str, second: str, bits: int) -> float:
        r""":math:`I_{ij}(b) = d_{ij}(b) - d_i(b) - d_j(b)` (0 for a pair that was not measured)."""
        key = (first, second) if (first, second) in self.pairs else (second, first)
        if key not in self.pairs:
            return 0.0
        return self.pairs[key][bits] - self.single[first][bits] - self.single[second][bits]

    def augmented(self) -> dict[str, dict[int, float]]:
        r"""The dependency-augmented damage :math:`s_i(b) = d_i(b) + \frac12\sum_j I_{ij}(b)`."""
        out = {name: dict(table) for name, table in self.single.items()}
        for (i, j), table in self.pairs.items():
            for b in table:
                half = 0.5 * self.interaction(i, j, b)
                out[i][b] += half
                out[j][b] += half
        return out


@dataclass(frozen=True)
class BisectionResult:
    r"""The configuration a bisection chose and how it got there.

    ``bits`` is the chosen configuration and ``damage`` its measured damage (inside the window:
    ``damage <= max_drop``); ``position`` its index on ``path`` (0: every layer at the highest
    width); ``size_bits`` its size :math:`\sum_i n_i b_i`; ``probed`` the ``(position, damage)`` pairs
    evaluated, in order; ``monotone`` whether the probed damages are non-decreasing in position (the
    condition under which the result is the cheapest on the path inside the window).
    """

    bits: Configuration
    damage: float
    position: int
    size_bits: int
    threshold: float
    max_drop: float
    path: tuple[Configuration, ...]
    probed: tuple[tuple[int, float], ...]

    @property
    def monotone(self) -> bool:
        ordered = sorted(self.probed)
        return all(a[1] <= b[1] for a, b in itertools.pairwise(ordered))


# --------------------------------------------------------------------------- measuring


def _check_metric(metric: str) -> str:
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    return metric


def _damage(result: dict, baseline: dict, metric: str) -> float:
    """Loss increase, or accuracy drop (a fraction), relative to ``baseline``."""
    if metric == "loss":
        return float(result["loss"] - baseline["loss"])
    if baseline["accuracy"] is None:
        raise ValueError("metric='accuracy' needs a classifier (outputs [N, C], class-index targets); use metric='loss'")
    return float(baseline["accuracy"] - result["accuracy"])


class _Quantizer:
    """One wrapped copy of the model whose layers' weight bits are set per evaluation."""

    def __init__(self, model: nn.Module, loss_fn: Callable, data: Any, layers: Sequence[str], metric: str,
                 act_bits: Mapping[str, int] | None, granularity: str, group_size: int | None,
                 calibration: Any = None):
        self.loss_fn, self.data, self.metric = loss_fn, data, metric
        self.baseline = evaluate(model, loss_fn, data)
        act = dict(act_bits or {})
        self.model = wrap_layers(model, {n: None for n in layers}, act, granularity, group_size)
        if act:
            calibrate(self.model, data if calibration is None else calibration)
        self.wrapped = {n: m for n, m in self.model.named_modules() if isinstance(m, QuantizedLayer)}
        self.evaluations = 0

    def __call__(self, bits: Mapping[str, int | None]) -> float:
        for name, layer in self.wrapped.items():
            layer.weight_bits = bits.get(name)
        self.evaluations += 1
        return _damage(evaluate(self.model, self.loss_fn, self.data), self.baseline, self.metric)


def _layer_names(model: nn.Module, layers: Sequence[str] | None) -> list[str]:
    valid = [n for n, _ in quantizable_layers(model)]
    if not valid:
        raise ValueError("the model has no quantizable layers (modules holding a weight of 2 or more dimensions)")
    if layers is None:
        return valid
    unknown = [n for n in layers if n not in valid]
    if unknown:
        raise ValueError(f"unknown layers {unknown}; quantizable layers are {valid}")
    return list(layers)


def _bits(bits: Sequence[int]) -> tuple[int, ...]:
    checked = tuple(sorted({validation.bit_width(b, "bits", 2, 32) for b in bits}))
    if not checked:
        raise ValueError("bits must name at least one weight bit width in 2..32")
    return checked


def calibration_damage(
    model: nn.Module, loss_fn: Callable, data: Any, layers: Sequence[str], *, metric: str = "loss",
    act_bits: Mapping[str, int] | None = None, granularity: str = "channel", group_size: int | None = None,
) -> Callable[[Mapping[str, int | None]], float]:
    """A function ``bits -> damage`` of post-training quantizing ``model`` at ``bits`` on ``data``.

    The damage is the calibration loss increase (``metric="loss"``) or accuracy drop (a fraction,
    ``"accuracy"``) against the unquantized model. One wrapped copy is made (the caller's model is
    never changed) and its weight bits are set per call (layers not named: full precision);
    ``act_bits`` fixes the layers' activation bits, calibrated on ``data``. The function counts
    its calls in ``.evaluations``.
    """
    names = _layer_names(model, layers)
    return _Quantizer(model, loss_fn, data, names, _check_metric(metric), act_bits, granularity, group_size)


def _pairs(names: list[str], pairs: str) -> list[tuple[str, str]]:
    if pairs not in PAIRS:
        raise ValueError(f"pairs must be one of {PAIRS}, got {pairs!r}")
    if pairs == "all":
        return list(itertools.combinations(names, 2))
    return list(itertools.pairwise(names))


def measure_dependencies(
    model: nn.Module, loss_fn: Callable, data: Any, *, bits: Sequence[int] = (2, 3, 4), layers: Sequence[str] | None = None,
    pairs: str = "neighbours", metric: str = "loss", act_bits: Mapping[str, int] | None = None,
    granularity: str = "channel", group_size: int | None = None, progress: bool = False,
) -> Dependencies:
    r"""Single-layer damages :math:`d_i(b)` and pairwise joint damages :math:`d_{ij}(b)` on ``data``.

    ``pairs="neighbours"`` measures consecutive layers in :func:`quantizable_layers` order (or in
    ``layers``'s order), ``"all"`` every pair: :math:`L|\mathcal B|` plus :math:`(L-1)|\mathcal B|` or
    :math:`\binom L2|\mathcal B|` calibration passes. Bit widths at or above the full-precision float's
    (e.g. 32) would measure rounding noise only; give the low candidates that matter.
    """
    from tqdm import tqdm

    names, bit_widths = _layer_names(model, layers), _bits(bits)
    chosen_pairs = _pairs(names, pairs)
    damage = _Quantizer(model, loss_fn, data, names, _check_metric(metric), act_bits, granularity, group_size)
    bar = tqdm(total=(len(names) + len(chosen_pairs)) * len(bit_widths), desc="inter-layer dependencies",
               unit="pass", disable=not progress, leave=False)
    single: dict[str, dict[int, float]] = {n: {} for n in names}
    joint: dict[tuple[str, str], dict[int, float]] = {p: {} for p in chosen_pairs}
    with bar:
        for b in bit_widths:
            for n in names:
                single[n][b] = damage({n: b})
                bar.update()
            for i, j in chosen_pairs:
                joint[(i, j)][b] = damage({i: b, j: b})
                bar.update()
    baseline = damage.baseline["loss" if metric == "loss" else "accuracy"]
    return Dependencies(tuple(names), bit_widths, metric, float(baseline), single, joint, damage.evaluations)


# --------------------------------------------------------------------------- the threshold path


def _check_damage_table(damage: DamageTable, sizes: Mapping[str, int]) -> tuple[list[str], tuple[int, ...]]:
    if not isinstance(damage, Mapping) or not damage:
        raise ValueError("damage must be a non-empty dict {layer: {bits: damage}}")
    names = list(damage)
    missing = [n for n in names if n not in sizes]
    if missing:
        raise ValueError(f"sizes has no entry for layers {missing}")
    bit_sets = {tuple(sorted(t)) for t in damage.values()}
    if len(bit_sets) != 1:
        raise ValueError(f"every layer's damage must have the same bit widths, got {sorted(bit_sets)}")
    widths = bit_sets.pop()
    if len(widths) < 2:
        raise ValueError(f"a threshold path needs at least two bit widths, got {list(widths)}")
    for n in names:
        for b, v in damage[n].items():
            if not math.isfinite(float(v)):
                raise ValueError(f"damage[{n!r}][{b}] is {v}; damages must be finite")
        if isinstance(sizes[n], bool) or int(sizes[n]) < 1:
            raise ValueError(f"sizes[{n!r}] must be a positive number of weights, got {sizes[n]!r}")
    return names, widths


def _step_rates(damage: Mapping[int, float], size: int, widths: tuple[int, ...]) -> dict[int, float]:
    """For each lower width b, the largest damage per weight bit saved over the steps from the top to b."""
    top = widths[-1]
    rates, worst = {}, -math.inf
    for b in reversed(widths[:-1]):
        worst = max(worst, (float(damage[b]) - float(damage[top])) / (size * (top - b)))
        rates[b] = worst
    return rates


def threshold_path(damage: DamageTable, sizes: Mapping[str, int]) -> list[tuple[float, Configuration]]:
    r"""The configurations of a rising global threshold :math:`\tau`, from all-highest to all-lowest.

    Each layer's steps down from the highest width cost :math:`r_i(b)` per weight bit saved (the
    running maximum over the steps, so a layer's width only falls as :math:`\tau` rises); at
    threshold :math:`\tau` a layer takes the lowest width with :math:`r_i(b)\le\tau`. Returns
    ``(tau, bits)`` for :math:`\tau=-\infty` and every distinct rate, in increasing order; layers
    whose rates tie move together.
    """
    names, widths = _check_damage_table(damage, sizes)
    rates = {n: _step_rates(damage[n], int(sizes[n]), widths) for n in names}
    path: list[tuple[float, Configuration]] = [(-math.inf, {n: widths[-1] for n in names})]
    for tau in sorted({r for table in rates.values() for r in table.values()}):
        bits = {n: min((b for b, r in rates[n].items() if r <= tau), default=widths[-1]) for n in names}
        path.append((tau, bits))
    return path


def bisection_search(
    path: Sequence[tuple[float, Configuration]], damage: Callable[[Mapping[str, int]], float], max_drop: float,
    sizes: Mapping[str, int],
) -> BisectionResult:
    """The cheapest configuration on ``path`` whose measured ``damage`` is at most ``max_drop``, by bisection.

    Position 0 (every layer at its highest width) must lie inside the window; otherwise a
    ValueError says by how much it misses. Bisection keeps the furthest position measured inside
    the window and the nearest measured outside it, so the result is always measured inside.
    """
    if not path:
        raise ValueError("the path is empty")
    limit = float(max_drop)
    if not math.isfinite(limit) or limit < 0:
        raise ValueError(f"max_drop must be a finite number >= 0, got {max_drop!r}")
    probed: list[tuple[int, float]] = []

    def measure(k: int) -> float:
        value = float(damage(path[k][1]))
        probed.append((k, value))
        return value

    first = measure(0)
    if first > limit:
        raise ValueError(f"even the highest bit widths {path[0][1]} damage the calibration metric by {first:.4g}, "
                         f"more than max_drop {limit:.4g}; allow a larger drop or higher candidate bits")
    good, good_value, bad = 0, first, len(path)
    while bad - good > 1:
        mid = (good + bad) // 2
        value = measure(mid)
        if value <= limit:
            good, good_value = mid, value
        else:
            bad = mid
    bits = path[good][1]
    return BisectionResult(
        bits=dict(bits), damage=good_value, position=good, size_bits=sum(int(sizes[n]) * b for n, b in bits.items()),
        threshold=path[good][0], max_drop=limit, path=tuple(dict(c) for _, c in path), probed=tuple(probed),
    )
