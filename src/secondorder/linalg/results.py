"""Results of the algorithms: small frozen dataclasses that carry their uncertainty.

Every result is :class:`Serializable`: ``to_dict()`` is JSON-ready (tensors as
``{"dtype", "shape", "data"}``), ``from_dict`` rebuilds it exactly, and ``==`` compares tensors
bit for bit, so reports embed these results instead of re-wrapping them.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor

S = TypeVar("S", bound="Serializable")


def jsonable(value: Any) -> Any:
    """``value`` with dataclasses as dicts, tuples as lists and tensors as ``{"dtype", "shape", "data"}``."""
    if isinstance(value, Tensor):
        t = value.detach().cpu()
        return {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape), "data": t.reshape(-1).tolist()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (tuple, list)):
        return [jsonable(v) for v in value]
    return value


def rebuild(kind: Any, value: Any) -> Any:
    """The inverse of :func:`jsonable` for a value of type ``kind`` (a dataclass, ``Tensor``,
    ``tuple[...]``, ``X | None``, or a plain type).
    """
    if value is None:
        return None
    if isinstance(kind, type) and dataclasses.is_dataclass(kind):
        hints = typing.get_type_hints(kind)
        return kind(**{f.name: rebuild(hints[f.name], value[f.name]) for f in dataclasses.fields(kind)
                       if f.name in value})
    if kind is Tensor:
        return torch.tensor(value["data"], dtype=getattr(torch, value["dtype"])).reshape(value["shape"])
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is tuple:
        items = args[:1] * len(value) if len(args) == 2 and args[1] is Ellipsis else args
        return tuple(rebuild(k, v) for k, v in zip(items, value))
    if args and origin is not dict:  # X | None
        return rebuild(next(a for a in args if a is not type(None)), value)
    return value


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return (isinstance(a, Tensor) and isinstance(b, Tensor) and a.dtype == b.dtype and a.shape == b.shape
                and bool(torch.equal(a.cpu(), b.cpu())))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return bool(a == b)


class Serializable:
    """``to_dict`` / ``from_dict`` (exact round trip) and bitwise ``==`` for a frozen result dataclass."""

    def to_dict(self) -> dict:
        """The result as JSON-ready dicts, lists and numbers."""
        return jsonable(self)

    @classmethod
    def from_dict(cls: type[S], d: dict) -> S:
        """The result that :meth:`to_dict` gave ``d``."""
        return rebuild(cls, d)

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and all(
            _same(getattr(self, f.name), getattr(other, f.name)) for f in dataclasses.fields(self))  # type: ignore

    __hash__ = None  # type: ignore[assignment]  # results hold tensors


def _t_quantile(level: float, dof: int) -> float:
    from scipy.stats import t

    return float(t.ppf(0.5 + level / 2, dof)) if dof > 0 else math.inf


BOOTSTRAP_RESAMPLES = 2000


def _bootstrap_t(samples: tuple[float, ...], level: float) -> tuple[float, float]:
    """The bootstrap-t interval of the mean of independent ``samples``: the quantiles of
    ``(mean* - mean) / stderr*`` over resamples stand in for Student's t, so a skewed sample gets an
    asymmetric interval (Efron and Tibshirani 1993, ch. 12). Resampled with a fixed generator:
    the same result gives the same interval, and the global RNG is untouched.
    """
    x = torch.tensor(samples, dtype=torch.float64)
    n = x.numel()
    draws = x[torch.randint(n, (BOOTSTRAP_RESAMPLES, n), generator=torch.Generator().manual_seed(0))]
    stderr = float(x.std()) / math.sqrt(n)
    if stderr == 0 or bool((x == x[0]).all()):  # equal samples: the rounding of mean() can leave std ~1e-16
        return float(x.mean()), float(x.mean())
    t = (draws.mean(1) - x.mean()) / (draws.std(1) / math.sqrt(n))
    t = t[torch.isfinite(t)]  # a resample of one repeated value has no spread
    lo, hi = torch.quantile(t, torch.tensor([0.5 - level / 2, 0.5 + level / 2], dtype=torch.float64)).tolist()
    return float(x.mean()) - hi * stderr, float(x.mean()) - lo * stderr


@dataclass(frozen=True, eq=False)
class BlockTrace(Serializable):
    """The trace of one diagonal block (one layer) with its standard error."""

    name: str
    size: int
    value: float
    stderr: float

    @property
    def per_parameter(self) -> float:
        """Trace divided by the block size (HAWQ-V2's average curvature)."""
        return self.value / self.size


@dataclass(frozen=True, eq=False)
class TraceResult(Serializable):
    """A trace estimate ``value`` with standard error ``stderr`` (``dof`` degrees of freedom).

    ``blocks`` holds the per-block (per-layer) traces estimated from the same probes; they sum
    to ``value``. ``samples`` are the independent estimates of the trace whose mean is ``value``
    (Hutchinson and Hutch++; empty for XTrace, whose samples share the sketch).
    """

    value: float
    stderr: float
    num_matvecs: int
    method: str
    dof: int
    blocks: tuple[BlockTrace, ...]
    samples: tuple[float, ...] = ()

    def confidence_interval(self, level: float = 0.95) -> tuple[float, float]:
        """Bootstrap-t interval from ``samples`` when there are any (it follows their skew: a
        Student-t interval covered 0.90 instead of 0.95 on low-rank matrices), else the Student-t
        interval ``value +- t_{dof} * stderr``.
        """
        if len(self.samples) > 1:
            return _bootstrap_t(self.samples, level)
        half = _t_quantile(level, self.dof) * self.stderr
        return self.value - half, self.value + half

    def block(self, name: str) -> BlockTrace:
        """The block called ``name``."""
        for b in self.blocks:
            if b.name == name:
                return b
        raise KeyError(f"no block {name!r}; blocks are {[b.name for b in self.blocks]}")


@dataclass(frozen=True, eq=False)
class DiagonalResult(Serializable):
    """A diagonal estimate ``value`` ``[P]`` with per-entry standard errors ``stderr`` ``[P]``."""

    value: Tensor
    stderr: Tensor
    num_matvecs: int
    method: str


@dataclass(frozen=True, eq=False)
class EigenResult(Serializable):
    """Eigenpairs: ``eigenvalues`` ``[k]`` sorted for ``which``, ``eigenvectors`` ``[P, k]``.

    ``residuals[i] = ||A v_i - theta_i v_i||`` certify each pair: an eigenvalue of A lies
    within ``residuals[i]`` of ``theta_i`` (Bauer-Fike for symmetric matrices).
    ``residual_history`` holds the wanted residuals at every convergence check (every Lanczos
    step from the k-th on, every power iteration), for convergence plots.

    Residuals certify each value, not that no copies of a repeated eigenvalue were missed: a
    Krylov method from a block of ``block_size`` random vectors finds (generically) at most
    ``block_size`` copies. ``converged[i]`` is therefore ``False`` also for a pair ranked after a
    value found ``block_size`` times, where further copies may belong; a multiplicity above
    ``block_size`` of the last value returned is harmless (its copies would rank after ``k``).
    """

    eigenvalues: Tensor
    eigenvectors: Tensor
    residuals: Tensor
    converged: Tensor
    num_matvecs: int
    num_restarts: int
    which: str
    method: str
    residual_history: tuple[tuple[float, ...], ...] = ()
    block_size: int = 1


@dataclass(frozen=True, eq=False)
class SolveResult(Serializable):
    """Solution of ``(A + damping I) x = b`` with relative residual norms per right-hand side."""

    solution: Tensor
    residuals: Tensor
    converged: Tensor
    iterations: int
    num_matvecs: int
    method: str
    exits: tuple[str, ...] | None = None
    directions: Tensor | None = None


@dataclass(frozen=True, eq=False)
class SubproblemResult(Serializable):
    r"""An approximate minimizer ``step`` of a trust-region or cubic model of a function.

    ``model_decrease`` is :math:`m(0) - m(s) \ge 0` (:math:`m(s) = g^\top s + \frac12 s^\top H s`,
    plus :math:`\frac\sigma3\|s\|^3` for the cubic model), computed from the solver's own
    products; ``exit`` says why the solver stopped (``"residual"``, ``"boundary"``,
    ``"negative curvature"``, ``"iterations"``, ``"gradient"``, ``"breakdown"``, ``"stationary"``);
    ``iterations`` and ``num_matvecs`` are its cost.
    """

    step: Tensor
    model_decrease: float
    iterations: int
    num_matvecs: int
    exit: str


@dataclass(frozen=True, eq=False)
class SpectralDensityResult(Serializable):
    r"""Stochastic Lanczos quadrature: per probe, Ritz ``nodes`` and quadrature ``weights``.

    ``nodes`` and ``weights`` are ``[num_probes, num_steps]``; each row's weights sum to 1 (a
    probability measure); rows cut short by breakdown are padded with zero weights. The
    spectral density is :math:`\phi(t) \approx \frac1R \sum_r \sum_j w_{rj}\,\delta(t - \theta_{rj})`
    and :math:`\mathrm{tr}(A) \approx P\,\frac1R\sum_r\sum_j w_{rj}\theta_{rj}`.
    """

    nodes: Tensor
    weights: Tensor
    dimension: int
    num_matvecs: int

    def _sigma(self, sigma: float | None) -> float:
        if sigma is not None:
            if sigma <= 0:
                raise ValueError(f"sigma must be positive, got {sigma}")
            return sigma
        used = self.nodes[self.weights > 0].double()
        if not used.numel():
            return 1e-6
        return max(0.01 * float(used.max() - used.min()), 1e-6 * float(used.abs().max()), 1e-12)

    def density(self, grid: Tensor, sigma: float | None = None) -> Tensor:
        """Gaussian-smoothed density on ``grid`` (integrates to about 1; ``sigma`` default 1% of the range)."""
        s = self._sigma(sigma)
        grid = torch.as_tensor(grid, dtype=torch.float64)
        diff = grid[:, None, None] - self.nodes.double()[None]
        kernel = torch.exp(-0.5 * (diff / s) ** 2) / (s * math.sqrt(2 * math.pi))
        return (kernel * self.weights.double()[None]).sum(dim=(1, 2)) / self.nodes.shape[0]

    def moments(self, order: int) -> float:
        r"""Estimate of :math:`\frac1P \mathrm{tr}(A^{order})`."""
        return float((self.weights.double() * self.nodes.double() ** order).sum(1).mean())

    def trace(self) -> tuple[float, float]:
        """``(estimate, stderr)`` of ``tr(A)`` from the probes."""
        per_probe = self.dimension * (self.weights.double() * self.nodes.double()).sum(1)
        R = per_probe.numel()
        stderr = float(per_probe.std() / math.sqrt(R)) if R > 1 else math.inf
        return float(per_probe.mean()), stderr

    def plot(self, path: str | Path | None = None, ax=None, log: bool = True, sigma: float | None = None,
             num_points: int = 1000):
        """Plot the smoothed density (log scale by default, as in Ghorbani et al. 2019); save to ``path``."""
        import matplotlib

        if ax is None:
            matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        s = self._sigma(sigma)
        used = self.nodes[self.weights > 0].double()
        lo, hi = float(used.min()) - 4 * s, float(used.max()) + 4 * s
        grid = torch.linspace(lo, hi, num_points, dtype=torch.float64)
        dens = self.density(grid, s)
        fig = None
        if ax is None:
            fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(grid.numpy(), (dens + 1e-12).numpy() if log else dens.numpy())
        if log:
            ax.set_yscale("log")
        ax.set_xlabel("eigenvalue")
        ax.set_ylabel("density")
        ax.set_title(f"spectral density (SLQ, {self.nodes.shape[0]} probes, {self.nodes.shape[1]} steps)")
        if path is not None:
            (fig or ax.figure).savefig(path, dpi=120, bbox_inches="tight")
        if fig is not None and path is not None:
            plt.close(fig)
        return ax
