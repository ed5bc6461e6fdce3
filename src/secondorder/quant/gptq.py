r"""Second-order post-training rounding: GPTQ (Frantar, Ashkboos, Hoefler, Alistarh, ICLR 2023).

GPTQ rounds a layer's weight :math:`W` (``out x in``; a convolution's weight flattened to
``out x (in * kernel)``, the columns of ``weight.flatten(1)``) so as to keep the layer's output on
the calibration inputs :math:`X` (``n x in``, one row per input vector: a token of a Linear layer,
an im2col patch of a convolution). With the layer Hessian

.. math::

    H = \frac{2}{n} \sum_{r=1}^{n} x_r x_r^\top = \frac{2}{n} X^\top X,

the output error is :math:`\frac{2}{n}\|(W-\hat W)X^\top\|_F^2 = \mathrm{tr}\big((W-\hat W) H (W-\hat W)^\top\big)`,
a sum over the rows of :math:`W`, each a quadratic with the same :math:`H`. The Optimal Brain
Quantizer (Frantar & Alistarh, NeurIPS 2022) quantizes one column :math:`j` at a time and moves
the error into the columns not yet quantized:

.. math::

    \delta_j = \frac{w_j - q_j}{[H^{-1}]_{jj}}, \qquad
    w_k \leftarrow w_k - \delta_j\,[H^{-1}]_{jk} \quad (k \text{ not yet quantized}),

then removes :math:`j` from :math:`H^{-1}` (one Gaussian elimination step). GPTQ quantizes all rows
in the same column order, so the successive eliminated inverses are the rows of the upper Cholesky
factor :math:`U` of :math:`H^{-1}` (:math:`H^{-1} = U^\top U`), and the update reads
:math:`w_{j+1:} \mathrel{-}= \frac{w_j - q_j}{U_{jj}}\,U_{j,j+1:}`. Columns are processed in
blocks of ``block_size``: inside a block the update is applied column by column, to the columns
after the block once per block (a matrix product, the "lazy batch" update). The result is the
same as the one-column-at-a-time reference up to floating-point rounding.

Robustness (the complaints about GPTQ are Cholesky failures on non-positive-definite :math:`H`):

* **dead inputs** (:math:`H_{ii} = 0`: the input is zero on every calibration vector) get
  :math:`H_{ii} = 1` and their weight column set to 0 (it has no effect on the output);
* **damping** :math:`\lambda = \texttt{percdamp} \cdot \mathrm{mean}(\mathrm{diag}\,H)` is added to
  the diagonal and multiplied by 10 until both Cholesky factorisations succeed (at most
  ``max_damping_raises`` times); the damping used and the number of raises are reported, and a
  singular :math:`H` (duplicated inputs, fewer calibration vectors than columns) quantizes without
  an error;
* **activation order** (``act_order``): columns by descending :math:`H_{ii}`, the permutation undone
  at the end.

Scales and rounding are the library's symmetric quantizer
(:func:`~secondorder.quant.quantizers.symmetric_scale`, codes in :math:`[-2^{b-1}, 2^{b-1}-1]`,
``torch.round``). With ``granularity`` ``"tensor"``, ``"channel"`` or ``"group"`` (groups of output
rows, Q-BERT) the scales come from the original weight, so a GPTQ weight lies on exactly the grid
round-to-nearest (:func:`~secondorder.quant.quantizers.quantize_weight`) uses at the same bits and
granularity: only the choice of grid point differs. With ``"column_group"`` (GPTQ's ``groupsize``:
one scale per output row and block of ``group_size`` consecutive input columns, in processing
order) each group's scales are computed when its first column is reached, from the columns' values
after the error compensation so far. (The reference implementation reads the weights as they were
at the start of the current block; here the group sees every update up to that column, which is
what the one-column-at-a-time algorithm does.)

Models: :func:`gptq_quantize` accumulates every chosen layer's :math:`H` from forward hooks
(Linear; Conv1d and Conv2d through im2col, any padding mode; ``groups=1``) streamed over the
calibration batches, by default in float64. Layers are processed **sequentially**, as GPTQ does:
the layers run in the order they are first called on the first calibration batch, and each
layer's :math:`H` comes from inputs recomputed through the already-rounded earlier layers, so
later layers see (and compensate for) the inputs the quantized network will give them. With
``sequential=False`` all Hessians come from the full-precision model in one pass. The calibration
passes run in eval mode without gradients; the model's modes, buffers and the global RNG are left
as they were, hooks are always removed, and every argument is checked before any weight changes.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from numbers import Integral
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from secondorder import validation
from secondorder.data import as_batches, call_model, shapes
from secondorder.operators.kfac import im2col
from secondorder.quant.quantizers import (
    MAX_BITS,
    QuantizedLayer,
    _check_granularity,
    quantizable_layers,
    quantize_weight,
    symmetric_scale,
)

__all__ = ["GPTQLayerResult", "GPTQResult", "GPTQRounding", "gptq_quantize", "gptq_round", "layer_hessians"]

GPTQ_GRANULARITIES = ("tensor", "channel", "group", "column_group")
SUPPORTED = (nn.Linear, nn.Conv1d, nn.Conv2d)
REJECTIONS = (RuntimeError, ValueError, TypeError, IndexError)


# ----------------------------------------------------------------------------- results


@dataclass(frozen=True)
class GPTQRounding:
    r"""One layer rounded by :func:`gptq_round`.

    Attributes:
        weight: :math:`\hat W`, the rounded weight (shape and dtype of the input weight).
        scale: the scale of every entry (same shape and dtype): ``weight / scale`` are integers in
            :math:`[-2^{b-1}, 2^{b-1}-1]`.
        damping: :math:`\lambda` added to the diagonal of :math:`H` (absolute).
        relative_damping: :math:`\lambda / \mathrm{mean}(\mathrm{diag}\,H)`, after the dead inputs got
            :math:`H_{ii} = 1` (``percdamp`` times :math:`10^{\text{raises}}`).
        damping_raises: how many times :math:`\lambda` was multiplied by 10 before the Cholesky
            factorisations succeeded.
        dead_inputs: columns with :math:`H_{ii} = 0` (their weights are 0).
        error: :math:`\mathrm{tr}((W-\hat W) H (W-\hat W)^\top)` with the undamped :math:`H`, in float64.
        nearest_error: the same for round-to-nearest at the same bits and granularity.

    """

    weight: Tensor
    scale: Tensor
    damping: float
    relative_damping: float
    damping_raises: int
    dead_inputs: int
    error: float
    nearest_error: float


@dataclass(frozen=True)
class GPTQLayerResult:
    r"""What :func:`gptq_quantize` did to one layer (no tensors; :meth:`as_dict` for JSON).

    ``samples`` is :math:`n`, the number of input vectors (tokens, im2col patches) :math:`H` was
    accumulated from; ``columns`` the number of columns of ``weight.flatten(1)``; the other fields
    as in :class:`GPTQRounding`. ``error`` and ``nearest_error`` are the layer's output error
    :math:`\frac{2}{n}\|(W-\hat W)X^\top\|_F^2` on those inputs for GPTQ and for round-to-nearest.
    """

    name: str
    bits: int
    columns: int
    samples: int
    damping: float
    relative_damping: float
    damping_raises: int
    dead_inputs: int
    error: float
    nearest_error: float

    def as_dict(self) -> dict[str, Any]:
        """The fields as a plain dict."""
        return asdict(self)


@dataclass(frozen=True)
class GPTQResult:
    """The model returned by :func:`gptq_quantize` and the per-layer results, in processing order."""

    model: nn.Module
    layers: dict[str, GPTQLayerResult]
    sequential: bool


# ----------------------------------------------------------------------------- validation


def _check_layer_granularity(weight: Tensor, granularity: str, group_size: Any) -> None:
    if granularity not in GPTQ_GRANULARITIES:
        raise ValueError(f"granularity must be one of {GPTQ_GRANULARITIES}, got {granularity!r}")
    if granularity == "column_group":
        if isinstance(group_size, bool) or not isinstance(group_size, Integral) or group_size < 1:
            raise ValueError(f"granularity='column_group' needs group_size, a positive integer number of input "
                             f"columns per group, got {group_size!r}")
        return
    _check_granularity(weight.shape, granularity, group_size)


def _check_settings(bits: Any, block_size: Any, percdamp: Any, max_damping_raises: Any,
                    act_order: Any) -> tuple[int, int, float, int]:
    bits = validation.bit_width(bits, "bits (GPTQ)", 2, MAX_BITS)
    block_size = validation.positive_int(block_size, "block_size")
    percdamp = validation.positive_finite(percdamp, "percdamp")
    max_damping_raises = validation.non_negative_int(max_damping_raises, "max_damping_raises")
    if not isinstance(act_order, bool):
        raise ValueError(f"act_order must be True or False, got {act_order!r}")
    return bits, block_size, percdamp, max_damping_raises


def _check_hessian(hessian: Any, columns: int, what: str) -> Tensor:
    if not isinstance(hessian, Tensor) or not hessian.is_floating_point():
        raise TypeError(f"{what} must be a floating-point tensor, got {type(hessian).__name__}")
    if hessian.shape != (columns, columns):
        raise ValueError(f"{what} must be {columns} x {columns} (the columns of weight.flatten(1)), "
                         f"got shape {tuple(hessian.shape)}")
    if not bool(torch.isfinite(hessian).all()):
        raise ValueError(f"{what} has non-finite entries: the calibration inputs (or the activations feeding "
                         f"the layer) contain nan or inf")
    if bool((hessian.diagonal() < 0).any()):
        raise ValueError(f"{what} has negative diagonal entries; it is not a Gram matrix (2/n) X^T X")
    return hessian


# ----------------------------------------------------------------------------- one layer


def _codes(w: Tensor, s: Tensor, qmax: int) -> Tensor:
    """``clamp(round(w / s), -qmax - 1, qmax)``: the symmetric quantizer's integer codes."""
    return torch.round(w / s).clamp(-qmax - 1, qmax)


def _column_scale(values: Tensor, qmax: int, dtype: torch.dtype) -> Tensor:
    """Per-row symmetric scale of ``values`` (rows x k), rounded to ``dtype`` and back to float64."""
    amax = values.abs().amax(dim=1)
    s = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
    return s.to(dtype).to(values.dtype)


def _static_scale(weight: Tensor, bits: int, granularity: str, group_size: int | None) -> Tensor:
    """The scale of every entry of ``weight.flatten(1)`` (weight's dtype), from the original weight."""
    s = symmetric_scale(weight.detach(), bits, granularity, group_size)
    rows = weight.shape[0]
    return s.reshape(s.shape[0], -1)[:, :1].expand(rows, weight[0].numel()).to(weight.dtype)


def _factor(h: Tensor, percdamp: float, max_raises: int) -> tuple[Tensor, float, int]:
    """``U`` (upper Cholesky factor of ``(h + lambda I)^-1``), ``lambda`` and the number of raises."""
    mean_diag = float(h.diagonal().mean())
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    for raises in range(max_raises + 1):
        damping = percdamp * 10.0 ** raises * mean_diag
        chol, info = torch.linalg.cholesky_ex(h + damping * eye)
        if int(info) == 0:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(chol), upper=True)
            if int(info) == 0 and bool(torch.isfinite(upper).all()) and bool((upper.diagonal() > 0).all()):
                return upper, damping, raises
    raise RuntimeError(f"the Cholesky factorisation of the damped Hessian failed even at damping "
                       f"{percdamp * 10.0 ** max_raises:g} x mean(diag H); raise max_damping_raises or percdamp")


def gptq_round(weight: Tensor, hessian: Tensor, bits: int, granularity: str = "channel",
               group_size: int | None = None, *, act_order: bool = False, block_size: int = 128,
               percdamp: float = 0.01, max_damping_raises: int = 12) -> GPTQRounding:
    r"""Round one weight with GPTQ given its layer Hessian :math:`H = \frac{2}{n} X^\top X`.

    Args:
        weight: ``out x ...``; the columns are those of ``weight.flatten(1)``. Not modified.
        hessian: ``columns x columns``, finite, non-negative diagonal (e.g. from
            :func:`layer_hessians`). The computation runs in float64 whatever its dtype.
        bits: 2..32.
        granularity: ``"channel"`` (one scale per output row), ``"tensor"``, ``"group"`` (per block
            of ``group_size`` output rows; these three as :func:`~secondorder.quant.quantizers.symmetric_scale`,
            from the original weight) or ``"column_group"`` (per output row and block of
            ``group_size`` input columns in processing order, found when the block is reached).
        group_size: rows per group (``"group"``) or columns per group (``"column_group"``).
        act_order: process columns by descending :math:`H_{ii}` (stable order).
        block_size: columns per lazy-update block.
        percdamp: initial damping as a fraction of :math:`\mathrm{mean}(\mathrm{diag}\,H)`, positive.
        max_damping_raises: how many times the damping may be multiplied by 10.

    The rounded weight is ``scale * codes`` computed in the weight's dtype; the error compensation
    runs in float64.

    """
    if not isinstance(weight, Tensor) or not weight.is_floating_point() or weight.ndim < 2 or weight.numel() == 0:
        raise TypeError("weight must be a non-empty floating-point tensor with at least 2 dimensions")
    bits, block_size, percdamp, max_damping_raises = _check_settings(bits, block_size, percdamp,
                                                                     max_damping_raises, act_order)
    _check_layer_granularity(weight, granularity, group_size)
    rows, columns = weight.shape[0], weight[0].numel()
    h = _check_hessian(hessian, columns, "hessian").detach().to(torch.float64)
    qmax = 2 ** (bits - 1) - 1
    dtype = weight.dtype
    w0 = weight.detach().reshape(rows, columns).to(torch.float64)
    static = granularity != "column_group"
    scale = _static_scale(weight, bits, granularity, group_size).to(torch.float64) if static \
        else torch.ones_like(w0)

    w = w0.clone()
    h = h.clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    perm = torch.argsort(h.diagonal(), descending=True, stable=True) if act_order \
        else torch.arange(columns, device=h.device)
    w, h, scale = w[:, perm], h[perm][:, perm], scale[:, perm].contiguous()
    upper, damping, raises = _factor(h, percdamp, max_damping_raises)
    relative = damping / float(h.diagonal().mean())

    codes = torch.zeros_like(w)
    for i1 in range(0, columns, block_size):
        i2 = min(i1 + block_size, columns)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        u1 = upper[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            if not static and j % cast(int, group_size) == 0:
                end = min(j + cast(int, group_size), columns)
                current = w1[:, i:min(end, i2) - i1]
                if end > i2:  # the group reaches past the block: those columns lack this block's updates
                    later = w[:, i2:end] - err1[:, :i] @ upper[i1:j, i2:end]
                    current = torch.cat([current, later], dim=1)
                scale[:, j:end] = _column_scale(current, qmax, dtype).unsqueeze(1)
            col, s = w1[:, i], scale[:, j]
            q = _codes(col, s, qmax)
            codes[:, j] = q
            e = (col - s * q) / u1[i, i]
            w1[:, i + 1:] -= e.unsqueeze(1) * u1[i, i + 1:].unsqueeze(0)
            err1[:, i] = e
        w[:, i2:] -= err1 @ upper[i1:i2, i2:]

    inverse = torch.argsort(perm)
    codes, scale = codes[:, inverse], scale[:, inverse]
    scale_out = scale.to(dtype)
    w_hat = (scale_out * codes.to(dtype)).reshape(weight.shape)
    hessian64 = hessian.detach().to(torch.float64)
    nearest = _nearest(weight, bits, granularity, group_size).reshape(rows, columns).to(torch.float64)
    return GPTQRounding(
        weight=w_hat, scale=scale_out.reshape(weight.shape), damping=damping, relative_damping=relative,
        damping_raises=raises, dead_inputs=int(dead.sum()),
        error=_output_error(w0 - w_hat.reshape(rows, columns).to(torch.float64), hessian64),
        nearest_error=_output_error(w0 - nearest, hessian64))


def _nearest(weight: Tensor, bits: int, granularity: str, group_size: int | None) -> Tensor:
    """Round-to-nearest at the same bits and granularity (column groups in natural order)."""
    w = weight.detach()
    if granularity != "column_group":
        return quantize_weight(w, bits, granularity, group_size)
    qmax = 2 ** (bits - 1) - 1
    flat = w.reshape(w.shape[0], -1).to(torch.float64)
    out = torch.empty_like(flat)
    size = cast(int, group_size)
    for j in range(0, flat.shape[1], size):
        s = _column_scale(flat[:, j:j + size], qmax, w.dtype).unsqueeze(1).to(w.dtype)
        out[:, j:j + size] = (s * _codes(flat[:, j:j + size].to(w.dtype), s, qmax)).to(torch.float64)
    return out.to(w.dtype).reshape(w.shape)


def _output_error(delta: Tensor, hessian: Tensor) -> float:
    r""":math:`\mathrm{tr}(\Delta H \Delta^\top)`."""
    return float(((delta @ hessian) * delta).sum())


# ----------------------------------------------------------------------------- Hessians from hooks


def _rows(module: nn.Module, x: Tensor) -> Tensor:
    """The layer's input vectors, one per row, in the column order of ``weight.flatten(1)``."""
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    conv = cast(nn.Conv1d | nn.Conv2d, module)
    spatial = 1 if isinstance(module, nn.Conv1d) else 2
    if x.ndim == spatial + 1:  # unbatched input
        x = x.unsqueeze(0)
    pad = list(conv._reversed_padding_repeated_twice)
    if any(pad):
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        x = F.pad(x, pad, mode=mode)
    kernel, stride, dilation = conv.kernel_size, conv.stride, conv.dilation
    if spatial == 1:
        x = x.unsqueeze(2)
        kernel, stride, dilation = (1, kernel[0]), (1, stride[0]), (1, dilation[0])
    patches = im2col(x, kernel, dilation, (0, 0), stride)  # (B, L, C*k)
    return patches.reshape(-1, patches.shape[2])


class _Accumulator:
    """A forward pre-hook summing ``X^T X`` and counting the rows of one layer's inputs."""

    def __init__(self, module: nn.Module, dtype: torch.dtype):
        weight = cast(Tensor, module.weight)
        columns = weight[0].numel()
        self.sum = torch.zeros(columns, columns, dtype=dtype, device=weight.device)
        self.count = 0
        self.dtype = dtype

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else kwargs.get("input")
        if not isinstance(x, Tensor):
            raise TypeError(f"{type(module).__name__} was called without a tensor input")
        rows = _rows(module, x.detach()).to(self.dtype)
        self.sum.addmm_(rows.T, rows)
        self.count += rows.shape[0]

    def hessian(self, name: str) -> Tensor:
        if self.count == 0:
            raise ValueError(f"layer {name!r} never ran on the calibration data, so it has no Hessian; "
                             f"leave it out of bits")
        return self.sum * (2.0 / self.count)


def _inputs(batch: Any) -> Any:
    """A batch's inputs: the first item of an ``(inputs, targets)`` tuple or list, else the batch itself."""
    return batch[0] if isinstance(batch, (tuple, list)) and batch else batch


def _run(model: nn.Module, batches: Iterable, hooks: Mapping[str, Any], limit: int | None = None) -> None:
    """Call ``model`` on the batches' inputs with ``hooks`` ({name: pre-hook}) registered, then removed."""
    handles = [model.get_submodule(name).register_forward_pre_hook(hook, with_kwargs=True)
               for name, hook in hooks.items()]
    try:
        for index, batch in enumerate(batches):
            if limit is not None and index >= limit:
                break
            try:
                call_model(model, _inputs(batch))
            except REJECTIONS as err:
                lines = str(err).strip().splitlines()
                raise ValueError(f"the model rejected calibration batch {index} (shapes {shapes(batch)}): "
                                 f"{type(err).__name__}: {lines[0] if lines else ''}") from err
    finally:
        for handle in handles:
            handle.remove()


class _Calibrating:
    """Eval mode, no gradient, forked RNG, buffers restored: the model as the caller left it, except weights."""

    def __init__(self, model: nn.Module):
        self.model = model
        device = next((t.device for t in model.parameters()), torch.device("cpu"))
        self.fork = torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else [])
        self.grad = torch.no_grad()

    def __enter__(self) -> None:
        self.modes = [(m, m.training) for m in self.model.modules()]
        self.buffers = [(b, b.detach().clone()) for b in self.model.buffers()]
        self.fork.__enter__()
        self.grad.__enter__()
        self.model.eval()

    def __exit__(self, *exc: Any) -> None:
        self.grad.__exit__(*exc)
        self.fork.__exit__(*exc)
        with torch.no_grad():
            for buf, value in self.buffers:
                buf.copy_(value)
        for m, mode in self.modes:
            m.training = mode


def _check_layer(model: nn.Module, name: str) -> nn.Module:
    module = model.get_submodule(name)
    if isinstance(module, QuantizedLayer):
        raise TypeError(f"layer {name!r} is a QuantizedLayer (fake-quantized); GPTQ rounds the real weights of an "
                        f"unwrapped model")
    if not isinstance(module, SUPPORTED):
        raise TypeError(f"GPTQ supports Linear, Conv1d and Conv2d layers; {name!r} is a {type(module).__name__}")
    if not isinstance(module, nn.Linear) and cast(nn.Conv1d, module).groups != 1:
        raise TypeError(f"GPTQ needs groups=1 convolutions; {name!r} has groups={cast(nn.Conv1d, module).groups}")
    return module


def _check_names(model: nn.Module, names: Iterable[str]) -> list[str]:
    names = list(names)
    valid = [n for n, _ in quantizable_layers(model)]
    unknown = [n for n in names if n not in valid]
    if unknown:
        raise ValueError(f"{unknown} are not quantizable layers of this model; valid names: {valid}")
    for n in names:
        _check_layer(model, n)
    return names


def layer_hessians(model: nn.Module, data: Any, layers: Sequence[str],
                   dtype: torch.dtype = torch.float64) -> dict[str, Tensor]:
    r""":math:`H = \frac{2}{n}\sum_r x_r x_r^\top` of each named layer's inputs over the calibration ``data``.

    ``data``: one batch or a re-iterable of batches, each ``(inputs, targets)`` (targets unused) or
    the inputs alone; the model is called on the inputs in eval mode without gradients, once per
    batch, with a forward pre-hook on each layer (Linear: one row per input vector over all leading
    dimensions; Conv1d/Conv2d: one row per im2col patch, after the layer's own padding). The sums
    run in ``dtype``; the model (modes, parameters, buffers) and the global RNG are left as they were.
    """
    if isinstance(layers, str):
        raise TypeError(f"layers must be a list of layer names, got the string {layers!r}; pass [{layers!r}]")
    names = _check_names(model, layers)
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    batches = as_batches(data)
    hooks = {n: _Accumulator(model.get_submodule(n), dtype) for n in names}
    with _Calibrating(model):
        _run(model, batches, hooks)
    return {n: hooks[n].hessian(n) for n in names}


# ----------------------------------------------------------------------------- models


def _execution_order(model: nn.Module, batches: Iterable, names: list[str]) -> list[str]:
    """``names`` in the order the layers are first called on the first batch (never-called ones last)."""
    seen: list[str] = []

    def recorder(name: str) -> Any:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if name not in seen:
                seen.append(name)
        return hook

    _run(model, batches, {n: recorder(n) for n in names}, limit=1)
    return seen + [n for n in names if n not in seen]


def gptq_quantize(model: nn.Module, bits: Mapping[str, int | None], data: Any, *,
                  granularity: str = "channel", group_size: int | None = None, act_order: bool = False,
                  block_size: int = 128, percdamp: float = 0.01, max_damping_raises: int = 12,
                  sequential: bool = True, hessian_dtype: torch.dtype = torch.float64, inplace: bool = False,
                  progress: bool = False) -> GPTQResult:
    r"""Post-training quantization of the layers in ``bits`` by GPTQ rounding (see the module docstring).

    Args:
        model: the network; untouched unless ``inplace`` (a deep copy is quantized).
        bits: ``{layer name: bits in 2..32 or None}`` (``None``: left in full precision), names as
            :func:`~secondorder.quant.quantizers.quantizable_layers` lists them; any bit allocation
            (e.g. :func:`~secondorder.quant.allocation.allocate_bits`' ``.bits``). Linear, Conv1d and
            Conv2d (``groups=1``) layers.
        data: calibration batches, as for :func:`layer_hessians`.
        granularity: as for :func:`gptq_round`, for every layer.
        group_size: as for :func:`gptq_round`.
        act_order: as for :func:`gptq_round`.
        block_size: as for :func:`gptq_round`.
        percdamp: as for :func:`gptq_round`.
        max_damping_raises: as for :func:`gptq_round`.
        sequential: each layer's Hessian from inputs through the already-rounded earlier layers
            (GPTQ; one pass over ``data`` per layer) or, if False, all from the full-precision
            model (one pass).
        hessian_dtype: the dtype the Hessians are summed in.
        inplace: round ``model``'s own weights.
        progress: a progress bar over the layers.

    Returns the model, whose rounded layers hold :math:`\hat W` as their real weight (plain modules,
    not fake-quantized wrappers; biases unchanged), and a :class:`GPTQLayerResult` per layer. Every
    argument, layer and the first calibration batch are checked before a weight changes, and on
    any error an ``inplace`` model gets its weights back.

    """
    from tqdm import tqdm

    if not isinstance(bits, Mapping):
        raise TypeError(f"bits must be a dict {{layer name: bit width}}, got {type(bits).__name__}")
    if not isinstance(sequential, bool) or not isinstance(inplace, bool):
        raise ValueError("sequential and inplace must be True or False")
    if not (isinstance(hessian_dtype, torch.dtype) and hessian_dtype.is_floating_point):
        raise ValueError(f"hessian_dtype must be a floating-point torch.dtype, got {hessian_dtype!r}")
    _check_names(model, bits)
    _check_settings(8, block_size, percdamp, max_damping_raises, act_order)
    chosen = {n: b for n, b in bits.items() if b is not None}
    for n, b in chosen.items():
        validation.bit_width(b, f"bits[{n!r}]", 2, MAX_BITS)
        weight = cast(Tensor, model.get_submodule(n).weight)
        if not weight.is_floating_point():
            raise TypeError(f"layer {n!r} has a {weight.dtype} weight; GPTQ needs a floating-point one")
        _check_layer_granularity(weight, granularity, group_size)
    batches = as_batches(data)
    target = model if inplace else copy.deepcopy(model)
    saved = {n: cast(Tensor, target.get_submodule(n).weight).detach().clone() for n in chosen} if inplace else {}
    results: dict[str, GPTQLayerResult] = {}
    try:
        with _Calibrating(target):
            order = _execution_order(target, batches, list(chosen))
            if not sequential:
                hooks = {n: _Accumulator(target.get_submodule(n), hessian_dtype) for n in order}
                _run(target, batches, hooks)
            for n in tqdm(order, desc="GPTQ", unit="layer", disable=not progress, leave=False):
                if sequential:
                    hooks = {n: _Accumulator(target.get_submodule(n), hessian_dtype)}
                    _run(target, batches, hooks)
                acc = hooks[n]
                layer = target.get_submodule(n)
                weight = cast(Tensor, layer.weight)
                r = gptq_round(weight, acc.hessian(n), chosen[n], granularity, group_size, act_order=act_order,
                               block_size=block_size, percdamp=percdamp, max_damping_raises=max_damping_raises)
                weight.copy_(r.weight)
                results[n] = GPTQLayerResult(
                    name=n, bits=chosen[n], columns=weight[0].numel(), samples=acc.count, damping=r.damping,
                    relative_damping=r.relative_damping, damping_raises=r.damping_raises,
                    dead_inputs=r.dead_inputs, error=r.error, nearest_error=r.nearest_error)
    except BaseException:
        with torch.no_grad():
            for n, value in saved.items():
                cast(Tensor, target.get_submodule(n).weight).copy_(value)
        raise
    return GPTQResult(model=target, layers=results, sequential=sequential)
