r"""How far K-FAC (Martens & Grosse 2015) is from the Gauss-Newton matrix it approximates.

For the GGN :math:`G` and its K-FAC approximation :math:`K` (exact Gauss-Newton factors,
:class:`~secondorder.operators.KFACOperator` with ``fisher="ggn"``) of the same loss, data and
parameters, :func:`compare_kfac` reports side by side

* :math:`\mathrm{tr}K` (exact, :math:`\sum \mathrm{tr}S\,\mathrm{tr}A`) and the Hutch++ estimate of
  :math:`\mathrm{tr}G`, whole and per layer;
* the top eigenvalues of :math:`K` (exact: the largest products :math:`\lambda_S\lambda_A` of its
  factors' eigenvalues) and of :math:`G` (Lanczos), whole and per layer;
* the relative Frobenius distance :math:`r = \|G-K\|_F/\|G\|_F`, from Rademacher probes
  :math:`z_i`: :math:`\mathbb E\|(G-K)z\|^2 = \|G-K\|_F^2` and :math:`\mathbb E\|Gz\|^2 = \|G\|_F^2`
  (Hutchinson), :math:`\hat r = (\sum_i d_i / \sum_i g_i)^{1/2}` with the delta-method standard
  error :math:`\mathrm{se}(\hat r) = \mathrm{sd}(d_i - \hat r^2 g_i)/(2\hat r\,\bar g\sqrt n)`.
  It counts what K-FAC drops between layers (the off-diagonal blocks) and what its Kronecker
  structure misses within a layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from secondorder.linalg.results import EigenResult, Serializable, TraceResult
from secondorder.operators.base import LinearOperator
from secondorder.operators.kfac import KFACOperator

__all__ = ["KFACComparison", "KFACLayer", "compare_kfac"]


@dataclass(frozen=True)
class KFACLayer:
    """One layer: K-FAC's exact trace and top eigenvalue beside the GGN block's estimates."""

    name: str
    size: int
    trace: float
    ggn_trace: float
    ggn_trace_stderr: float
    top_eigenvalue: float
    ggn_top_eigenvalue: float


@dataclass(frozen=True, eq=False)
class KFACComparison(Serializable):
    """K-FAC against the GGN (module docstring); ``top`` and ``ggn_top`` are largest first."""

    trace: float
    ggn_trace: float
    ggn_trace_stderr: float
    top: tuple[float, ...]
    ggn_top: tuple[float, ...]
    distance: float
    distance_stderr: float
    num_probes: int
    layers: tuple[KFACLayer, ...]


def top_eigenvalues(op: KFACOperator, k: int) -> torch.Tensor:
    """The ``k`` largest eigenvalues of a K-FAC operator, exactly, from its factors' eigenvalues."""
    return _largest_products(op.factor_eigendecomposition(), k)


def _largest_products(eig: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]], k: int) -> torch.Tensor:
    return torch.cat([torch.outer(ls, la).flatten() for la, _, ls, _ in eig]).topk(k).values


def frobenius_distance(G: LinearOperator, K: LinearOperator, num_probes: int, seed: int) -> tuple[float, float]:
    r""":math:`\|G-K\|_F/\|G\|_F` and its standard error from ``num_probes`` Rademacher probes."""
    if num_probes < 2:
        raise ValueError(f"num_probes must be >= 2 (for a standard error), got {num_probes}")
    gen = torch.Generator(device=G.device).manual_seed(seed)
    Z = torch.randint(0, 2, (G.shape[0], num_probes), generator=gen, device=G.device).to(G.dtype) * 2 - 1
    GZ = G @ Z
    d = (GZ - K @ Z).square().sum(0).double()
    g = GZ.square().sum(0).double()
    if float(g.sum()) == 0:
        raise ValueError("the Gauss-Newton matrix is zero on every probe: there is no curvature to compare with")
    ratio = float(d.sum() / g.sum())
    r = math.sqrt(ratio)
    stderr = float((d - ratio * g).std()) / (float(g.mean()) * math.sqrt(num_probes))
    return r, (stderr / (2 * r) if r > 0 else 0.0)


def compare_kfac(G: LinearOperator, K: KFACOperator, ggn_trace: TraceResult, ggn_top: EigenResult,
                 ggn_blocks: dict[str, EigenResult], num_probes: int = 30, seed: int = 0) -> KFACComparison:
    """K-FAC ``K`` against the GGN ``G`` (module docstring), reusing the GGN's trace, top eigenvalues
    and per-block eigenvalues measured elsewhere; ``num_probes`` products of each for the distance.
    """
    k = ggn_top.eigenvalues.numel()
    distance, stderr = frobenius_distance(G, K, num_probes, seed)
    eig = K.factor_eigendecomposition()
    exact = {f.name: (f, e) for f, e in zip(K.factors, eig)}
    layers = []
    for b in ggn_trace.blocks:
        f, (la, _, ls, _) = exact[b.name]
        layers.append(KFACLayer(b.name, b.size, float(torch.trace(f.S) * torch.trace(f.A)), b.value, b.stderr,
                                float(ls.max() * la.max()), float(ggn_blocks[b.name].eigenvalues[0])))
    return KFACComparison(trace=K.trace(), ggn_trace=ggn_trace.value, ggn_trace_stderr=ggn_trace.stderr,
                          top=tuple(_largest_products(eig, k).tolist()), ggn_top=tuple(ggn_top.eigenvalues.tolist()),
                          distance=distance, distance_stderr=stderr, num_probes=num_probes, layers=tuple(layers))
