r"""Loss landscapes along Hessian eigenvectors and random directions (Yao, Gholami, Lei, Keutzer, Mahoney,
"Hessian-based analysis of large batch training and robustness to adversaries", NeurIPS 2018).

For unit directions :math:`v` (and :math:`w`) in parameter space the 1-D landscape is
:math:`f(\alpha) = L(\theta + \alpha v)` and the 2-D one :math:`f(\alpha, \beta) = L(\theta + \alpha v + \beta w)`,
with :math:`L` the data-set mean loss the curvature operator defines (same batches, same weighting,
same dropout masks). Along the top eigenvector :math:`f(\alpha) \approx L + \alpha\,g^\top v + \tfrac12 \lambda_1 \alpha^2`
near 0, so a larger top eigenvalue shows as a sharper valley; a random direction sees roughly
the average curvature :math:`\mathrm{tr}(H)/P`, which is why the comparison is instructive.

The parameters are shifted in place under ``torch.no_grad()`` and restored bit for bit in a
``finally`` block, so loss closures that call the model directly work too; nothing else of the
model changes (mode, buffers and the global RNG are kept by the operator).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import Tensor

from secondorder.operators.curvature import CurvatureOperator
from secondorder.operators.params import split_rows
from secondorder.operators.risk import NonFiniteError

__all__ = ["Landscape1D", "Landscape2D", "landscape_1d", "landscape_2d", "random_directions"]


@dataclass(frozen=True)
class Landscape1D:
    """Losses ``losses[d][i] = L(theta + alphas[i] * direction_d)`` for named unit directions."""

    alphas: tuple[float, ...]
    names: tuple[str, ...]
    losses: tuple[tuple[float, ...], ...]

    def sharpness(self, name: str) -> float:
        """Curvature of the best quadratic fit ``a + b alpha + c alpha^2`` as ``2c`` (near ``lambda`` for an eigenvector)."""
        losses = torch.tensor(self.losses[self.names.index(name)], dtype=torch.float64)
        alphas = torch.tensor(self.alphas, dtype=torch.float64)
        keep = torch.isfinite(losses)
        basis = torch.stack([torch.ones_like(alphas), alphas, alphas**2], 1)[keep]
        coef = torch.linalg.lstsq(basis, losses[keep, None]).solution
        return float(2 * coef[2])


@dataclass(frozen=True)
class Landscape2D:
    """Losses ``losses[i][j] = L(theta + alphas[i] * first + betas[j] * second)``."""

    alphas: tuple[float, ...]
    betas: tuple[float, ...]
    names: tuple[str, str]
    losses: tuple[tuple[float, ...], ...]


def random_directions(num: int, size: int, seed: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``[size, num]`` Gaussian directions scaled to unit norm, from a private generator."""
    gen = torch.Generator().manual_seed(seed)
    V = torch.randn(size, num, generator=gen, dtype=torch.float64)
    return (V / V.norm(dim=0)).to(dtype=dtype, device=device)


@contextmanager
def _shifted(op: CurvatureOperator) -> Iterator:
    """Yield ``shift(delta)`` that sets the parameters to ``theta + delta``; theta is restored on exit."""
    saved = [p.detach().clone() for p in op.params]

    def shift(delta: Tensor) -> None:
        for p, s, d in zip(op.params, saved, split_rows(delta[None], op.params)):
            p.copy_(s + d[0])

    try:
        with torch.no_grad():
            yield shift
    finally:
        with torch.no_grad():
            for p, s in zip(op.params, saved):
                p.copy_(s)


def _loss_at(op: CurvatureOperator, shift, delta: Tensor) -> float:
    shift(delta)
    try:
        return op.loss_and_gradient(gradient=False)[0]
    except NonFiniteError:
        return math.inf


def _check_directions(op: CurvatureOperator, directions: Tensor, names: Sequence[str]) -> Tensor:
    directions = torch.as_tensor(directions)
    if directions.ndim == 1:
        directions = directions[:, None]
    if directions.ndim != 2 or directions.shape[0] != op.shape[0]:
        raise ValueError(f"directions must be [P, d] with P = {op.shape[0]} parameters, got {list(directions.shape)}")
    if len(names) != directions.shape[1]:
        raise ValueError(f"{directions.shape[1]} directions but {len(names)} names")
    return directions.to(dtype=op.dtype, device=op.device)


def _grid(radius: float, num_points: int) -> tuple[float, ...]:
    if not radius > 0 or num_points < 3:
        raise ValueError(f"radius must be > 0 and num_points >= 3, got {radius} and {num_points}")
    return tuple(torch.linspace(-radius, radius, num_points, dtype=torch.float64).tolist())


def landscape_1d(op: CurvatureOperator, directions: Tensor, names: Sequence[str], radius: float = 1.0,
                 num_points: int = 41, progress: bool = False) -> Landscape1D:
    """The data-set loss along each column of ``directions`` ``[P, d]`` for ``alpha`` in ``[-radius, radius]``."""
    from tqdm import tqdm

    directions = _check_directions(op, directions, names)
    alphas = _grid(radius, num_points)
    bar = tqdm(total=len(alphas) * directions.shape[1], desc="landscape 1-D", unit="point", disable=not progress,
               leave=False)
    curves = []
    with _shifted(op) as shift:
        for d in directions.T:
            curve = []
            for a in alphas:
                curve.append(_loss_at(op, shift, a * d))
                bar.update()
            curves.append(tuple(curve))
    bar.close()
    return Landscape1D(alphas, tuple(names), tuple(curves))


def landscape_2d(op: CurvatureOperator, first: Tensor, second: Tensor, names: tuple[str, str],
                 radius: float = 1.0, num_points: int = 21, progress: bool = False) -> Landscape2D:
    """The data-set loss on the plane ``theta + alpha * first + beta * second``, a ``num_points`` square grid."""
    from tqdm import tqdm

    plane = _check_directions(op, torch.stack([torch.as_tensor(first), torch.as_tensor(second)], 1), names)
    alphas = _grid(radius, num_points)
    bar = tqdm(total=len(alphas) ** 2, desc="landscape 2-D", unit="point", disable=not progress, leave=False)
    rows = []
    with _shifted(op) as shift:
        for a in alphas:
            row = []
            for b in alphas:
                row.append(_loss_at(op, shift, a * plane[:, 0] + b * plane[:, 1]))
                bar.update()
            rows.append(tuple(row))
    bar.close()
    return Landscape2D(alphas, alphas, (names[0], names[1]), tuple(rows))
