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

Tied layers form one item whose bit width all of them take; pinned layers have one option.
Every solver reports :math:`\sum\Omega` through the same summation (items in layer order, a tie
group's members summed first), so results of different solvers compare exactly. Ties between
equal optima are broken the same way everywhere: the smaller size, then the lexicographically
smallest bit widths in layer order.

Pure numpy/scipy; no torch and no random numbers.
"""

from __future__ import annotations

import itertools
import math
import numbers
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from secondorder import validation

__all__ = [
    "Allocation",
    "allocate_bits",
    "allocate_bits_ilp",
    "brute_force",
    "enumerate_configurations",
    "interpolated_budget",
    "pareto_frontier",
    "uniform_cost",
]

MAX_CONFIGURATIONS = 1_000_000
_MAX_BITS = 32
_INT64_SAFE = 2**62
_OBJECTIVE_SCALE = 1e4  # the ILP objective's largest coefficient after rescaling (see _ilp_objective)

SensitivityTable = Mapping[str, Mapping[int, float]]


@dataclass(frozen=True)
class Allocation:
    r"""One bit width per layer and what it costs.

    ``sensitivity`` is :math:`\sum_i \Omega_i(b_i)`; ``size_bits`` is :math:`\sum_i n_i b_i`;
    ``bops`` (when MACs were given) :math:`\sum_i \mathrm{MACs}_i b_i a_i(b_i)`; ``latency`` (when a
    table was given) :math:`\sum_i T_i(b_i)`; ``solver`` is ``"dp"``, ``"milp"`` or ``"brute-force"``;
    ``num_weights`` is :math:`\sum_i n_i`.
    """

    bits: dict[str, int]
    sensitivity: float
    size_bits: int
    bops: float | None
    latency: float | None
    solver: str
    num_weights: int

    @property
    def size_bytes(self) -> float:
        """The model size in bytes, ``size_bits / 8``."""
        return self.size_bits / 8

    @property
    def average_bits(self) -> float:
        """Bits per weight, ``size_bits / sum_i n_i`` (NaN when every layer is empty)."""
        return self.size_bits / self.num_weights if self.num_weights else math.nan


# --------------------------------------------------------------------------- validation


@dataclass(frozen=True)
class _Problem:
    """Validated inputs; ``items`` are the tie groups and lone layers ordered by first layer."""

    layers: tuple[str, ...]
    omega: dict[str, dict[int, float]]
    sizes: dict[str, int]
    items: tuple[tuple[str, ...], ...]
    options: tuple[tuple[int, ...], ...]
    macs: dict[str, int] | None
    act_bits: dict[str, int]
    latency: dict[str, dict[int, float]] | None


@dataclass(frozen=True)
class _Budgets:
    size: float | None = None
    bops: float | None = None
    latency: float | None = None



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


def _check_sensitivity(sensitivity: SensitivityTable) -> dict[str, dict[int, float]]:
    _check_mapping(sensitivity, "sensitivity")
    if not sensitivity:
        raise ValueError("sensitivity has no layers")
    return {
        name: _check_table(table, f"sensitivity[{name!r}]", _check_real) for name, table in sensitivity.items()
    }


def _check_sizes(sizes: Mapping[str, int], layers: Sequence[str]) -> dict[str, int]:
    _check_same_names("sizes", _check_mapping(sizes, "sizes"), layers)
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
    pinned: Mapping[str, int] | None, layers: Sequence[str], omega: dict[str, dict[int, float]]
) -> dict[str, int]:
    if pinned is None:
        return {}
    _check_mapping(pinned, "pinned")
    _check_known("pinned", list(pinned), layers)
    checked = {name: validation.bit_width(b, f"pinned[{name!r}]", 1, _MAX_BITS) for name, b in pinned.items()}
    for name, b in checked.items():
        if b not in omega[name]:
            raise ValueError(
                f"pinned[{name!r}] = {b} is not a candidate bit width of that layer; candidates: {list(omega[name])}"
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


def _tie_options(group: tuple[str, ...], omega: dict[str, dict[int, float]]) -> tuple[int, ...]:
    """The candidate bit widths of a tie group, which must be the same for all its layers."""
    sets = {name: tuple(omega[name]) for name in group}
    if len(set(sets.values())) > 1:
        raise ValueError(f"tied layers must have the same candidate bit widths; got {sets}")
    return sets[group[0]]


def _item_options(group: tuple[str, ...], omega: dict[str, dict[int, float]], pins: dict[str, int]) -> tuple[int, ...]:
    """One item's options: its candidates, or its one pinned bit width."""
    options = _tie_options(group, omega)
    pinned = {name: pins[name] for name in group if name in pins}
    if len(set(pinned.values())) > 1:
        raise ValueError(f"tied layers are pinned to different bit widths: {pinned}")
    return (next(iter(pinned.values())),) if pinned else options


def _build_items(
    layers: Sequence[str], omega: dict[str, dict[int, float]], pins: dict[str, int], groups: list[tuple[str, ...]]
) -> tuple[tuple[tuple[str, ...], ...], tuple[tuple[int, ...], ...]]:
    """Tie groups and lone layers as items, ordered by their first layer."""
    group_of = {name: group for group in groups for name in group}
    items: list[tuple[str, ...]] = []
    for name in layers:
        group = group_of.get(name, (name,))
        if group[0] == name:
            items.append(group)
    return tuple(items), tuple(_item_options(item, omega, pins) for item in items)


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
    """Check every input (shared by all solvers) and build the items."""
    omega = _check_sensitivity(sensitivity)
    layers = tuple(omega)
    checked_macs = _check_macs(macs, layers)
    items, options = _build_items(
        layers, omega, _check_pinned(pinned, layers, omega), _check_tied(tied, layers)
    )
    return _Problem(
        layers=layers,
        omega=omega,
        sizes=_check_sizes(sizes, layers),
        items=items,
        options=options,
        macs=checked_macs,
        act_bits=_check_act_bits(act_bits, layers, checked_macs is not None),
        latency=_check_latency(latency, layers, omega),
    )


def _check_budgets(problem: _Problem, size: object, bops: object, latency: object) -> _Budgets:
    """Budgets as floats; one given without the data it constrains is an error."""
    if bops is not None and problem.macs is None:
        raise ValueError("bops_budget needs macs (the MACs of every layer)")
    if latency is not None and problem.latency is None:
        raise ValueError("latency_budget needs latency (a latency table per layer and bit width)")
    return _Budgets(
        size=None if size is None else _check_real(size, "size_budget_bits"),
        bops=None if bops is None else _check_real(bops, "bops_budget"),
        latency=None if latency is None else _check_real(latency, "latency_budget"),
    )


# --------------------------------------------------------------------------- per-item quantities


def _item_size(p: _Problem, k: int, b: int) -> int:
    """Size in bits of item ``k`` at ``b`` bits: ``sum_{i in item} n_i b``."""
    return sum(p.sizes[name] for name in p.items[k]) * b


def _item_cost(p: _Problem, k: int, b: int) -> float:
    """``sum_{i in item} Omega_i(b)``, members in layer order."""
    cost = 0.0
    for name in p.items[k]:
        cost += p.omega[name][b]
    return cost


def _item_bops(p: _Problem, k: int, b: int) -> int:
    """``sum_{i in item} MACs_i * b * a_i(b)``; activations follow ``b`` unless fixed."""
    assert p.macs is not None
    return sum(p.macs[name] * b * p.act_bits.get(name, b) for name in p.items[k])


def _item_latency(p: _Problem, k: int, b: int) -> float:
    """``sum_{i in item} T_i(b)``, members in layer order."""
    assert p.latency is not None
    total = 0.0
    for name in p.items[k]:
        total += p.latency[name][b]
    return total


def _minimum(p: _Problem, quantity: Callable[[_Problem, int, int], float]) -> float:
    """The smallest achievable total: every item at its cheapest option (the quantities are additive)."""
    return sum(min(quantity(p, k, b) for b in p.options[k]) for k in range(len(p.items)))


def _allocation(p: _Problem, choice: Sequence[int], solver: str) -> Allocation:
    """The :class:`Allocation` of one bit width per item; every solver reports through here."""
    cost, latency = 0.0, 0.0
    for k, b in enumerate(choice):
        cost += _item_cost(p, k, b)
        if p.latency is not None:
            latency += _item_latency(p, k, b)
    by_layer = {name: b for k, b in enumerate(choice) for name in p.items[k]}
    return Allocation(
        bits={name: int(by_layer[name]) for name in p.layers},
        sensitivity=cost,
        size_bits=sum(_item_size(p, k, b) for k, b in enumerate(choice)),
        bops=None if p.macs is None else float(sum(_item_bops(p, k, b) for k, b in enumerate(choice))),
        latency=None if p.latency is None else latency,
        solver=solver,
        num_weights=sum(p.sizes.values()),
    )


# --------------------------------------------------------------------------- feasibility messages


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:.10g}"


_PINS = "respecting pins and ties"


def _bound_checks(p: _Problem, budgets: _Budgets) -> list[tuple[str, float, float, str]]:
    """(what, budget, smallest achievable, how) for every given budget."""
    checks = []
    if budgets.size is not None:
        checks.append(("size budget {} bits", budgets.size, _minimum(p, _item_size),
                       "the smallest feasible model, {} bits (all layers at their lowest bits, " + _PINS + ")"))
    if budgets.bops is not None:
        checks.append(("BOPs budget {}", budgets.bops, _minimum(p, _item_bops),
                       "the smallest achievable BOPs, {} (all layers at their lowest bits, " + _PINS + ")"))
    if budgets.latency is not None:
        checks.append(("latency budget {}", budgets.latency, _minimum(p, _item_latency),
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


def _item_arrays(p: _Problem, k: int) -> tuple[np.ndarray, np.ndarray]:
    sizes = np.array([_item_size(p, k, b) for b in p.options[k]], dtype=np.int64)
    costs = np.array([_item_cost(p, k, b) for b in p.options[k]], dtype=np.float64)
    return sizes, costs


def _pareto_step(
    state: tuple[np.ndarray, np.ndarray, np.ndarray], item: tuple[np.ndarray, np.ndarray], limit: int | None
) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], np.ndarray, np.ndarray]:
    """Extend every non-dominated partial solution by every option of one item and prune.

    ``state`` is (size, cost, lexicographic rank of the choices so far), sorted by size with
    strictly decreasing cost. A candidate survives if it fits ``limit`` and its cost is below that
    of every candidate with smaller size, or equal size and (lower cost, or equal cost and
    lexicographically smaller choices). Returns the new state and each survivor's parent and option.
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


def _pareto_dp(p: _Problem, limit: int | None) -> tuple[np.ndarray, list[tuple[int, ...]]]:
    """Final non-dominated (size, cost) states, sorted by size, and their bit widths per item.

    Exact multiple-choice knapsack: a partial solution dominated in (size, cost) is dominated in
    every completion, and one that cannot fit ``limit`` even with the smallest remaining options is
    dropped, so only the Pareto set is carried from item to item.
    """
    arrays = [_item_arrays(p, k) for k in range(len(p.items))]
    remaining = np.cumsum([0] + [int(a[0].min()) for a in arrays[::-1]])[::-1]  # smallest size of items k..
    state = (np.zeros(1, np.int64), np.zeros(1, np.float64), np.zeros(1, np.int64))
    history = []
    for k, item in enumerate(arrays):
        state, parent, option = _pareto_step(state, item, None if limit is None else limit - int(remaining[k + 1]))
        history.append((parent, option))
    index = np.arange(len(state[0]))
    chosen = np.empty((len(index), len(arrays)), dtype=np.int64)
    for k in range(len(arrays) - 1, -1, -1):
        parent, option = history[k]
        chosen[:, k] = np.asarray(p.options[k])[option[index]]
        index = parent[index]
    return state[0], [tuple(int(b) for b in row) for row in chosen]


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


def _ilp_variables(p: _Problem) -> list[tuple[str, int]]:
    """One binary variable ``x_{i,b}`` per layer and candidate bit width, in layer order."""
    return [(name, b) for name in p.layers for b in p.omega[name]]


def _ilp_objective(p: _Problem, variables: list[tuple[str, int]]) -> np.ndarray:
    r""":math:`\Omega_i(b)` less each layer's minimum, scaled so the largest coefficient is 1e4.

    Subtracting a per-layer constant (one :math:`x_{i,b}` is 1 per layer) and scaling leave the
    argmin unchanged; they keep HiGHS's absolute MIP gap (1e-6) negligible whatever the scale of
    :math:`\Omega`.
    """
    c = np.array([p.omega[name][b] - min(p.omega[name].values()) for name, b in variables])
    top = float(c.max())
    return c * (_OBJECTIVE_SCALE / top) if top > 0 else c


def _ilp_structure(p: _Problem, variables: list[tuple[str, int]]) -> tuple[np.ndarray, np.ndarray]:
    r"""Equality rows: :math:`\sum_b x_{i,b}=1` per layer, :math:`x_{i,b}=x_{j,b}` within each tie group."""
    index = {v: j for j, v in enumerate(variables)}
    rows = []
    for name in p.layers:
        row = np.zeros(len(variables))
        row[[index[(name, b)] for b in p.omega[name]]] = 1.0
        rows.append((row, 1.0))
    for item in p.items:
        for other in item[1:]:
            for b in p.omega[item[0]]:
                row = np.zeros(len(variables))
                row[index[(item[0], b)]], row[index[(other, b)]] = 1.0, -1.0
                rows.append((row, 0.0))
    return np.array([r for r, _ in rows]), np.array([v for _, v in rows])


def _layer_quantities(p: _Problem, name: str, b: int) -> dict[str, float]:
    """Size, BOPs and latency of one layer at ``b`` bits (those whose data were given)."""
    out = {"size": float(p.sizes[name] * b)}
    if p.macs is not None:
        out["bops"] = float(p.macs[name] * b * p.act_bits.get(name, b))
    if p.latency is not None:
        out["latency"] = p.latency[name][b]
    return out


def _ilp_budget_rows(
    p: _Problem, variables: list[tuple[str, int]], budgets: _Budgets
) -> tuple[np.ndarray, np.ndarray]:
    """One ``<=`` row per given budget.

    Size and BOPs are integers, so their bound is ``floor(budget) + 1/2``: half a unit of slack on
    both sides of the integer limit, which the solver's tolerances cannot cross.
    """
    rows, bounds = [], []
    for key, limit in (("size", budgets.size), ("bops", budgets.bops), ("latency", budgets.latency)):
        if limit is None:
            continue
        rows.append([_layer_quantities(p, name, b)[key] for name, b in variables])
        bounds.append(limit if key == "latency" else math.floor(limit) + 0.5)
    return np.array(rows).reshape(len(rows), len(variables)), np.array(bounds)


def _ilp_bounds(p: _Problem, variables: list[tuple[str, int]]) -> Bounds:
    """``0 <= x <= 1``; a pinned layer's variable fixed at 1."""
    pins = {item[0]: opts[0] for item, opts in zip(p.items, p.options) if len(opts) == 1}
    lower = np.array([1.0 if pins.get(name) == b else 0.0 for name, b in variables])
    return Bounds(lower, np.ones(len(variables)))


def _ilp_choice(p: _Problem, variables: list[tuple[str, int]], x: np.ndarray) -> list[int]:
    """Each item's bit width from the solver's (near-)binary solution."""
    bits = {}
    for name in p.layers:
        candidates = [(x[j], b) for j, (n, b) in enumerate(variables) if n == name]
        bits[name] = max(candidates)[1]
    return [bits[item[0]] for item in p.items]


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
    budgets = _check_budgets(p, size_budget_bits, bops_budget, latency_budget)
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


# --------------------------------------------------------------------------- enumeration


def _enumerate(p: _Problem) -> list[Allocation]:
    """Every configuration of the items, lexicographic in the bits (ValueError above the cap)."""
    count = math.prod(len(opts) for opts in p.options)
    if count > MAX_CONFIGURATIONS:
        raise ValueError(
            f"{count} configurations is more than the {MAX_CONFIGURATIONS} that are enumerated; "
            "use allocate_bits or allocate_bits_ilp"
        )
    return [_allocation(p, choice, "brute-force") for choice in itertools.product(*p.options)]


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
    budgets = _check_budgets(p, size_budget_bits, bops_budget, latency_budget)
    _require_each_feasible(p, budgets)
    feasible = [a for a in _enumerate(p) if _satisfies(a, budgets)]
    if not feasible:
        raise _jointly_infeasible(p, budgets)
    return min(feasible, key=lambda a: (a.sensitivity, a.size_bits))  # min keeps the first: lexicographic


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
