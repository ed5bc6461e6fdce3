r"""Per-layer Hessian sensitivities for mixed-precision quantization (HAWQ-V1/V2/V3, Q-BERT).

For a layer :math:`i` with weights :math:`W_i` (:math:`n_i` entries), diagonal Hessian block
:math:`H_i` and quantization perturbation :math:`\Delta_i(b) = Q_b(W_i) - W_i`:

* HAWQ (Dong, Yao, Gholami, Mahoney, Keutzer, ICCV 2019): order layers by
  :math:`S_i = \lambda_{\max}(H_i)/n_i` (more bits for larger :math:`S_i`); fine-tune in descending
  :math:`\lambda_{\max}(H_i)\,\|\Delta_i\|^2`.
* HAWQ-V2 (Dong et al., NeurIPS 2020) and V3 (Yao et al., ICML 2021):
  :math:`\Omega_i(b) = \frac{\mathrm{Tr}(H_i)}{n_i}\,\|\Delta_i(b)\|^2`, the expected second-order
  loss increase of a perturbation of that norm in a random direction
  (:math:`\mathbb E[\Delta^\top H \Delta] = \|\Delta\|^2\,\mathrm{Tr}(H)/n`).
* Q-BERT (Shen et al., AAAI 2020): :math:`|\mathrm{mean}_j \lambda_{\max}(H_i^{(j)})| + \mathrm{std}_j \lambda_{\max}(H_i^{(j)})`
  over mini-batches :math:`j`.

All layers' traces come from one set of Hutch++ probes on the operator restricted to the layers'
weights (its diagonal blocks are exactly the :math:`H_i`); the top eigenvalues from Lanczos on
each block.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any, Callable, Sequence, cast

from torch import Tensor, nn

from secondorder import validation
from secondorder.data import as_batches
from secondorder.linalg import block_eigenvalues, trace
from secondorder.operators.curvature import HessianOperator
from secondorder.quant.quantizers import quantizable_layers, quantization_error

__all__ = ["LayerSensitivity", "Sensitivities", "hawq_v1", "hawq_v2", "layer_sensitivities", "qbert"]


@dataclass(frozen=True)
class LayerSensitivity:
    """One layer's curvature and quantization errors ``errors[b] = ||Q_b(W) - W||^2``."""

    name: str
    size: int
    trace: float
    trace_stderr: float
    top_eigenvalue: float
    top_residual: float
    errors: dict[int, float]


@dataclass(frozen=True)
class Sensitivities:
    """Per-layer sensitivities; each method gives the per-layer, per-bit costs an allocator takes."""

    layers: tuple[LayerSensitivity, ...]
    num_matvecs: int

    def sizes(self) -> dict[str, int]:
        return {x.name: x.size for x in self.layers}

    def hawq_v2(self) -> dict[str, dict[int, float]]:
        """``Omega_i(b) = Tr(H_i) / n_i * ||Q_b(W_i) - W_i||^2`` (HAWQ-V2/V3)."""
        return {x.name: {b: x.trace / x.size * e for b, e in x.errors.items()} for x in self.layers}

    def hawq_v1(self) -> dict[str, float]:
        """HAWQ-V1's ordering score ``lambda_max(H_i) / n_i`` (larger: more bits)."""
        return {x.name: x.top_eigenvalue / x.size for x in self.layers}

    def eigenvalue_weighted(self) -> dict[str, dict[int, float]]:
        """``lambda_max(H_i) * ||Q_b(W_i) - W_i||^2``: HAWQ-V1's fine-tuning order, and the top-eigenvalue variant of Omega."""
        return {x.name: {b: x.top_eigenvalue * e for b, e in x.errors.items()} for x in self.layers}

    def unweighted(self) -> dict[str, dict[int, float]]:
        """``||Q_b(W_i) - W_i||^2`` alone: the curvature-blind baseline."""
        return {x.name: dict(x.errors) for x in self.layers}


def _weights(model: nn.Module, layers: Sequence[str] | None) -> list[tuple[str, nn.Module]]:
    found = quantizable_layers(model)
    if not found:
        raise ValueError("the model has no quantizable layers (modules holding a weight of 2 or more dimensions)")
    if layers is None:
        return found
    by_name = dict(found)
    unknown = [n for n in layers if n not in by_name]
    if unknown:
        raise ValueError(f"unknown layers {unknown}; quantizable layers are {list(by_name)}")
    return [(n, by_name[n]) for n in layers]


def _bit_widths(bits: Sequence[int]) -> tuple[int, ...]:
    bits = tuple(bits)
    if not bits:
        raise ValueError("bits must name at least one bit width (integers in 1..32)")
    return tuple(validation.bit_width(b, f"bits[{i}]") for i, b in enumerate(bits))


def _operator(model, loss_fn, data, chosen, seed, operator_kwargs) -> HessianOperator:
    """The Hessian restricted to the chosen layers' weights, one block per weight (found by identity,
    so a layer already wrapped for quantization works too).
    """
    names = {id(p): name for name, p in model.named_parameters()}
    return HessianOperator(model, loss_fn, data, [names[id(m.weight)] for _, m in chosen], blocks="parameter",
                           seed=seed, **operator_kwargs)


def layer_sensitivities(
    model: nn.Module,
    loss_fn: Callable,
    data: Any,
    *,
    bits: Sequence[int] = (2, 3, 4, 8),
    layers: Sequence[str] | None = None,
    trace_matvecs: int = 90,
    granularity: str = "channel",
    group_size: int | None = None,
    seed: int = 0,
    progress: bool = False,
    **operator_kwargs: Any,
) -> Sensitivities:
    """Trace (Hutch++, one probe set for all layers) and top eigenvalue of every layer's weight block,
    and the quantization error of its weight at each of ``bits``.

    ``layers`` names quantizable layers (default: all, see :func:`quantizable_layers`); ``data``,
    ``loss_fn`` and ``operator_kwargs`` as for :class:`~secondorder.HessianOperator`. The model is
    left as it was.
    """
    bits = _bit_widths(bits)
    chosen = _weights(model, layers)
    op = _operator(model, loss_fn, data, chosen, seed, operator_kwargs)
    tr = trace(op, trace_matvecs, seed=seed, progress=progress)
    tops = block_eigenvalues(op, 1, seed=seed)
    out = []
    for (name, module), block in zip(chosen, tr.blocks):
        w = cast(Tensor, module.weight).detach()
        top = tops[block.name]
        errors = {b: quantization_error(w, b, granularity, group_size) for b in bits}
        out.append(LayerSensitivity(name, w.numel(), block.value, block.stderr, float(top.eigenvalues[0]),
                                    float(top.residuals[0]), errors))
    return Sensitivities(tuple(out), op.num_matvecs)


def qbert(
    model: nn.Module, loss_fn: Callable, data: Any, *, layers: Sequence[str] | None = None, seed: int = 0,
    **operator_kwargs: Any,
) -> dict[str, tuple[float, float, float]]:
    """Q-BERT's ``(mean, std, |mean| + std)`` of each layer's top eigenvalue over the batches of ``data``."""
    chosen = _weights(model, layers)
    batches = list(as_batches(data))
    if len(batches) < 2:
        raise ValueError(f"Q-BERT's sensitivity needs at least 2 batches (it uses their spread), got {len(batches)}")
    per_batch: dict[str, list[float]] = {n: [] for n, _ in chosen}
    for batch in batches:
        op = _operator(model, loss_fn, batch, chosen, seed, operator_kwargs)
        tops = block_eigenvalues(op, 1, seed=seed)
        for (name, _), block in zip(chosen, op.blocks):
            per_batch[name].append(float(tops[block.name].eigenvalues[0]))
    return {n: (statistics.fmean(v), statistics.stdev(v), abs(statistics.fmean(v)) + statistics.stdev(v))
            for n, v in per_batch.items()}



def hawq_v1(model: nn.Module, loss_fn: Callable, data: Any, **kwargs: Any) -> dict[str, float]:
    """HAWQ-V1's per-layer ``lambda_max(H_i) / n_i`` (``kwargs`` as for :func:`layer_sensitivities`)."""
    return layer_sensitivities(model, loss_fn, data, **kwargs).hawq_v1()


def hawq_v2(model: nn.Module, loss_fn: Callable, data: Any, **kwargs: Any) -> dict[str, dict[int, float]]:
    """HAWQ-V2's ``Omega_i(b)`` for every layer and candidate bit width (``kwargs`` as for :func:`layer_sensitivities`)."""
    return layer_sensitivities(model, loss_fn, data, **kwargs).hawq_v2()
