r"""The Hessian report of a trained network: what PyHessian computes (Yao, Gholami, Keutzer, Mahoney,
"PyHessian: neural networks through the lens of the Hessian", 2020), with error bars and per layer.

:func:`analyze` measures, on the data-set mean loss :math:`L` of the curvature operator
:math:`C` (Hessian or Gauss-Newton):

* the loss and :math:`\|\nabla L\|` (how close to a stationary point the curvature was taken);
* :math:`\mathrm{tr}(C)` by Hutch++ with its standard error and 95% interval;
* the top-k and bottom-k eigenvalues by thick-restart Lanczos, each certified by its residual
  :math:`\|Cv - \theta v\|` (an eigenvalue lies within it, Bauer-Fike), with the residual history;
* the spectral density by stochastic Lanczos quadrature (Ghorbani, Krishnan, Xiao 2019);
* per layer (diagonal block :math:`C_{bb}`): trace from the same probes, trace per parameter
  (HAWQ-V2's sensitivity) and top eigenvalue (HAWQ-V1's);
* optionally the 1-D and 2-D loss landscapes along the top eigenvectors and random directions;
* with a learning rate (or the optimizer itself), the linear-stability checks of
  :mod:`secondorder.analysis.stability`: :math:`\lambda_{\max}` against 2/lr (or the momentum's
  bound), :math:`\mathrm{tr}` against SGD's 2/lr, and for an adaptive optimizer the
  preconditioned sharpness :math:`\lambda_{\max}(P^{-1}H)` from its state against its bound;
* with ``curvature="kfac"``, all of the above for the Gauss-Newton matrix and, side by side, its
  K-FAC approximation (:mod:`secondorder.analysis.kfac_comparison`: exact traces and top
  eigenvalues of K-FAC, whole and per layer, and the relative Frobenius distance).

The result is a frozen :class:`HessianAnalysis` that serializes to JSON and loads back.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, cast

import torch

from secondorder.analysis.kfac_comparison import KFACComparison, compare_kfac
from secondorder.analysis.landscape import Landscape1D, Landscape2D, landscape_1d, landscape_2d, random_directions
from secondorder.analysis.stability import StabilityCheck, preconditioned_top, preconditioner_for, stability_check
from secondorder.linalg import block_eigenvalues, eigenvalues, spectral_density, trace
from secondorder.linalg.results import EigenResult, Serializable, SpectralDensityResult, TraceResult, jsonable
from secondorder.operators.curvature import GGNOperator, HessianOperator
from secondorder.operators.kfac import KFACOperator
from secondorder.validation import non_negative_int, positive_int

__all__ = ["HessianAnalysis", "LayerStats", "analyze"]


@dataclass(frozen=True)
class LayerStats:
    """One layer (diagonal block): trace +- stderr, trace per parameter, top eigenvalue and its residual."""

    name: str
    size: int
    trace: float
    trace_stderr: float
    trace_per_parameter: float
    top_eigenvalue: float
    top_residual: float
    top_converged: bool


@dataclass(frozen=True, eq=False)
class HessianAnalysis(Serializable):
    """Everything :func:`analyze` measured; ``to_json`` / ``from_json`` round-trip exactly.

    ``trace``, ``top``, ``bottom`` and ``density`` are the linear-algebra results themselves
    (:mod:`secondorder.linalg.results`); ``top`` and ``bottom`` keep eigenvalues, residuals and
    residual histories but not the ``P x k`` eigenvectors (``eigenvectors`` is ``[0, k]``).
    """

    curvature: str
    num_parameters: int
    num_samples: int
    loss: float
    gradient_norm: float
    trace: TraceResult
    top: EigenResult
    bottom: EigenResult | None
    density: SpectralDensityResult
    layers: tuple[LayerStats, ...]
    landscape_1d: Landscape1D | None
    landscape_2d: Landscape2D | None
    seed: int
    seconds: float
    num_matvecs: int
    kfac: KFACComparison | None = None
    stability: StabilityCheck | None = None

    @classmethod
    def from_dict(cls, d: dict) -> "HessianAnalysis":
        """The analysis :meth:`to_dict` gave ``d``; also reads the former layout (before the
        linear-algebra results were embedded), so saved ``summary.json`` files keep loading.
        """
        return super().from_dict(_upgraded(d) if "values" in d["top"] else d)

    def to_json(self, **kwargs: Any) -> str:
        """:meth:`to_dict` as JSON text (``kwargs`` go to ``json.dumps``)."""
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_json(cls, text: str) -> "HessianAnalysis":
        """The analysis :meth:`to_json` wrote."""
        return cls.from_dict(json.loads(text))

    def save(self, path: str | Path) -> None:
        """Write :meth:`to_json` to ``path``."""
        Path(path).write_text(self.to_json(indent=2))

    @classmethod
    def load(cls, path: str | Path) -> "HessianAnalysis":
        """The analysis :meth:`save` wrote to ``path``."""
        return cls.from_json(Path(path).read_text())


def _tensor(values: Any, dtype: str = "float64") -> dict:
    flat = torch.tensor(values, dtype=getattr(torch, dtype))
    return jsonable(flat)


def _upgraded(d: dict) -> dict:
    """A former-layout analysis dict in the current layout: traces, eigenvalues and density as
    the linear-algebra results (the former trace kept no samples, so its interval becomes
    Student-t; Hutch++'s degrees of freedom follow from its products).
    """
    t = d["trace"]
    m = t["num_matvecs"]
    dof = {"hutch++": m - 2 * (m // 3) - 1, "xtrace": m // 2 - 1}.get(t["method"], m - 1)
    blocks = [{"name": x["name"], "size": x["size"], "value": x["trace"], "stderr": x["trace_stderr"]}
              for x in d["layers"]]
    trace = {"value": t["value"], "stderr": t["stderr"], "num_matvecs": m, "method": t["method"], "dof": dof,
             "blocks": blocks}

    def eigen(e: dict | None) -> dict | None:
        if e is None:
            return None
        k = len(e["values"])
        return {"eigenvalues": _tensor(e["values"]), "eigenvectors": jsonable(torch.zeros(0, k, dtype=torch.float64)),
                "residuals": _tensor(e["residuals"]), "converged": _tensor(e["converged"], "bool"),
                "num_matvecs": e["num_matvecs"], "num_restarts": 0, "which": e["which"], "method": "lanczos",
                "residual_history": e["residual_history"]}

    density = {**d["density"], "nodes": _tensor(d["density"]["nodes"]), "weights": _tensor(d["density"]["weights"])}
    return {**d, "trace": trace, "top": eigen(d["top"]), "bottom": eigen(d["bottom"]), "density": density}


def _without_vectors(result: EigenResult) -> EigenResult:
    return dataclasses.replace(result, eigenvectors=result.eigenvectors[:0])


def _layer_stats(tr: TraceResult, per_block: dict[str, EigenResult]) -> tuple[LayerStats, ...]:
    out = []
    for b in tr.blocks:
        e = per_block[b.name]
        out.append(LayerStats(b.name, b.size, b.value, b.stderr, b.per_parameter, float(e.eigenvalues[0]),
                              float(e.residuals[0]), bool(e.converged[0])))
    return tuple(out)


def analyze(
    model: torch.nn.Module,
    loss_fn: Callable,
    data: Any,
    *,
    params: Any = None,
    curvature: str = "hessian",
    top_k: int = 5,
    bottom_k: int = 1,
    trace_matvecs: int = 90,
    slq_probes: int = 8,
    slq_steps: int = 80,
    landscape: bool = True,
    landscape_radius: float = 1.0,
    landscape_points: int = 41,
    landscape_grid: int = 21,
    max_matvecs: int | None = None,
    seed: int = 0,
    progress: bool = False,
    kfac_probes: int = 30,
    lr: float | None = None,
    momentum: float = 0.0,
    optimizer: Any = None,
    optimizer_parameters: Any = None,
    **operator_kwargs: Any,
) -> HessianAnalysis:
    """The Hessian report of ``model`` under ``loss_fn`` on ``data`` (see the module docstring).

    ``data`` and ``params`` are as for :class:`~secondorder.HessianOperator` (one batch or a
    re-iterable of batches; names, prefixes or a filter); ``operator_kwargs`` go to the operator
    (``closure=True``, ``chunk_size``, ``blocks="parameter"``, ...). ``curvature`` is
    ``"hessian"``, ``"ggn"`` or ``"kfac"`` (the GGN's report and K-FAC beside it, ``kfac_probes``
    products for their distance). ``max_matvecs`` caps each Lanczos run (bottom eigenvalues of a
    network converge slowly; unconverged ones are flagged, not hidden). ``landscape=False``
    skips the loss surfaces. ``lr`` (with heavy-ball ``momentum``) or ``optimizer`` (a live
    optimizer or its ``state_dict()``, whose indices refer to ``optimizer_parameters``, usually
    ``list(model.parameters())``) adds the stability checks (``stability``); an adaptive
    optimizer's state gives its preconditioned sharpness. Every random choice comes from ``seed``; the model is left as it was.
    """
    if curvature not in ("hessian", "ggn", "kfac"):
        raise ValueError(f"curvature must be 'hessian', 'ggn' or 'kfac', got {curvature!r}")
    for name, value in (("top_k", top_k), ("trace_matvecs", trace_matvecs), ("slq_probes", slq_probes),
                        ("slq_steps", slq_steps)):
        positive_int(value, name)
    non_negative_int(bottom_k, "bottom_k")
    if curvature == "kfac" and positive_int(kfac_probes, "kfac_probes") < 2:
        raise ValueError(f"kfac_probes must be >= 2 (for a standard error), got {kfac_probes}")
    start = time.perf_counter()
    kfac = None
    if curvature == "kfac":  # first: an unsupported layer is refused before any GGN work
        shared = {k: v for k, v in operator_kwargs.items() if k in ("distributed", "batch_size_fn")}
        kfac = KFACOperator(model, loss_fn, data, params, fisher="ggn", seed=seed, **shared)
    op = (HessianOperator if curvature == "hessian" else GGNOperator)(model, loss_fn, data, params, seed=seed,
                                                                        **operator_kwargs)
    P = op.shape[0]
    preconditioner = preconditioner_for(op, lr, momentum, optimizer, optimizer_parameters)
    if top_k >= P or bottom_k >= P:
        raise ValueError(f"top_k and bottom_k must be below the number of parameters ({P})")
    eig_kwargs: dict[str, Any] = dict(max_matvecs=max_matvecs, progress=progress)
    loss, grad = op.loss_and_gradient()
    tr = trace(op, trace_matvecs, seed=seed, progress=progress)
    top = eigenvalues(op, top_k, "largest", seed=seed, **eig_kwargs)
    bottom = eigenvalues(op, bottom_k, "smallest", seed=seed + 1, **eig_kwargs) if bottom_k else None
    density = spectral_density(op, slq_probes, min(slq_steps, P), seed=seed, progress=progress)
    per_block = block_eigenvalues(op, 1, seed=seed, max_matvecs=max_matvecs)
    stability = None if preconditioner is None else stability_check(
        top, tr, preconditioner, preconditioned_top(op, preconditioner, seed + 3, **eig_kwargs))
    comparison = None if kfac is None else compare_kfac(op, kfac, tr, top, per_block, kfac_probes, seed + 2)
    land1 = land2 = None
    if landscape:
        v = top.eigenvectors
        random = random_directions(2, P, seed, op.dtype, op.device)
        land1 = landscape_1d(op, torch.stack([v[:, 0], random[:, 0]], 1), ("top eigenvector", "random"),
                             landscape_radius, landscape_points, progress)
        second, name = (v[:, 1], "eigenvector 2") if top_k >= 2 else (random[:, 1], "random")
        land2 = landscape_2d(op, v[:, 0], second, ("eigenvector 1", name), landscape_radius, landscape_grid,
                             progress)
    return HessianAnalysis(
        curvature=curvature, num_parameters=P, num_samples=op.num_samples, loss=loss,
        gradient_norm=float(cast(torch.Tensor, grad).norm()),
        trace=tr, top=_without_vectors(top), bottom=None if bottom is None else _without_vectors(bottom), density=density,
        layers=_layer_stats(tr, per_block), landscape_1d=land1, landscape_2d=land2, seed=seed,
        seconds=time.perf_counter() - start, num_matvecs=op.num_matvecs, kfac=comparison, stability=stability,
    )

