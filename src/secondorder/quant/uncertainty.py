r"""Bit allocation that knows the error bars of its sensitivities.

HAWQ-V2's :math:`\Omega_i(b) = \frac{T_i}{n_i}\,e_i(b)` (trace :math:`T_i`, size :math:`n_i`, quantization
error :math:`e_i(b) = \|Q_b(W_i)-W_i\|^2`) is linear in the estimated trace, whose Hutch++ /
Hutchinson estimate comes with a standard error :math:`\sigma_i`. Three uses of it:

* :func:`confidence_omega`: :math:`\Omega_i` at the upper confidence bound :math:`T_i + z\sigma_i`, so
  a layer whose curvature is uncertain is treated as possibly as sensitive as it might be (the
  robust allocation: solve the DP/ILP on it);
* :func:`beats_probability`: the probability that configuration :math:`a` has a smaller
  :math:`\sum\Omega` than :math:`b`, under the normal approximation of the traces:
  :math:`\sum_i \frac{T_i}{n_i}(e_i(a_i) - e_i(b_i))` has mean from the estimates and variance
  :math:`\sum_i \big(\frac{\sigma_i}{n_i}(e_i(a_i)-e_i(b_i))\big)^2`;
* :func:`parametric_stability` / :func:`redraw_stability`: how often the allocation changes when
  the traces are redrawn, either from :math:`\mathcal N(T_i, \sigma_i^2)` (cheap: no Hessian
  products) or by recomputing the sensitivities with new probes (honest: the real estimator).

The traces of all layers come from one probe set, so their errors are correlated; the normal
model treats them as independent (the per-layer errors are what the estimator reports). Any
entry with ``name``, ``size``, ``trace``, ``trace_stderr`` and ``errors`` works:
:class:`~secondorder.quant.sensitivity.LayerSensitivity` and the activation sensitivities.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from secondorder.quant.allocation import Allocation
from secondorder.quant.sensitivity import TraceEstimate, omega_from_traces

__all__ = [
    "Stability",
    "beats_probability",
    "confidence_omega",
    "omega_from_traces",
    "parametric_stability",
    "redraw_stability",
]

Table = dict[str, dict[int, float]]


@dataclass(frozen=True)
class Stability:
    """How often an allocation is chosen again when the sensitivities are redrawn.

    ``frequency`` is the fraction of the ``redraws`` giving exactly ``bits`` (and ``act_bits``), with
    its binomial standard error ``stderr``; ``distinct`` the number of different configurations
    seen; ``most_common`` up to five ``(bits, count)`` (bits as ``{layer: w}`` or ``{layer: (w, a)}``);
    ``method`` ``"parametric"`` (traces from their normal approximation) or ``"probes"`` (new
    probes).
    """

    bits: dict[str, int]
    act_bits: dict[str, int] | None
    frequency: float
    stderr: float
    redraws: int
    distinct: int
    most_common: tuple[tuple[dict[str, Any], int], ...]
    method: str

    def as_dict(self) -> dict:
        """A JSON-ready summary."""
        return {"frequency": self.frequency, "stderr": self.stderr, "redraws": self.redraws,
                "distinct": self.distinct, "method": self.method,
                "most_common": [{"bits": b, "count": c} for b, c in self.most_common]}


def _check_z(z: float) -> float:
    if isinstance(z, bool) or not isinstance(z, (int, float)) or not math.isfinite(z):
        raise ValueError(f"z must be a finite number (standard errors above the estimate), got {z!r}")
    return float(z)


def confidence_omega(entries: Sequence[TraceEstimate], z: float = 1.645) -> Table:
    r""":math:`\Omega_i(b)` at :math:`T_i + z\,\sigma_i` (one-sided 95 % upper bound for the default ``z``)."""
    z = _check_z(z)
    return omega_from_traces(entries, {x.name: x.trace + z * x.trace_stderr for x in entries})


def beats_probability(entries: Sequence[TraceEstimate], first: Mapping[str, int], second: Mapping[str, int]) -> float:
    r"""P(:math:`\sum\Omega(\text{first}) < \sum\Omega(\text{second})`) under independent normal traces.

    1 or 0 when the difference has no variance (equal configurations give 0.5).
    """
    mean = variance = 0.0
    for x in entries:
        if x.name not in first or x.name not in second:
            raise ValueError(f"both configurations need a bit width for layer {x.name!r}")
        d = (x.errors[first[x.name]] - x.errors[second[x.name]]) / x.size
        mean += x.trace * d
        variance += (x.trace_stderr * d) ** 2
    if variance == 0.0:
        return 0.5 if mean == 0.0 else float(mean < 0.0)
    return 0.5 * math.erfc(mean / math.sqrt(2.0 * variance))


def _key(a: Allocation) -> tuple:
    act = a.act_bits or {}
    return tuple((n, b, act.get(n)) for n, b in a.bits.items())


def _readable(key: tuple) -> dict[str, Any]:
    return {n: b if a is None else (b, a) for n, b, a in key}


def _stability(chosen: Allocation, found: Iterable[Allocation], method: str) -> Stability:
    counts = Counter(_key(a) for a in found)
    total = sum(counts.values())
    if total == 0:
        raise ValueError("redraws must be >= 1")
    p = counts[_key(chosen)] / total
    return Stability(
        bits=dict(chosen.bits), act_bits=None if chosen.act_bits is None else dict(chosen.act_bits),
        frequency=p, stderr=math.sqrt(p * (1 - p) / total), redraws=total, distinct=len(counts),
        most_common=tuple((_readable(k), c) for k, c in counts.most_common(5)), method=method,
    )


def parametric_stability(
    groups: Sequence[Sequence[TraceEstimate]], solve: Callable[..., Allocation], chosen: Allocation, *,
    redraws: int = 200, seed: int = 0,
) -> Stability:
    r"""Redraw every trace from :math:`\mathcal N(T_i, \sigma_i^2)`, rebuild :math:`\Omega` and re-solve.

    ``groups`` are the sensitivity sets ``solve`` takes, in order (e.g. ``[weights]``, or
    ``[weights, activations]`` for a joint allocation); ``solve(*tables)`` returns an
    :class:`~secondorder.quant.allocation.Allocation` and must not draw random numbers. numpy's
    generator seeded by ``seed``; the global RNGs are not touched.
    """
    if isinstance(redraws, bool) or not isinstance(redraws, int) or redraws < 1:
        raise ValueError(f"redraws must be a positive int, got {redraws!r}")
    rng = np.random.default_rng(seed)

    def draws() -> Iterable[Allocation]:
        for _ in range(redraws):
            tables = [omega_from_traces(g, {x.name: float(x.trace + x.trace_stderr * rng.standard_normal())
                                            for x in g}) for g in groups]
            yield solve(*tables)

    return _stability(chosen, draws(), "parametric")


def redraw_stability(
    estimate: Callable[[int], Sequence[Table]], solve: Callable[..., Allocation], chosen: Allocation,
    seeds: Iterable[int],
) -> Stability:
    """Recompute the sensitivity tables with each probe seed (``estimate(seed)``), re-solve and count."""
    return _stability(chosen, (solve(*estimate(s)) for s in seeds), "probes")
