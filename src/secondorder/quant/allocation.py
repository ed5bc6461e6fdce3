r"""Mixed-precision bit allocation: HAWQ-V2's Pareto/knapsack selection and HAWQ-V3's ILP.

Layer :math:`i` (:math:`n_i` weights) gets one bit width :math:`b_i` from its candidate set
:math:`\mathcal B_i`; giving it :math:`b` bits costs :math:`\Omega_i(b)` (e.g. HAWQ-V2's
:math:`\mathrm{Tr}(H_i)/n_i\,\|Q_b(W_i)-W_i\|^2`). The allocation problem is

.. math::
    \min_{\mathbf b}\ \sum_i \Omega_i(b_i)\quad\text{s.t.}\quad
    \sum_i n_i b_i \le S,\quad \sum_i \mathrm{MACs}_i\, b_i\, a_i(b_i) \le G,\quad
    \sum_i T_i(b_i) \le T,

with the model size in bits, the bit operations (BOPs, activation bits :math:`a_i` following the
weight bits unless fixed) and a measured latency table :math:`T_i(b)`.

* HAWQ-V2 (Dong et al., NeurIPS 2020) picks, with the size constraint alone, the configuration on
  the Pareto frontier of (size, :math:`\sum\Omega`). That is a multiple-choice knapsack, solved
  exactly here (:func:`allocate_bits`, :func:`pareto_frontier`) by dynamic programming over
  layers that keeps only non-dominated (size, cost) partial solutions, so it stays exact and
  small for sizes of millions of weights.
* HAWQ-V3 (Yao et al., ICML 2021) writes it as an integer linear program with size, BOPs and
  latency budgets (:func:`allocate_bits_ilp`), each budget interpolated between the all-low and
  the all-high model (:func:`interpolated_budget`, :func:`uniform_cost`), with structurally
  tied layers (same bits) and pinned first/last layers.
* :func:`brute_force` / :func:`enumerate_configurations` enumerate every configuration: the
  test oracle, and the "plot every configuration" view of HAWQ-V2.

Joint weight + activation allocation puts HAWQ-V2's activation sensitivities into HAWQ-V3's ILP:
layer :math:`i` picks a pair :math:`(w_i, a_i)` from its weight candidates times its activation
candidates, costing :math:`\Omega^W_i(w_i)+\Omega^A_i(a_i)`, with size :math:`n_i w_i`
(activations are not stored) and BOPs :math:`\mathrm{MACs}_i\,w_i\,a_i`:
:func:`allocate_joint` (the ILP over binary :math:`x_{i,w,a}`), :func:`brute_force_joint` /
:func:`enumerate_joint` (the oracle) and :func:`joint_frontier` (the exact (BOPs,
:math:`\sum\Omega`) Pareto frontier by the same DP, activations free or fixed: the "weight-only
vs weight+activation at equal BOPs" curves).

Every solver works on the same representation: per layer a list of options (a key, the weight
bits or the (weight, activation) pair, with its size, BOPs, cost and latency), and items (a tie
group or a lone layer) taking one key for all their layers. Tied layers form one item; pinned
layers have one option (in joint allocation weight and activation pins each fix their half of the
key). Every solver reports :math:`\sum\Omega` through the same summation (items in layer order, a
tie group's members summed first), so results of different solvers compare exactly. The DP and
the enumeration break ties between equal optima the same way: the smaller size (then, in joint
allocation, the smaller BOPs), then the lexicographically smallest keys in layer order; the ILP
returns one of the optima (the same one when the optimum is unique).

Pure numpy/scipy; no torch and no random numbers.
"""

from __future__ import annotations

import itertools
import math
import numbers
from dataclasses import dataclass
from typing import Callable, Literal, Mapping, Sequence

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from secondorder import validation

__all__ = [
    "Allocation",
    "allocate_bits",
    "allocate_bits_ilp",
    "allocate_joint",
    "brute_force",
    "brute_force_joint",
    "enumerate_configurations",
    "enumerate_joint",
    "interpolated_budget",
    "joint_frontier",
    "pareto_frontier",
    "uniform_cost",
]

MAX_CONFIGURATIONS = 1_000_000
_MAX_BITS = 32
_INT64_SAFE = 2**62
_OBJECTIVE_SCALE = 1e4  # the ILP objective's largest coefficient after rescaling (see _ilp_objective)

SensitivityTable = Mapping[str, Mapping[int, float]]
_Key = tuple[int, ...]  # one layer's choice: (weight bits,), or (weight bits, activation bits)
_Quantity = Literal["size", "bops", "cost", "latency"]


@dataclass(frozen=True)
class Allocation:
    r"""One bit width per layer (and, from joint allocation, one activation bit width) and what it costs.

    ``sensitivity`` is :math:`\sum_i \Omega_i(b_i)` (joint: :math:`\sum_i \Omega^W_i(w_i)+\Omega^A_i(a_i)`);
    ``size_bits`` is :math:`\sum_i n_i b_i`; ``bops`` (when MACs were given)
    :math:`\sum_i \mathrm{MACs}_i b_i a_i`; ``latency`` (when a table was given) :math:`\sum_i T_i(b_i)`;
    ``solver`` is ``"dp"``, ``"milp"`` or ``"brute-force"``; ``num_weights`` is :math:`\sum_i n_i`;
    ``act_bits`` the activation bits per layer of a joint allocation, None from the weight-only
    solvers (where activations follow the weight bits or the ``act_bits`` given to them).
    """

    bits: dict[str, int]
    sensitivity: float
    size_bits: int
    bops: float | None
    latency: float | None
    solver: str
    num_weights: int
    act_bits: dict[str, int] | None = None

    @property
    def size_bytes(self) -> float:
        """The model size in bytes, ``size_bits / 8``."""
        return self.size_bits / 8

    @property
    def average_bits(self) -> float:
        """Bits per weight, ``size_bits / sum_i n_i`` (NaN when every layer is empty)."""
        return self.size_bits / self.num_weights if self.num_weights else math.nan


# --------------------------------------------------------------------------- the representation


@dataclass(frozen=True)
class _Option:
    """One candidate of one layer: its key and its size, BOPs, cost and latency (None without data)."""

    key: _Key
    size: int
    bops: int | None
    cost: float
    latency: float | None


@dataclass(frozen=True)
class _Problem:
    """Validated inputs as options.

    ``candidates`` holds every layer's options by key (sorted); ``items`` are the tie groups and
    lone layers ordered by first layer, ``options`` the keys each item may take (pins applied).
    ``joint`` says the keys are (weight, activation) pairs.
    """

    layers: tuple[str, ...]
    num_weights: int
    candidates: dict[str, dict[_Key, _Option]]
    items: tuple[tuple[str, ...], ...]
    options: tuple[tuple[_Key, ...], ...]
    has_bops: bool
    has_latency: bool
    joint: bool = False


@dataclass(frozen=True)
class _Budgets:
    size: float | None = None
    bops: float | None = None
    latency: float | None = None


# --------------------------------------------------------------------------- validation


def _check_count(value: object, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{where} must be a non-negative int, got {value!r}")
    if int(value) < 0:
        raise ValueError(f"{where} must be non-negative, got {value}")
    return int(value)


def _check_real(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise ValueError(f"{where} must be a finite real number, got {value!r}")
    return float(value)


def _check_mapping(value: object, what: str) -> Mapping:
    if not isinstance(value, Mapping):
        raise ValueError(f"{what} must be a dict keyed by layer name, got {type(value).__name__}")
    return value


def _check_same_names(what: str, given: Mapping, layers: Sequence[str], reference: str = "sensitivity") -> None:
    missing = [n for n in layers if n not in given]
    extra = [n for n in given if n not in set(layers)]
    if missing or extra:
        raise ValueError(
            f"{what} must have the same layer names as {reference}; missing: {missing}, extra: {extra}"
        )


def _check_known(what: str, names: Sequence[str], layers: Sequence[str]) -> None:
    unknown = [n for n in names if n not in set(layers)]
    if unknown:
        raise ValueError(f"{what} names unknown layers {unknown}; valid layer names: {list(layers)}")


def _check_table(table: object, where: str, check_value: Callable[[object, str], float]) -> dict[int, float]:
    """A per-layer ``{bits: value}`` table, sorted by bit width."""
    if not isinstance(table, Mapping) or not table:
        raise ValueError(f"{where} must be a non-empty dict of bit width -> value, got {table!r}")
    checked = {validation.bit_width(b, where, 1, _MAX_BITS): check_value(v, f"{where}[{b}]") for b, v in table.items()}
    return dict(sorted(checked.items()))


def _check_sensitivity(sensitivity: SensitivityTable, what: str = "sensitivity") -> dict[str, dict[int, float]]:
    _check_mapping(sensitivity, what)
    if not sensitivity:
        raise ValueError(f"{what} has no layers")
    return {name: _check_table(table, f"{what}[{name!r}]", _check_real) for name, table in sensitivity.items()}


def _check_sizes(sizes: Mapping[str, int], layers: Sequence[str], reference: str = "sensitivity") -> dict[str, int]:
    _check_same_names("sizes", _check_mapping(sizes, "sizes"), layers, reference)
    checked = {name: _check_count(sizes[name], f"sizes[{name!r}]") for name in layers}
    if sum(checked.values()) * _MAX_BITS >= _INT64_SAFE:
        raise ValueError(f"sizes sum to {sum(checked.values())} weights, too many to count in int64 bits")
    return checked


def _check_macs(
    macs: Mapping[str, int] | None, layers: Sequence[str], reference: str = "sensitivity"
) -> dict[str, int] | None:
    if macs is None:
        return None
    _check_same_names("macs", _check_mapping(macs, "macs"), layers, reference)
    return {name: _check_count(macs[name], f"macs[{name!r}]") for name in layers}


def _check_act_bits(act_bits: Mapping[str, int] | None, layers: Sequence[str], has_macs: bool) -> dict[str, int]:
    if act_bits is None:
        return {}
    if not has_macs:
        raise ValueError("act_bits only enter the BOPs, which need macs; pass macs too")
    _check_mapping(act_bits, "act_bits")
    _check_known("act_bits", list(act_bits), layers)
    return {name: validation.bit_width(b, f"act_bits[{name!r}]", 1, _MAX_BITS) for name, b in act_bits.items()}


def _check_latency(
    latency: SensitivityTable | None, layers: Sequence[str], omega: dict[str, dict[int, float]]
) -> dict[str, dict[int, float]] | None:
    if latency is None:
        return None
    _check_same_names("latency", _check_mapping(latency, "latency"), layers)
    checked = {name: _check_table(latency[name], f"latency[{name!r}]", _check_real) for name in layers}
    for name in layers:
        absent = [b for b in omega[name] if b not in checked[name]]
        if absent:
            raise ValueError(
                f"latency[{name!r}] has no entry for candidate bit widths {absent}; "
                f"it needs every one of {list(omega[name])}"
            )
    return checked


def _check_pinned(
    pinned: Mapping[str, int] | None,
    layers: Sequence[str],
    omega: dict[str, dict[int, float]],
    what: str = "pinned",
    label: str = "",
) -> dict[str, int]:
    """Pins (``what``) as bit widths that are candidates (``label``: "" or "activation ") of their layers."""
    if pinned is None:
        return {}
    _check_mapping(pinned, what)
    _check_known(what, list(pinned), layers)
    checked = {name: validation.bit_width(b, f"{what}[{name!r}]", 1, _MAX_BITS) for name, b in pinned.items()}
    for name, b in checked.items():
        if b not in omega[name]:
            raise ValueError(
                f"{what}[{name!r}] = {b} is not a candidate {label}bit width of that layer; "
                f"candidates: {list(omega[name])}"
            )
    return checked


def _check_tied(tied: Sequence[Sequence[str]] | None, layers: Sequence[str]) -> list[tuple[str, ...]]:
    if tied is None:
        return []
    groups: list[tuple[str, ...]] = []
    seen: dict[str, int] = {}
    for g, group in enumerate(tied):
        if isinstance(group, str) or not isinstance(group, Sequence) or not group:
            raise ValueError(f"tied[{g}] must be a non-empty tuple of layer names, got {group!r}")
        _check_known(f"tied[{g}]", list(group), layers)
        for name in group:
            if name in seen:
                where = "twice in that group" if seen[name] == g else f"also in tied[{seen[name]}]"
                raise ValueError(f"layer {name!r} of tied[{g}] is {where}; a layer can be in one tie group only")
            seen[name] = g
        groups.append(tuple(sorted(group, key=layers.index)))
    return groups


# one factor of the keys: a candidate table, its pins, and the label its messages use ("" or "activation ")
_Factor = tuple[dict[str, dict[int, float]], dict[str, int], str]


def _tie_options(group: tuple[str, ...], omega: dict[str, dict[int, float]], label: str = "") -> tuple[int, ...]:
    """The candidate bit widths of a tie group, which must be the same for all its layers."""
    sets = {name: tuple(omega[name]) for name in group}
    if len(set(sets.values())) > 1:
        raise ValueError(f"tied layers must have the same candidate {label}bit widths; got {sets}")
    return sets[group[0]]


def _item_options(group: tuple[str, ...], factors: Sequence[_Factor]) -> tuple[_Key, ...]:
    """One item's keys: the product over the factors of its candidates, or of its one pinned bit width."""
    parts = []
    for omega, pins, label in factors:
        options = _tie_options(group, omega, label)
        pinned = {name: pins[name] for name in group if name in pins}
        if len(set(pinned.values())) > 1:
            raise ValueError(f"tied layers are pinned to different {label}bit widths: {pinned}")
        parts.append((next(iter(pinned.values())),) if pinned else options)
    return tuple(itertools.product(*parts))


def _build_items(
    layers: Sequence[str], factors: Sequence[_Factor], groups: list[tuple[str, ...]]
) -> tuple[tuple[tuple[str, ...], ...], tuple[tuple[_Key, ...], ...]]:
    """Tie groups and lone layers as items, ordered by their first layer, and their keys."""
    group_of = {name: group for group in groups for name in group}
    items: list[tuple[str, ...]] = []
    for name in layers:
        group = group_of.get(name, (name,))
        if group[0] == name:
            items.append(group)
    return tuple(items), tuple(_item_options(item, factors) for item in items)


def _validate(
    sensitivity: SensitivityTable,
    sizes: Mapping[str, int],
    *,
    pinned: Mapping[str, int] | None = None,
    tied: Sequence[Sequence[str]] | None = None,
    macs: Mapping[str, int] | None = None,
    act_bits: Mapping[str, int] | None = None,
    latency: SensitivityTable | None = None,
) -> _Problem:
    """Check every input of the weight-only solvers and build the options (keys ``(b,)``) and items."""
    omega = _check_sensitivity(sensitivity)
    layers = tuple(omega)
    checked_macs = _check_macs(macs, layers)
    factors: list[_Factor] = [(omega, _check_pinned(pinned, layers, omega), "")]
    items, options = _build_items(layers, factors, _check_tied(tied, layers))
    checked_sizes = _check_sizes(sizes, layers)
    fixed = _check_act_bits(act_bits, layers, checked_macs is not None)
    checked_latency = _check_latency(latency, layers, omega)
    candidates: dict[str, dict[_Key, _Option]] = {
        name: {
            (b,): _Option(
                key=(b,),
                size=checked_sizes[name] * b,
                bops=None if checked_macs is None else checked_macs[name] * b * fixed.get(name, b),
                cost=cost,
                latency=None if checked_latency is None else checked_latency[name][b],
            )
            for b, cost in omega[name].items()
        }
        for name in layers
    }
    return _Problem(
        layers=layers,
        num_weights=sum(checked_sizes.values()),
        candidates=candidates,
        items=items,
        options=options,
        has_bops=checked_macs is not None,
        has_latency=checked_latency is not None,
    )


def _check_fixed_acts(
    act_bits: int | Mapping[str, int] | None, layers: Sequence[str], act_omega: dict[str, dict[int, float]]
) -> dict[str, int]:
    """Joint allocation's fixed activations: one int for every layer, or a dict naming every layer."""
    if act_bits is None:
        return {}
    if isinstance(act_bits, Mapping):
        _check_same_names("act_bits", act_bits, layers, "weight_sensitivity")
        fixed = dict(act_bits)
    else:
        b = validation.bit_width(act_bits, "act_bits", 1, _MAX_BITS)
        fixed = {name: b for name in layers}
    return _check_pinned(fixed, layers, act_omega, "act_bits", "activation ")


def _validate_joint(
    weight_sensitivity: SensitivityTable,
    act_sensitivity: SensitivityTable,
    sizes: Mapping[str, int],
    macs: Mapping[str, int] | None,
    *,
    pinned: Mapping[str, int] | None = None,
    act_pinned: Mapping[str, int] | None = None,
    tied: Sequence[Sequence[str]] | None = None,
    act_bits: int | Mapping[str, int] | None = None,
) -> _Problem:
    """Check every input of the joint solvers and build the options (keys ``(w, a)``) and items."""
    omega = _check_sensitivity(weight_sensitivity, "weight_sensitivity")
    layers = tuple(omega)
    given = _check_mapping(act_sensitivity, "act_sensitivity")
    _check_same_names("act_sensitivity", given, layers, "weight_sensitivity")
    act_omega = _check_sensitivity(act_sensitivity, "act_sensitivity")
    checked_sizes = _check_sizes(sizes, layers, "weight_sensitivity")
    checked_macs = _check_macs(macs, layers, "weight_sensitivity")
    act_pins = _check_pinned(act_pinned, layers, act_omega, "act_pinned", "activation ")
    fixed = _check_fixed_acts(act_bits, layers, act_omega)
    for name in layers:
        if name in act_pins and name in fixed and act_pins[name] != fixed[name]:
            raise ValueError(f"act_pinned[{name!r}] = {act_pins[name]} contradicts act_bits[{name!r}] = {fixed[name]}")
    factors: list[_Factor] = [
        (omega, _check_pinned(pinned, layers, omega), ""),
        (act_omega, {**act_pins, **fixed}, "activation "),
    ]
    items, options = _build_items(layers, factors, _check_tied(tied, layers))
    candidates: dict[str, dict[_Key, _Option]] = {
        name: {
            (w, a): _Option(
                key=(w, a),
                size=checked_sizes[name] * w,
                bops=None if checked_macs is None else checked_macs[name] * w * a,
                cost=omega[name][w] + act_omega[name][a],
                latency=None,
            )
            for w in omega[name]
            for a in act_omega[name]
        }
        for name in layers
    }
    return _Problem(
        layers=layers,
        num_weights=sum(checked_sizes.values()),
        candidates=candidates,
        items=items,
        options=options,
        has_bops=checked_macs is not None,
        has_latency=False,
        joint=True,
    )


def _check_budgets(problem: _Problem, size: object, bops: object, latency: object) -> _Budgets:
    """Budgets as floats; one given without the data it constrains is an error."""
    if bops is not None and not problem.has_bops:
        raise ValueError("bops_budget needs macs (the MACs of every layer)")
    if latency is not None and not problem.has_latency:
        raise ValueError("latency_budget needs latency (a latency table per layer and bit width)")
    return _Budgets(
        size=None if size is None else _check_real(size, "size_budget_bits"),
        bops=None if bops is None else _check_real(bops, "bops_budget"),
        latency=None if latency is None else _check_real(latency, "latency_budget"),
    )


# --------------------------------------------------------------------------- per-item quantities


def _item_total(p: _Problem, k: int, key: _Key, quantity: _Quantity) -> float:
    """``sum_{i in item k} quantity_i(key)``, members in layer order (size and BOPs stay ints)."""
    total = 0.0 if quantity in ("cost", "latency") else 0
    for name in p.items[k]:
        value = getattr(p.candidates[name][key], quantity)
        assert value is not None, quantity
        total += value
    return total


def _minimum(p: _Problem, quantity: _Quantity) -> float:
    """The smallest achievable total: every item at its cheapest option (the quantities are additive)."""
    return sum(min(_item_total(p, k, key, quantity) for key in p.options[k]) for k in range(len(p.items)))


def _allocation(p: _Problem, choice: Sequence[_Key], solver: str) -> Allocation:
    """The :class:`Allocation` of one key per item; every solver reports through here."""
    cost, latency = 0.0, 0.0
    for k, key in enumerate(choice):
        cost += _item_total(p, k, key, "cost")
        if p.has_latency:
            latency += _item_total(p, k, key, "latency")
    by_layer = {name: key for k, key in enumerate(choice) for name in p.items[k]}
    return Allocation(
        bits={name: int(by_layer[name][0]) for name in p.layers},
        sensitivity=cost,
        size_bits=int(sum(_item_total(p, k, key, "size") for k, key in enumerate(choice))),
        bops=float(sum(_item_total(p, k, key, "bops") for k, key in enumerate(choice))) if p.has_bops else None,
        latency=latency if p.has_latency else None,
        solver=solver,
        num_weights=p.num_weights,
        act_bits={name: int(by_layer[name][1]) for name in p.layers} if p.joint else None,
    )


# --------------------------------------------------------------------------- feasibility messages


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:.10g}"


_PINS = "respecting pins and ties"


def _bound_checks(p: _Problem, budgets: _Budgets) -> list[tuple[str, float, float, str]]:
    """(what, budget, smallest achievable, how) for every given budget."""
    checks = []
    if budgets.size is not None:
        checks.append(("size budget {} bits", budgets.size, _minimum(p, "size"),
                       "the smallest feasible model, {} bits (all layers at their lowest bits, " + _PINS + ")"))
    if budgets.bops is not None:
        checks.append(("BOPs budget {}", budgets.bops, _minimum(p, "bops"),
                       "the smallest achievable BOPs, {} (all layers at their lowest bits, " + _PINS + ")"))
    if budgets.latency is not None:
        checks.append(("latency budget {}", budgets.latency, _minimum(p, "latency"),
                       "the smallest achievable latency, {} (every layer at its fastest bit width, " + _PINS + ")"))
    return checks


def _require_each_feasible(p: _Problem, budgets: _Budgets) -> None:
    """ValueError naming every budget below the smallest value its quantity can take."""
    failures = [
        f"{what.format(_fmt(limit))} is below {how.format(_fmt(low))}"
        for what, limit, low, how in _bound_checks(p, budgets)
        if limit < low
    ]
    if failures:
        raise ValueError("; ".join(failures))


def _jointly_infeasible(p: _Problem, budgets: _Budgets) -> ValueError:
    """The error for budgets each achievable alone but not together."""
    parts = [
        f"{what.format(_fmt(limit))} (smallest alone: {_fmt(low)})" for what, limit, low, _ in _bound_checks(p, budgets)
    ]
    return ValueError("no configuration meets all budgets together: " + ", ".join(parts))


# --------------------------------------------------------------------------- Pareto DP (HAWQ-V2)


_Resource = Literal["size", "bops"]


def _item_arrays(p: _Problem, k: int, resource: _Resource) -> tuple[np.ndarray, np.ndarray]:
    """Item ``k``'s options as (resource, cost) arrays, in the order of ``p.options[k]``."""
    values = np.array([_item_total(p, k, key, resource) for key in p.options[k]], dtype=np.int64)
    costs = np.array([_item_total(p, k, key, "cost") for key in p.options[k]], dtype=np.float64)
    return values, costs


def _pareto_step(
    state: tuple[np.ndarray, np.ndarray, np.ndarray], item: tuple[np.ndarray, np.ndarray], limit: int | None
) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], np.ndarray, np.ndarray]:
    """Extend every non-dominated partial solution by every option of one item and prune.

    ``state`` is (resource, cost, lexicographic rank of the choices so far), sorted by resource
    with strictly decreasing cost. A candidate survives if it fits ``limit`` and its cost is below
    that of every candidate with smaller resource, or equal resource and (lower cost, or equal cost
    and lexicographically smaller choices). Returns the new state and each survivor's parent and
    option.
    """
    size, cost, rank = state
    opt_size, opt_cost = item
    m = len(opt_size)
    parent = np.repeat(np.arange(len(size)), m)
    option = np.tile(np.arange(m), len(size))
    new_size = (size[:, None] + opt_size[None, :]).ravel()
    new_cost = (cost[:, None] + opt_cost[None, :]).ravel()
    if limit is not None:
        fits = new_size <= limit
        parent, option, new_size, new_cost = parent[fits], option[fits], new_size[fits], new_cost[fits]
    order = np.lexsort((option, rank[parent], new_cost, new_size))
    parent, option, new_size, new_cost = parent[order], option[order], new_size[order], new_cost[order]
    keep = np.ones(len(new_cost), dtype=bool)
    keep[1:] = new_cost[1:] < np.minimum.accumulate(new_cost)[:-1]
    parent, option, new_size, new_cost = parent[keep], option[keep], new_size[keep], new_cost[keep]
    new_rank = np.empty(len(parent), dtype=np.int64)
    new_rank[np.lexsort((option, rank[parent]))] = np.arange(len(parent))
    return (new_size, new_cost, new_rank), parent, option


def _pareto_dp(
    p: _Problem, limit: int | None, resource: _Resource = "size"
) -> tuple[np.ndarray, list[tuple[_Key, ...]]]:
    """Final non-dominated (resource, cost) states, sorted by resource, and their keys per item.

    Exact multiple-choice knapsack over an additive integer resource (size or BOPs): a partial
    solution dominated in (resource, cost) is dominated in every completion, and one that cannot
    fit ``limit`` even with the smallest remaining options is dropped, so only the Pareto set is
    carried from item to item. Among equal (resource, cost) the lexicographically smallest keys.
    """
    top = sum(max(_item_total(p, k, key, resource) for key in p.options[k]) for k in range(len(p.items)))
    if top >= _INT64_SAFE:
        raise ValueError(f"the largest configuration has {resource} {top}, too large to count in int64")
    arrays = [_item_arrays(p, k, resource) for k in range(len(p.items))]
    remaining = np.cumsum([0] + [int(a[0].min()) for a in arrays[::-1]])[::-1]  # smallest resource of items k..
    state = (np.zeros(1, np.int64), np.zeros(1, np.float64), np.zeros(1, np.int64))
    history = []
    for k, item in enumerate(arrays):
        state, parent, option = _pareto_step(state, item, None if limit is None else limit - int(remaining[k + 1]))
        history.append((parent, option))
    index = np.arange(len(state[0]))
    chosen = np.empty((len(index), len(arrays)), dtype=np.int64)
    for k in range(len(arrays) - 1, -1, -1):
        parent, option = history[k]
        chosen[:, k] = option[index]
        index = parent[index]
    return state[0], [tuple(p.options[k][j] for k, j in enumerate(row)) for row in chosen.tolist()]


def _size_limit(p: _Problem, budget: object) -> int:
    """The size budget as an int number of bits (sizes are ints), after checking feasibility."""
    budgets = _Budgets(size=_check_real(budget, "size_budget_bits"))
    _require_each_feasible(p, budgets)
    assert budgets.size is not None
    return min(math.floor(budgets.size), _INT64_SAFE)


def allocate_bits(
    sensitivity: SensitivityTable,
    sizes: Mapping[str, int],
    size_budget_bits: float,
    *,
    pinned: Mapping[str, int] | None = None,
    tied: Sequence[Sequence[str]] | None = None,
) -> Allocation:
    r"""HAWQ-V2's exact size-constrained allocation (Dong et al., NeurIPS 2020).

    Solves :math:`\min_{\mathbf b}\sum_i\Omega_i(b_i)` s.t. :math:`\sum_i n_i b_i\le` ``size_budget_bits``
    as a multiple-choice knapsack by dynamic programming over layers, carrying only the Pareto set
    of (size, cost) partial solutions: exact for any sizes, with no table over the budget. Tied
    layers are one item (their sizes and costs summed), pinned layers have their one option.
    Among equal optima: the smaller size, then the lexicographically smallest bits.

    Raises ValueError if the budget is below the smallest feasible model (stated in the message).
    """
    p = _validate(sensitivity, sizes, pinned=pinned, tied=tied)
    _, choices = _pareto_dp(p, _size_limit(p, size_budget_bits))
    return _allocation(p, choices[-1], "dp")  # costs fall strictly with size: the last is the best


def pareto_frontier(
    sensitivity: SensitivityTable,
    sizes: Mapping[str, int],
    *,
    pinned: Mapping[str, int] | None = None,
    tied: Sequence[Sequence[str]] | None = None,
) -> list[Allocation]:
    r"""Every non-dominated (size, :math:`\sum\Omega`) configuration, by increasing size.

    The min-:math:`\Omega` curve against model size that HAWQ-V2 (Dong et al., NeurIPS 2020) plots:
    sizes strictly increase and :math:`\sum\Omega` strictly decreases along the list, and every
    configuration has a point on it with no larger size and no larger cost. Same DP as
    :func:`allocate_bits`, without a budget.
    """
    p = _validate(sensitivity, sizes, pinned=pinned, tied=tied)
    _, choices = _pareto_dp(p, None)
    return [_allocation(p, choice, "dp") for choice in choices]


# --------------------------------------------------------------------------- ILP (HAWQ-V3)


def _ilp_variables(p: _Problem) -> list[tuple[str, _Key]]:
    """One binary variable ``x_{i,key}`` per layer and candidate key, in layer order."""
    return [(name, key) for name in p.layers for key in p.candidates[name]]


def _ilp_objective(p: _Problem, variables: list[tuple[str, _Key]]) -> np.ndarray:
    r""":math:`\Omega_i(\mathrm{key})` less each layer's minimum, scaled so the largest coefficient is 1e4.

    Subtracting a per-layer constant (one :math:`x_{i,\mathrm{key}}` is 1 per layer) and scaling
    leave the argmin unchanged; they keep HiGHS's absolute MIP gap (1e-6) negligible whatever the
    scale of :math:`\Omega`.
    """
    floor = {name: min(option.cost for option in p.candidates[name].values()) for name in p.layers}
    c = np.array([p.candidates[name][key].cost - floor[name] for name, key in variables])
    top = float(c.max())
    return c * (_OBJECTIVE_SCALE / top) if top > 0 else c


def _ilp_structure(p: _Problem, variables: list[tuple[str, _Key]]) -> tuple[np.ndarray, np.ndarray]:
    r"""Equality rows: :math:`\sum_k x_{i,k}=1` per layer, :math:`x_{i,k}=x_{j,k}` within each tie group."""
    index = {v: j for j, v in enumerate(variables)}
    rows = []
    for name in p.layers:
        row = np.zeros(len(variables))
        row[[index[(name, key)] for key in p.candidates[name]]] = 1.0
        rows.append((row, 1.0))
    for item in p.items:
        for other in item[1:]:
            for key in p.candidates[item[0]]:
                row = np.zeros(len(variables))
                row[index[(item[0], key)]], row[index[(other, key)]] = 1.0, -1.0
                rows.append((row, 0.0))
    return np.array([r for r, _ in rows]), np.array([v for _, v in rows])


def _ilp_budget_rows(
    p: _Problem, variables: list[tuple[str, _Key]], budgets: _Budgets
) -> tuple[np.ndarray, np.ndarray]:
    """One ``<=`` row per given budget.

    Size and BOPs are integers, so their bound is ``floor(budget) + 1/2``: half a unit of slack on
    both sides of the integer limit, which the solver's tolerances cannot cross.
    """
    rows, bounds = [], []
    quantities: tuple[tuple[_Quantity, float | None], ...] = (
        ("size", budgets.size), ("bops", budgets.bops), ("latency", budgets.latency)
    )
    for quantity, limit in quantities:
        if limit is None:
            continue
        rows.append([float(getattr(p.candidates[name][key], quantity)) for name, key in variables])
        bounds.append(limit if quantity == "latency" else math.floor(limit) + 0.5)
    return np.array(rows).reshape(len(rows), len(variables)), np.array(bounds)


def _ilp_bounds(p: _Problem, variables: list[tuple[str, _Key]]) -> Bounds:
    """``0 <= x <= 1``; an item with one allowed key has that variable fixed at 1, else the disallowed at 0."""
    index = {v: j for j, v in enumerate(variables)}
    lower, upper = np.zeros(len(variables)), np.ones(len(variables))
    for item, allowed in zip(p.items, p.options):
        if len(allowed) == 1:  # the sum-to-one and tie rows set the others
            lower[index[(item[0], allowed[0])]] = 1.0
            continue
        for name in item:
            for key in p.candidates[name]:
                if key not in allowed:
                    upper[index[(name, key)]] = 0.0
    return Bounds(lower, upper)


def _ilp_choice(p: _Problem, variables: list[tuple[str, _Key]], x: np.ndarray) -> list[_Key]:
    """Each item's key from the solver's (near-)binary solution."""
    keys = {}
    for name in p.layers:
        candidates = [(x[j], key) for j, (n, key) in enumerate(variables) if n == name]
        keys[name] = max(candidates)[1]
    return [keys[item[0]] for item in p.items]


def _satisfies(a: Allocation, budgets: _Budgets, latency_tol: float = 0.0) -> bool:
    """Whether an allocation meets every given budget (latency up to ``latency_tol`` relative)."""
    if budgets.size is not None and a.size_bits > budgets.size:
        return False
    if budgets.bops is not None and (a.bops is None or a.bops > budgets.bops):
        return False
    if budgets.latency is not None:
        slack = latency_tol * max(1.0, abs(budgets.latency))
        if a.latency is None or a.latency > budgets.latency + slack:
            return False
    return True


def _solve_ilp(p: _Problem, budgets: _Budgets) -> Allocation:
    """The ILP over every layer's options under ``budgets``, solved by HiGHS to a zero relative gap."""
    _require_each_feasible(p, budgets)
    variables = _ilp_variables(p)
    eq_rows, eq_values = _ilp_structure(p, variables)
    le_rows, le_bounds = _ilp_budget_rows(p, variables, budgets)
    constraints = [LinearConstraint(eq_rows, eq_values, eq_values)]
    if len(le_rows):
        constraints.append(LinearConstraint(le_rows, -np.inf, le_bounds))
    result = milp(
        _ilp_objective(p, variables),
        integrality=np.ones(len(variables)),
        bounds=_ilp_bounds(p, variables),
        constraints=constraints,
        options={"mip_rel_gap": 0.0},
    )
    if result.status == 2:
        raise _jointly_infeasible(p, budgets)
    if result.x is None or result.status != 0:
        raise RuntimeError(f"scipy.optimize.milp failed (status {result.status}): {result.message}")
    found = _allocation(p, _ilp_choice(p, variables, result.x), "milp")
    if not _satisfies(found, budgets, latency_tol=1e-9):
        raise RuntimeError(f"scipy.optimize.milp returned a configuration that breaks a budget: {found}")
    return found


def allocate_bits_ilp(
    sensitivity: SensitivityTable,
    sizes: Mapping[str, int],
    *,
    size_budget_bits: float | None = None,
    macs: Mapping[str, int] | None = None,
    act_bits: Mapping[str, int] | None = None,
    bops_budget: float | None = None,
    latency: SensitivityTable | None = None,
    latency_budget: float | None = None,
    pinned: Mapping[str, int] | None = None,
    tied: Sequence[Sequence[str]] | None = None,
) -> Allocation:
    r"""HAWQ-V3's integer linear program (Yao et al., ICML 2021), solved with ``scipy.optimize.milp``.

    Binary :math:`x_{i,b}` with :math:`\sum_b x_{i,b}=1` per layer; minimise
    :math:`\sum_{i,b}\Omega_i(b)x_{i,b}` subject to, for each budget given,
    :math:`\sum n_i b\,x_{i,b}\le S`, :math:`\sum \mathrm{MACs}_i\,b\,a_i(b)\,x_{i,b}\le G`,
    :math:`\sum T_i(b)\,x_{i,b}\le T`; tied layers :math:`x_{i,b}=x_{j,b}` for every :math:`b`
    (their candidate sets must agree); pinned layers :math:`x_{i,b_{pin}}=1`. The MIP is solved to a
    zero relative gap. BOPs and latency are reported whenever ``macs`` / ``latency`` are given.
    The latency budget is met up to the solver's tolerance (1e-9 relative is checked).

    Raises ValueError on infeasible budgets, stating the smallest achievable value of each
    constrained quantity, and when a budget comes without the data it needs.
    """
    p = _validate(sensitivity, sizes, pinned=pinned, tied=tied, macs=macs, act_bits=act_bits, latency=latency)
    return _solve_ilp(p, _check_budgets(p, size_budget_bits, bops_budget, latency_budget))


# --------------------------------------------------------------------------- enumeration


def _enumerate(p: _Problem) -> list[Allocation]:
    """Every configuration of the items, lexicographic in the keys (ValueError above the cap)."""
    count = math.prod(len(opts) for opts in p.options)
    if count > MAX_CONFIGURATIONS:
        advice = "use allocate_joint" if p.joint else "use allocate_bits or allocate_bits_ilp"
        raise ValueError(f"{count} configurations is more than the {MAX_CONFIGURATIONS} that are enumerated; {advice}")
    return [_allocation(p, choice, "brute-force") for choice in itertools.product(*p.options)]


def _brute_force(p: _Problem, budgets: _Budgets) -> Allocation:
    """The best configuration meeting ``budgets``: least cost, then size, then (joint) BOPs, then keys."""
    _require_each_feasible(p, budgets)
    feasible = [a for a in _enumerate(p) if _satisfies(a, budgets)]
    if not feasible:
        raise _jointly_infeasible(p, budgets)

    def preference(a: Allocation) -> tuple[float, int, float]:
        return a.sensitivity, a.size_bits, a.bops if p.joint and a.bops is not None else 0.0

    return min(feasible, key=preference)  # min keeps the first: lexicographic


def enumerate_configurations(
    sensitivity: SensitivityTable,
    sizes: Mapping[str, int],
    *,
    pinned: Mapping[str, int] | None = None,
    tied: Sequence[Sequence[str]] | None = None,
    macs: Mapping[str, int] | None = None,
    act_bits: Mapping[str, int] | None = None,
    latency: SensitivityTable | None = None,
) -> list[Allocation]:
    r"""Every configuration allowed by the pins and ties, in lexicographic order of the bits.

    The :math:`\prod_i|\mathcal B_i|` points HAWQ-V2 plots (e.g. :math:`\{2,3,4,8\}^4 = 256`).
    Refuses (ValueError) more than one million configurations.
    """
    p = _validate(sensitivity, sizes, pinned=pinned, tied=tied, macs=macs, act_bits=act_bits, latency=latency)
    return _enumerate(p)


def brute_force(
    sensitivity: SensitivityTable,
    sizes: Mapping[str, int],
    *,
    size_budget_bits: float | None = None,
    macs: Mapping[str, int] | None = None,
    act_bits: Mapping[str, int] | None = None,
    bops_budget: float | None = None,
    latency: SensitivityTable | None = None,
    latency_budget: float | None = None,
    pinned: Mapping[str, int] | None = None,
    tied: Sequence[Sequence[str]] | None = None,
) -> Allocation:
    r"""The best configuration by enumerating all of them: the oracle for the DP and the ILP.

    Minimises :math:`\sum\Omega` over every configuration meeting every given budget (exactly);
    among equal costs the smaller size, then the lexicographically smallest bits. Same errors as
    :func:`allocate_bits_ilp`, and ValueError above one million configurations.
    """
    p = _validate(sensitivity, sizes, pinned=pinned, tied=tied, macs=macs, act_bits=act_bits, latency=latency)
    return _brute_force(p, _check_budgets(p, size_budget_bits, bops_budget, latency_budget))


# --------------------------------------------------------------------------- joint weight + activation allocation


def allocate_joint(
    weight_sensitivity: SensitivityTable,
    act_sensitivity: SensitivityTable,
    sizes: Mapping[str, int],
    macs: Mapping[str, int] | None,
    *,
    size_budget_bits: float | None = None,
    bops_budget: float | None = None,
    pinned: Mapping[str, int] | None = None,
    act_pinned: Mapping[str, int] | None = None,
    tied: Sequence[Sequence[str]] | None = None,
    act_bits: int | Mapping[str, int] | None = None,
) -> Allocation:
    r"""Joint weight and activation bit allocation: HAWQ-V2's activation term inside HAWQ-V3's ILP.

    Binary :math:`x_{i,w,a}` with :math:`\sum_{w,a}x_{i,w,a}=1` per layer; minimise
    :math:`\sum_{i,w,a}(\Omega^W_i(w)+\Omega^A_i(a))\,x_{i,w,a}` subject to, for each budget given,
    :math:`\sum n_i w\,x_{i,w,a}\le S` and :math:`\sum\mathrm{MACs}_i\,w\,a\,x_{i,w,a}\le G`; tied
    layers :math:`x_{i,w,a}=x_{j,w,a}`; pins fix their half of the pair. Solved exactly by
    ``scipy.optimize.milp`` to a zero relative gap; the result has ``act_bits`` set. When several
    configurations share the optimal cost the ILP returns one of them, which need not be the one
    :func:`brute_force_joint`'s tie-breaking picks; with a unique optimum they agree exactly.

    ``weight_sensitivity`` and ``act_sensitivity`` are per-layer ``{bits: Omega}`` tables with the
    same layer names (each layer's candidates are the pairs of their bit widths); ``sizes`` the
    weights per layer, ``macs`` the MACs per layer (None: no BOPs, and no BOPs budget). ``pinned``
    fixes weight bits, ``act_pinned`` activation bits (each a candidate of its table); ``act_bits``
    fixes every layer's activations (one int, or a dict naming every layer; where ``act_pinned``
    names a layer too they must agree). Tied layers share the weight bits *and* the activation bits
    (both candidate sets must agree within a group).

    Raises ValueError on infeasible budgets (stating the smallest achievable size / BOPs), on a BOPs
    budget without ``macs`` and on bad input.
    """
    p = _validate_joint(
        weight_sensitivity, act_sensitivity, sizes, macs, pinned=pinned, act_pinned=act_pinned, tied=tied,
        act_bits=act_bits,
    )
    return _solve_ilp(p, _check_budgets(p, size_budget_bits, bops_budget, None))


def brute_force_joint(
    weight_sensitivity: SensitivityTable,
    act_sensitivity: SensitivityTable,
    sizes: Mapping[str, int],
    macs: Mapping[str, int] | None,
    *,
    size_budget_bits: float | None = None,
    bops_budget: float | None = None,
    pinned: Mapping[str, int] | None = None,
    act_pinned: Mapping[str, int] | None = None,
    tied: Sequence[Sequence[str]] | None = None,
    act_bits: int | Mapping[str, int] | None = None,
) -> Allocation:
    r"""The best joint configuration by enumerating all of them: the oracle for :func:`allocate_joint`.

    Minimises :math:`\sum_i\Omega^W_i(w_i)+\Omega^A_i(a_i)` over every configuration meeting every
    given budget; among equal costs the smaller size, then the smaller BOPs, then the
    lexicographically smallest (weight, activation) pairs in layer order. Same arguments and errors
    as :func:`allocate_joint`, and ValueError above one million configurations.
    """
    p = _validate_joint(
        weight_sensitivity, act_sensitivity, sizes, macs, pinned=pinned, act_pinned=act_pinned, tied=tied,
        act_bits=act_bits,
    )
    return _brute_force(p, _check_budgets(p, size_budget_bits, bops_budget, None))


def enumerate_joint(
    weight_sensitivity: SensitivityTable,
    act_sensitivity: SensitivityTable,
    sizes: Mapping[str, int],
    macs: Mapping[str, int] | None,
    *,
    pinned: Mapping[str, int] | None = None,
    act_pinned: Mapping[str, int] | None = None,
    tied: Sequence[Sequence[str]] | None = None,
    act_bits: int | Mapping[str, int] | None = None,
) -> list[Allocation]:
    r"""Every joint configuration allowed by the pins and ties, lexicographic in the (weight, activation) pairs.

    Refuses (ValueError) more than one million configurations.
    """
    p = _validate_joint(
        weight_sensitivity, act_sensitivity, sizes, macs, pinned=pinned, act_pinned=act_pinned, tied=tied,
        act_bits=act_bits,
    )
    return _enumerate(p)


def joint_frontier(
    weight_sensitivity: SensitivityTable,
    act_sensitivity: SensitivityTable,
    sizes: Mapping[str, int],
    macs: Mapping[str, int] | None,
    *,
    resource: str = "bops",
    act_bits: int | Mapping[str, int] | None = None,
    pinned: Mapping[str, int] | None = None,
    act_pinned: Mapping[str, int] | None = None,
    tied: Sequence[Sequence[str]] | None = None,
) -> list[Allocation]:
    r"""Every non-dominated (``resource``, :math:`\sum\Omega`) joint configuration, by increasing resource.

    ``resource`` is ``"bops"`` (:math:`\sum_i\mathrm{MACs}_i w_i a_i`, needs ``macs``) or ``"size"``
    (:math:`\sum_i n_i w_i`). With ``act_bits`` (e.g. ``8``) the activations are fixed: the
    weight-only mixed-precision curve at those activations; without, they vary with the weights:
    the weight+activation curve, never above the fixed one at equal BOPs when the fixed bits are
    candidates. Exact Pareto DP over layers (the resource is additive given each layer's pair), as
    :func:`pareto_frontier`: the resource strictly increases and :math:`\sum\Omega` strictly
    decreases along the list, and of the configurations at one point the lexicographically smallest
    is listed. Other arguments as :func:`allocate_joint`.
    """
    if resource not in ("size", "bops"):
        raise ValueError(f"resource must be 'size' or 'bops', got {resource!r}")
    p = _validate_joint(
        weight_sensitivity, act_sensitivity, sizes, macs, pinned=pinned, act_pinned=act_pinned, tied=tied,
        act_bits=act_bits,
    )
    if resource == "bops" and not p.has_bops:
        raise ValueError("resource='bops' needs macs (the MACs of every layer)")
    _, choices = _pareto_dp(p, None, "bops" if resource == "bops" else "size")
    return [_allocation(p, choice, "dp") for choice in choices]


# --------------------------------------------------------------------------- budgets


def interpolated_budget(low: float, high: float, alpha: float) -> float:
    r"""HAWQ-V3's budget :math:`\text{low} + \alpha(\text{high} - \text{low})`, :math:`\alpha\in[0,1]`.

    With ``low``/``high`` the all-INT4 / all-INT8 cost (:func:`uniform_cost`), Yao et al.
    (ICML 2021) use :math:`\alpha\in\{0.25, 0.5, 0.75\}` for their Low/Medium/High rows.
    """
    low, high = _check_real(low, "low"), _check_real(high, "high")
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must be a real number in [0, 1], got {alpha!r}")
    return low + float(alpha) * (high - low)


def uniform_cost(
    sizes: Mapping[str, int],
    bits: int,
    macs: Mapping[str, int] | None = None,
    act_bits: Mapping[str, int] | None = None,
) -> tuple[int, float | None]:
    r"""``(size_bits, bops)`` with every layer at ``bits``: :math:`\sum_i n_i b` and :math:`\sum_i \mathrm{MACs}_i\,b\,a_i`.

    Activations take ``bits`` unless ``act_bits`` fixes them; ``bops`` is None without ``macs``.
    Pins, ties and candidate sets play no part: these are the endpoints of :func:`interpolated_budget`.
    """
    b = validation.bit_width(bits, "uniform_cost", 1, _MAX_BITS)
    layers = tuple(_check_mapping(sizes, "sizes"))
    checked_sizes = _check_sizes(sizes, layers)
    checked_macs = _check_macs(macs, layers, reference="sizes")
    fixed = _check_act_bits(act_bits, layers, checked_macs is not None)
    size = sum(n * b for n in checked_sizes.values())
    if checked_macs is None:
        return size, None
    return size, float(sum(m * b * fixed.get(name, b) for name, m in checked_macs.items()))
