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

Activations (HAWQ-V2): for the input activation :math:`a_i` of layer :math:`i` (:math:`n_{a_i}`
entries per sample), :math:`\Omega^{act}_i(b) = \frac{\mathrm{Tr}(\nabla^2_{a_i}L)}{n_{a_i}}\,\|Q_b(a_i)-a_i\|^2`
with the trace and the error averaged over samples (:func:`activation_sensitivities`; the
per-batch Hessian is :class:`~secondorder.operators.activations.ActivationHessianOperator`, whose
trace is the mean per-sample trace) and :math:`Q_b` the per-tensor asymmetric
:class:`~secondorder.quant.quantizers.ActivationQuantizer` over the range calibrated on the data.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sized
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Protocol, Sequence, cast

from torch import Tensor, nn

from secondorder import validation
from secondorder.data import as_batches, seeded_batches, untouched
from secondorder.linalg import block_eigenvalues, trace
from secondorder.operators.activations import ActivationHessianOperator, model_device
from secondorder.operators.curvature import HessianOperator
from secondorder.quant.qat import _each_layer_input, _observe_ranges
from secondorder.quant.quantizers import ActivationQuantizer, quantizable_layers, quantization_error

__all__ = [
    "ActivationSensitivities", "ActivationSensitivity", "LayerSensitivity", "Sensitivities", "activation_sensitivities",
    "TraceEstimate", "hawq_v1", "hawq_v2", "layer_sensitivities", "omega_from_traces", "qbert",
]


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
        return omega_from_traces(self.layers)

    def hawq_v1(self) -> dict[str, float]:
        """HAWQ-V1's ordering score ``lambda_max(H_i) / n_i`` (larger: more bits)."""
        return {x.name: x.top_eigenvalue / x.size for x in self._with_eigenvalues()}

    def eigenvalue_weighted(self) -> dict[str, dict[int, float]]:
        """``lambda_max(H_i) * ||Q_b(W_i) - W_i||^2``: HAWQ-V1's fine-tuning order, and the top-eigenvalue variant of Omega."""
        return {x.name: {b: x.top_eigenvalue * e for b, e in x.errors.items()} for x in self._with_eigenvalues()}

    def _with_eigenvalues(self) -> tuple[LayerSensitivity, ...]:
        if any(math.isnan(x.top_eigenvalue) for x in self.layers):
            raise ValueError("these sensitivities have no top eigenvalues (computed with top_eigenvalues=False); "
                             "call layer_sensitivities(..., top_eigenvalues=True) for HAWQ-V1 scores")
        return self.layers

    def unweighted(self) -> dict[str, dict[int, float]]:
        """``||Q_b(W_i) - W_i||^2`` alone: the curvature-blind baseline."""
        return {x.name: dict(x.errors) for x in self.layers}


@dataclass(frozen=True)
class ActivationSensitivity:
    r"""One layer's input-activation curvature, calibrated range and quantization errors.

    ``size`` is the number of activation entries per sample, ``trace`` (and its ``trace_stderr``)
    the mean per-sample :math:`\mathrm{Tr}(\nabla^2_a L)`, ``[low, high]`` the range calibrated on the
    data (global min and max widened to contain 0, as an ActivationQuantizer with ``momentum=-1``
    stores it) and ``errors[b]`` the mean per-sample :math:`\|Q_b(a) - a\|^2` over that range.
    """

    name: str
    size: int
    trace: float
    trace_stderr: float
    low: float
    high: float
    errors: dict[int, float]


@dataclass(frozen=True)
class ActivationSensitivities:
    """Per-layer activation sensitivities (HAWQ-V2); ``num_matvecs`` counts the products over all batches."""

    layers: tuple[ActivationSensitivity, ...]
    num_matvecs: int

    def sizes(self) -> dict[str, int]:
        """Activation entries per sample, per layer."""
        return {x.name: x.size for x in self.layers}

    def hawq_v2(self) -> dict[str, dict[int, float]]:
        """``Omega_act_i(b) = Tr(H_a_i) / n_a_i * ||Q_b(a_i) - a_i||^2`` (per-sample means)."""
        return omega_from_traces(self.layers)

    def ranges(self) -> dict[str, tuple[float, float]]:
        """The calibrated ``(low, high)`` range of each layer's input activation."""
        return {x.name: (x.low, x.high) for x in self.layers}


class TraceEstimate(Protocol):
    """What Omega needs of a sensitivity (a layer's weights or its input activation): a trace with its error bar."""

    @property
    def name(self) -> str: ...
    @property
    def size(self) -> int: ...
    @property
    def trace(self) -> float: ...
    @property
    def trace_stderr(self) -> float: ...
    @property
    def errors(self) -> dict[int, float]: ...


def omega_from_traces(
    entries: Sequence[TraceEstimate], traces: Mapping[str, float] | None = None,
) -> dict[str, dict[int, float]]:
    r"""HAWQ-V2's :math:`\Omega_i(b) = T_i / n_i \cdot e_i(b)` for weights or activations.

    :math:`T_i` is each entry's estimated trace, or ``traces[name]`` when given (a confidence
    bound, a redraw: see :mod:`~secondorder.quant.uncertainty`); :math:`n_i` its size and
    :math:`e_i(b)` its quantization error at ``b`` bits.
    """
    values = {x.name: x.trace for x in entries} if traces is None else traces
    return {x.name: {b: values[x.name] / x.size * e for b, e in x.errors.items()} for x in entries}


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
    top_eigenvalues: bool = True,
    **operator_kwargs: Any,
) -> Sensitivities:
    """Trace (Hutch++, one probe set for all layers) and top eigenvalue of every layer's weight block,
    and the quantization error of its weight at each of ``bits``.

    ``layers`` names quantizable layers (default: all, see :func:`quantizable_layers`); ``data``,
    ``loss_fn`` and ``operator_kwargs`` as for :class:`~secondorder.HessianOperator`. The model is
    left as it was. ``top_eigenvalues=False`` skips the per-layer Lanczos runs, which only HAWQ-V1
    and :meth:`Sensitivities.eigenvalue_weighted` use (they cost more products than the traces on
    many-layer models: 165 of 255 on a 14-layer transformer); the eigenvalues are then NaN.
    """
    bits = _bit_widths(bits)
    chosen = _weights(model, layers)
    op = _operator(model, loss_fn, data, chosen, seed, operator_kwargs)
    tr = trace(op, trace_matvecs, seed=seed, progress=progress)
    tops = block_eigenvalues(op, 1, seed=seed) if top_eigenvalues else {}
    nan = float("nan")
    out = []
    for (name, module), block in zip(chosen, tr.blocks):
        w = cast(Tensor, module.weight).detach()
        top = tops.get(block.name)
        eigenvalue, residual = (nan, nan) if top is None else (float(top.eigenvalues[0]), float(top.residuals[0]))
        errors = {b: quantization_error(w, b, granularity, group_size) for b in bits}
        out.append(LayerSensitivity(name, w.numel(), block.value, block.stderr, eigenvalue, residual, errors))
    return Sensitivities(tuple(out), op.num_matvecs)


def activation_sensitivities(
    model: nn.Module,
    loss_fn: Callable,
    data: Any,
    *,
    bits: Sequence[int] = (2, 3, 4, 8),
    layers: Sequence[str] | None = None,
    trace_matvecs: int = 90,
    method: str = "hutch++",
    seed: int = 0,
    progress: bool = False,
) -> ActivationSensitivities:
    """HAWQ-V2's activation sensitivities: per layer, the mean per-sample trace of the Hessian w.r.t.
    its input activation, the activation's calibrated range and its quantization error at each of ``bits``.

    Three passes over ``data`` (one ``(inputs, targets)`` batch or a re-iterable of them):

    1. per batch ``k``, an :class:`~secondorder.operators.activations.ActivationHessianOperator`
       (dropout seed ``seed + k``) and :func:`~secondorder.linalg.trace` on it with ``trace_matvecs``
       products (``method``, probes seeded ``seed + k``, one probe set for all layers); the
       per-block traces are combined weighted by batch size, ``sum_k w_k t_k`` with standard error
       ``sqrt(sum_k w_k^2 se_k^2)``, ``w_k = B_k / N``;
    2. the range: min and max of each layer's input over all the data, widened to contain 0, exactly
       as :func:`~secondorder.quant.calibrate` sets it (the same pass and numbers);
    3. the errors: each batch's activation quantized by an
       :class:`~secondorder.quant.quantizers.ActivationQuantizer` holding that range (eval mode),
       ``||Q_b(a) - a||^2`` summed and divided by the number of samples.

    ``layers`` names quantizable layers (default: all, see :func:`quantizable_layers`); each must
    run exactly once per forward, on a floating-point input. The model is used as it is (its mode,
    and any quantizers in it) and left as it was: modes, parameters and ``.grad``, buffers and the
    global RNG. Passes 2 and 3 seed batch ``k``'s RNG with ``k``, so with ``seed=0`` a train-mode
    dropout draws the same masks in all three; the activation sensitivities of a model are usually
    wanted in eval mode, where the per-sample trace is exact (train-mode BatchNorm couples the samples).
    """
    bits = _bit_widths(bits)
    seed = validation.seed(seed)
    names = [n for n, _ in _weights(model, layers)]
    batches = as_batches(data)
    device = model_device(model)
    from tqdm import tqdm

    per_batch: list[tuple[int, dict[str, tuple[float, float]]]] = []
    sizes: dict[str, int] = {}
    num_matvecs = 0
    with untouched(model, device):  # the same batch order as passes 2 and 3, for a shuffling DataLoader
        for k, batch in tqdm(seeded_batches(batches, 0, device), desc="activation traces", unit="batch", leave=False,
                             total=len(batches) if isinstance(batches, Sized) else None, disable=not progress):
            op = ActivationHessianOperator(model, loss_fn, batch, names, seed=seed + k)
            tr = trace(op, trace_matvecs, method=method, seed=seed + k)
            num_matvecs += tr.num_matvecs
            for block in op.blocks:
                size, rest = divmod(block.size, op.batch_size)
                if rest or sizes.setdefault(block.name, size) != size:
                    raise ValueError(f"layer {block.name!r}'s input in batch {k} has {block.size} entries for "
                                     f"{op.batch_size} samples ({op.activation_shapes[block.name]}), not "
                                     f"{sizes.get(block.name, 'a whole number of')} per sample; activation "
                                     "sensitivities need the same number of entries per sample in every batch")
            per_batch.append((op.batch_size, {b.name: (b.value, b.stderr) for b in tr.blocks}))
    if not per_batch:
        raise ValueError("data yielded no batches; pass at least one non-empty batch")
    total = sum(n for n, _ in per_batch)

    observers = {n: ActivationQuantizer(None, momentum=-1).to(device=device) for n in names}
    _observe_ranges(model, batches, observers, progress)
    quantizers = {n: {b: _holding_range(observers[n], b) for b in bits} for n in names}
    sums = {n: dict.fromkeys(bits, 0.0) for n in names}

    def add_errors(name: str, x: Tensor) -> None:
        for b, q in quantizers[name].items():
            sums[name][b] += float((q(x) - x).square().sum())

    count = _each_layer_input(model, batches, names, add_errors, progress, "activation errors")
    out = []
    for n in names:
        value = sum(m / total * t[n][0] for m, t in per_batch)
        stderr = sum((m / total * t[n][1]) ** 2 for m, t in per_batch) ** 0.5
        out.append(ActivationSensitivity(n, sizes[n], value, stderr, float(observers[n].running_min),
                                         float(observers[n].running_max), {b: e / count for b, e in sums[n].items()}))
    return ActivationSensitivities(tuple(out), num_matvecs)


def _holding_range(observer: ActivationQuantizer, bits: int) -> ActivationQuantizer:
    """An eval-mode ActivationQuantizer at ``bits`` holding ``observer``'s range: the quantizer a calibrated model runs."""
    q = ActivationQuantizer(bits, momentum=-1).to(device=observer.running_min.device, dtype=observer.running_min.dtype)
    q.load_state_dict(observer.state_dict())
    return q.eval()


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
