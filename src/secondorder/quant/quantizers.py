r"""Uniform fake quantization for Hessian-aware mixed precision (HAWQ, HAWQ-V2, HAWQ-V3, Q-BERT).

Weights (HAWQ-V3, Yao et al. ICML 2021): symmetric, signed, ``b`` bits,

.. math::

    s = \frac{\max |w|}{2^{b-1}-1}, \qquad
    q = \mathrm{clamp}\big(\mathrm{round}(w/s),\,-2^{b-1},\,2^{b-1}-1\big), \qquad
    \hat w = s\,q,

with the maximum taken over the whole tensor, over each output channel (slice along dim 0: a row of
a Linear weight, a filter of a Conv weight), or over contiguous groups of output rows (Q-BERT's
group-wise quantization, Shen et al. AAAI 2020).

Activations (HAWQ-V3): asymmetric, unsigned, over a static range ``[x_min, x_max]`` tracked as a
running min/max during quantization-aware training,

.. math::

    s = \frac{x_{\max}-x_{\min}}{2^b-1}, \qquad z = \mathrm{round}(-x_{\min}/s), \qquad
    \hat x = s\,\big(\mathrm{clamp}(\mathrm{round}(x/s+z),\,0,\,2^b-1) - z\big).

Training uses the straight-through estimator (STE): the forward pass uses :math:`\hat x`, the
backward pass treats ``round`` as the identity and the clamp strictly (zero gradient outside it).
The perturbation :math:`\|Q_b(W)-W\|_2^2` is the factor HAWQ-V1 (Dong et al. ICCV 2019) and
HAWQ-V2 (Dong et al. NeurIPS 2020) multiply by a curvature (top eigenvalue, average trace) to rank
the layers' sensitivity.

``round`` is :func:`torch.round` (halves to even). The symmetric weight quantizer needs 2 to 32
bits: at ``b = 1`` the scale formula divides by :math:`2^0-1 = 0` and the signed grid is
``{-1, 0}``, which is not a useful weight code (binary weights, ``alpha * sign(w)``, are a different
quantizer and not provided). Activations accept 1 to 32 bits. Nothing here draws random numbers.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from numbers import Integral
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.func import functional_call

from secondorder import validation

__all__ = [
    "ActivationQuantizer",
    "QuantizedLayer",
    "fake_quantize",
    "quantizable_layers",
    "quantization_error",
    "quantize_weight",
    "symmetric_scale",
    "wrap_layers",
]

GRANULARITIES = ("tensor", "channel", "group")
MAX_BITS = 32


# ----------------------------------------------------------------------------- validation


def _check_optional_bits(bits: Any, low: int, what: str) -> int | None:
    """``None`` (full precision) or a valid bit width."""
    return None if bits is None else validation.bit_width(bits, what, low, MAX_BITS)


def _check_floating(x: Any, what: str) -> None:
    """``x`` must be a non-empty floating-point tensor."""
    if not isinstance(x, Tensor) or not x.is_floating_point():
        kind = f"a {x.dtype} tensor" if isinstance(x, Tensor) else type(x).__name__
        raise TypeError(f"{what} must be a floating-point tensor, got {kind}; convert it with .float()")
    if x.numel() == 0:
        raise ValueError(f"{what} is empty (shape {tuple(x.shape)}); there is nothing to quantize")


def _check_granularity(shape: torch.Size, granularity: str, group_size: Any) -> None:
    """Validate ``granularity`` and ``group_size`` against a weight of ``shape``."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if granularity != "group":
        if group_size is not None:
            raise ValueError(f"group_size applies only to granularity='group' (got granularity={granularity!r} "
                             f"and group_size={group_size!r}); leave group_size=None or use granularity='group'")
        if granularity == "channel" and len(shape) == 0:
            raise ValueError("per-channel quantization needs a tensor with at least one dimension (channels "
                             "along dim 0), got a 0-dim tensor; use granularity='tensor'")
        return
    if isinstance(group_size, bool) or not isinstance(group_size, Integral) or group_size < 1:
        raise ValueError(f"granularity='group' needs group_size, a positive integer number of rows (along dim 0) "
                         f"per group, got {group_size!r}")
    if len(shape) == 0 or shape[0] % group_size:
        rows = shape[0] if len(shape) else 0
        raise ValueError(f"group_size={group_size} does not divide the {rows} rows (dim 0) of a weight of shape "
                         f"{tuple(shape)}; choose a divisor of {rows}")


def _check_momentum(momentum: Any) -> float:
    """An EMA momentum in [0, 1], or -1 for a plain running min/max."""
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or \
            not (momentum == -1 or 0 <= momentum <= 1):
        raise ValueError(f"momentum must be in [0, 1] (EMA of the range) or -1 (plain running min/max), "
                         f"got {momentum!r}")
    return float(momentum)


# ----------------------------------------------------------------------------- weights


def _channel_shape(w: Tensor) -> list[int]:
    """``(C, 1, ..., 1)``: one entry per slice along dim 0, broadcastable to ``w``."""
    return [w.shape[0]] + [1] * (w.ndim - 1)


def _absmax(w: Tensor, granularity: str, group_size: int | None) -> Tensor:
    """``max |w|`` over each slice, shaped to broadcast against ``w``."""
    a = w.detach().abs()
    if granularity == "tensor":
        return a.amax().reshape([1] * w.ndim)
    if granularity == "channel":
        return a.reshape(w.shape[0], -1).amax(dim=1).reshape(_channel_shape(w))
    assert group_size is not None, "granularity='group' needs group_size (checked by the callers)"
    groups = w.shape[0] // group_size
    per_group = a.reshape(groups, -1).amax(dim=1)
    return per_group.repeat_interleave(group_size).reshape(_channel_shape(w))


def symmetric_scale(w: Tensor, bits: int, granularity: str = "channel", group_size: int | None = None) -> Tensor:
    r"""The symmetric scale :math:`s = \max|w| / (2^{b-1}-1)` (HAWQ-V3), broadcastable to ``w``.

    Args:
        w: floating-point weight; output channels along dim 0.
        bits: ``b`` in 2..32.
        granularity: where the maximum is taken: ``"tensor"`` (one scale, shape ``(1, ..., 1)``),
            ``"channel"`` (one per slice along dim 0, shape ``(C, 1, ..., 1)``) or ``"group"``
            (Q-BERT: one per block of ``group_size`` contiguous rows along dim 0, repeated over the
            block's rows, shape ``(C, 1, ..., 1)``; ``group_size`` must divide ``C``).
        group_size: rows per group, only for ``granularity="group"``.

    A slice whose maximum is 0 gets scale 1, so it quantizes to exactly 0 (never nan). The scale
    is detached: it is a constant of the quantizer, not a function the gradient flows through.

    """
    _check_floating(w, "w")
    bits = validation.bit_width(bits, "bits (symmetric weight quantization)", 2, MAX_BITS)
    _check_granularity(w.shape, granularity, group_size)
    amax = _absmax(w, granularity, group_size)
    return torch.where(amax > 0, amax / (2 ** (bits - 1) - 1), torch.ones_like(amax))


def quantize_weight(w: Tensor, bits: int, granularity: str = "channel", group_size: int | None = None) -> Tensor:
    r"""The fake-quantized weight :math:`s\,\mathrm{clamp}(\mathrm{round}(w/s), -2^{b-1}, 2^{b-1}-1)`.

    Same shape and dtype as ``w``; ``s`` from :func:`symmetric_scale` (same arguments). Since
    ``s`` covers ``max |w|``, every entry lies inside the clamp range: the straight-through
    gradient with respect to ``w`` is the identity. Every ``b`` in 2..32 is quantized the same
    way (for ``b`` beyond the float's mantissa the grid is finer than the float, and
    :math:`\hat w = w` up to rounding).
    """
    s = symmetric_scale(w, bits, granularity, group_size)
    qmax = 2 ** (int(bits) - 1) - 1
    return fake_quantize(w, s, 0.0, -qmax - 1, qmax)


def quantization_error(w: Tensor, bits: int, granularity: str = "channel", group_size: int | None = None) -> float:
    r""":math:`\|Q_b(w) - w\|_2^2`, HAWQ-V2's weight perturbation, computed in float64.

    ``w`` is read (detached, converted to float64) and quantized there, so the result is the
    exact error of the quantizer on the stored weights, whatever their dtype.
    """
    _check_floating(w, "w")
    w64 = w.detach().to(torch.float64)
    return float((quantize_weight(w64, bits, granularity, group_size) - w64).square().sum())


# ----------------------------------------------------------------------------- STE


def _as_tensor_like(value: Tensor | float, x: Tensor, what: str) -> Tensor:
    """``value`` detached, in ``x``'s dtype and device."""
    if isinstance(value, Tensor):
        return value.detach().to(dtype=x.dtype, device=x.device)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what} must be a tensor or a number, got {type(value).__name__}")
    return torch.tensor(float(value), dtype=x.dtype, device=x.device)


def fake_quantize(x: Tensor, scale: Tensor, zero_point: Tensor | float, qmin: int, qmax: int) -> Tensor:
    r"""Affine fake quantization with the strict straight-through estimator.

    Forward: :math:`\hat x = s\,(\mathrm{clamp}(q, q_{\min}, q_{\max}) - z)` with
    :math:`q = \mathrm{round}(x/s + z)`. Backward: :math:`\partial\hat x/\partial x = 1` where
    :math:`q_{\min} \le q \le q_{\max}` and 0 where the clamp is active (the convention of
    :func:`torch.fake_quantize_per_tensor_affine`). ``scale`` (positive) and ``zero_point`` must
    broadcast to ``x``; they are treated as constants (no gradient).

    Implemented without a custom autograd Function: ``x_hat + (p - p.detach())`` with
    ``p = where(inside, x, 0)``, which adds an exact zero in the forward pass and has gradient
    ``inside`` in the backward pass, so it composes with :mod:`torch.func` (grad, jvp, vmap) and
    double backward (where the second derivative is 0).
    """
    _check_floating(x, "x")
    for name, value in (("qmin", qmin), ("qmax", qmax)):
        if isinstance(value, bool) or not isinstance(value, Integral):
            raise ValueError(f"{name} must be an integer, got {value!r}")
    if not qmin < qmax:
        raise ValueError(f"need qmin < qmax, got qmin={qmin}, qmax={qmax}")
    s = _as_tensor_like(scale, x, "scale")
    z = _as_tensor_like(zero_point, x, "zero_point")
    q = torch.round(x.detach() / s + z)
    if q.shape != x.shape:
        raise ValueError(f"scale {tuple(s.shape)} and zero_point {tuple(z.shape)} must broadcast to x's shape "
                         f"{tuple(x.shape)} without enlarging it")
    inside = (q >= qmin) & (q <= qmax)
    x_hat = s * (q.clamp(int(qmin), int(qmax)) - z)
    passthrough = torch.where(inside, x, torch.zeros_like(x))
    return x_hat + (passthrough - passthrough.detach())


# ----------------------------------------------------------------------------- activations


class ActivationQuantizer(nn.Module):
    r"""Asymmetric unsigned activation quantization over a static, tracked range (HAWQ-V3).

    In training mode each batch updates the range, then is quantized with the updated range:
    the first batch sets it, later ones blend :math:`r \leftarrow m\,r + (1-m)\,r_{batch}`
    (``momentum`` ``m``, 0.99 in HAWQ-V3's model zoo), or with ``momentum=-1`` take the running
    min of minima and max of maxima. In eval mode the stored range is used and never changed.
    The range is widened to contain 0 (``min <= 0 <= max``, applied to every batch's statistics
    and again when quantizing), so that 0 is represented exactly. With ``s = (max-min)/(2^b-1)``
    (1 if the range is empty) and ``z = round(-min/s)``, the output is
    :func:`fake_quantize` ``(x, s, z, 0, 2^b-1)``, with the STE.

    Args:
        bits: 1..32, or ``None`` for the identity (the range is then not tracked either).
            Settable later (``quantizer.bits = 4``).
        momentum: in [0, 1], or -1 (plain running min/max).

    Buffers ``running_min``, ``running_max`` (float32 until the module is converted) and
    ``initialized`` (bool) carry the range through ``state_dict``.

    """

    running_min: Tensor
    running_max: Tensor
    initialized: Tensor

    def __init__(self, bits: int | None = 8, momentum: float = 0.99):
        super().__init__()
        self.bits = bits
        self.momentum = _check_momentum(momentum)
        self.register_buffer("running_min", torch.zeros(()))
        self.register_buffer("running_max", torch.zeros(()))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    @property
    def bits(self) -> int | None:
        """The bit width, or ``None`` (identity)."""
        return self._bits

    @bits.setter
    def bits(self, value: int | None) -> None:
        self._bits = _check_optional_bits(value, 1, "activation bits")

    def extra_repr(self) -> str:
        return f"bits={self._bits}, momentum={self.momentum}"

    def forward(self, x: Tensor) -> Tensor:
        """``x`` quantized with the tracked range (updated first in training mode)."""
        if self._bits is None:
            return x
        _check_floating(x, "the activation")
        if self.training:
            self._observe(x)
        elif not bool(self.initialized):
            raise RuntimeError("ActivationQuantizer has no range yet: run it in training mode on some batches "
                               "(calibration) before eval mode, or load a state_dict that holds one")
        scale, zero_point = self._qparams(x.dtype)
        return fake_quantize(x, scale, zero_point, 0, 2 ** self._bits - 1)

    @torch.no_grad()
    def _observe(self, x: Tensor) -> None:
        """Fold the batch's range (widened to contain 0) into the running range."""
        x = x.detach()
        low = x.min().clamp(max=0).to(self.running_min.dtype)
        high = x.max().clamp(min=0).to(self.running_max.dtype)
        for buffer, batch, pick in ((self.running_min, low, torch.minimum),
                                    (self.running_max, high, torch.maximum)):
            m = self.momentum
            blended = pick(buffer, batch) if m < 0 else m * buffer + (1 - m) * batch
            buffer.copy_(torch.where(self.initialized, blended, batch))
        self.initialized.fill_(True)

    def _qparams(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """``(s, z)`` from the stored range, in ``dtype``."""
        low = self.running_min.clamp(max=0).to(dtype)
        high = self.running_max.clamp(min=0).to(dtype)
        assert self._bits is not None, "only called when the quantizer has bits"
        scale = (high - low) / (2 ** self._bits - 1)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        return scale, torch.round(-low / scale)


# ----------------------------------------------------------------------------- layers


class QuantizedLayer(nn.Module):
    """A module with a ``weight`` Parameter, run with fake-quantized weight and input (QAT).

    ``forward(x, *args, **kwargs)`` quantizes ``x`` with :attr:`act_quantizer` (an
    :class:`ActivationQuantizer`; identity when ``act_bits`` is ``None``), then calls the wrapped
    module through :func:`torch.func.functional_call` with ``weight`` replaced by
    :func:`quantize_weight` of the real weight, so the module's own forward (stride, padding,
    bias, ...) runs unchanged and the STE carries the gradient to ``module.weight``. The bias and
    any other parameters stay in full precision (HAWQ-V3 keeps bias in INT32).

    Args:
        module: any module whose ``weight`` is an ``nn.Parameter`` (Linear, ConvNd, custom ones).
        weight_bits: 2..32, or ``None`` for full-precision weights.
        act_bits: 1..32 for the input activation, or ``None`` (not quantized).
        granularity, group_size: as for :func:`symmetric_scale`.
        act_momentum: the activation range's momentum (see :class:`ActivationQuantizer`).

    ``weight_bits`` and ``act_bits`` are settable (a new bit configuration without rewrapping).
    The wrapper starts in the wrapped module's train/eval mode. Modules whose parent reads
    ``child.weight`` directly instead of calling the child (e.g. ``nn.MultiheadAttention.out_proj``)
    cannot be wrapped usefully.

    """

    def __init__(self, module: nn.Module, weight_bits: int | None, act_bits: int | None = None,
                 granularity: str = "channel", group_size: int | None = None, act_momentum: float = 0.99):
        super().__init__()
        if isinstance(module, QuantizedLayer):
            raise TypeError("the module is already a QuantizedLayer; set its weight_bits/act_bits instead of "
                            "wrapping it again")
        weight = getattr(module, "weight", None)
        if not isinstance(weight, nn.Parameter):
            raise TypeError(f"QuantizedLayer needs a module with a `weight` nn.Parameter; {type(module).__name__} "
                            f"has {'no weight' if weight is None else 'a weight of type ' + type(weight).__name__}")
        _check_floating(weight, f"{type(module).__name__}.weight")
        _check_granularity(weight.shape, granularity, group_size)
        self.module = module
        self.granularity = granularity
        self.group_size = group_size
        self.weight_bits = weight_bits
        self.act_quantizer = ActivationQuantizer(act_bits, act_momentum)
        self.training = self.act_quantizer.training = module.training

    @property
    def weight_bits(self) -> int | None:
        """Weight bit width, or ``None`` (full precision)."""
        return self._weight_bits

    @weight_bits.setter
    def weight_bits(self, value: int | None) -> None:
        self._weight_bits = _check_optional_bits(value, 2, "weight_bits")

    @property
    def act_bits(self) -> int | None:
        """Input-activation bit width, or ``None`` (not quantized)."""
        return self.act_quantizer.bits

    @act_bits.setter
    def act_bits(self, value: int | None) -> None:
        self.act_quantizer.bits = value

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.group_size is not None else ""
        return f"weight_bits={self._weight_bits}, act_bits={self.act_bits}, granularity={self.granularity!r}{group}"

    def forward(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        """The wrapped module on the quantized input, with the quantized weight."""
        x = self.act_quantizer(x)
        if self._weight_bits is None:
            return self.module(x, *args, **kwargs)
        w_q = quantize_weight(cast(Tensor, self.module.weight), self._weight_bits, self.granularity, self.group_size)
        return functional_call(self.module, {"weight": w_q}, (x, *args), kwargs)


def _owns_matrix_weight(module: nn.Module) -> bool:
    """Whether ``module`` itself registers a ``weight`` Parameter with at least 2 dimensions."""
    weight = module._parameters.get("weight")
    return isinstance(weight, nn.Parameter) and weight.ndim >= 2


def quantizable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The named submodules that directly own a ``weight`` Parameter with ``ndim >= 2``.

    Linear, ConvNd, Embedding and custom modules qualify; norms (1-D weight) do not. In
    ``named_modules()`` order. A :class:`QuantizedLayer` at ``name`` is listed once, as
    ``(name, wrapper.module)``, and nothing inside it is listed again, so the names are those
    :func:`wrap_layers` accepts whether or not the layer is already wrapped.
    """
    layers: list[tuple[str, nn.Module]] = []
    wrapped: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in wrapped):
            continue
        if isinstance(module, QuantizedLayer):
            layers.append((name, module.module))
            wrapped.append(f"{name}." if name else "")
        elif _owns_matrix_weight(module):
            layers.append((name, module))
    return layers


def _check_names(model: nn.Module, bits: Mapping, act_bits: Mapping) -> None:
    """Every name in ``bits`` must be a quantizable layer, every name in ``act_bits`` in ``bits``."""
    for what, mapping in (("bits", bits), ("act_bits", act_bits)):
        if not isinstance(mapping, Mapping):
            raise TypeError(f"{what} must be a dict {{layer name: bit width or None}}, got {type(mapping).__name__}")
    valid = [name for name, _ in quantizable_layers(model)]
    unknown = [name for name in bits if name not in valid]
    if unknown:
        raise ValueError(f"{unknown} are not quantizable layers of this model (a quantizable layer directly owns "
                         f"a `weight` Parameter with ndim >= 2); valid names: {valid}")
    extra = [name for name in act_bits if name not in bits]
    if extra:
        raise ValueError(f"act_bits names {extra} are not in bits; add them to bits (None keeps the weights in "
                         f"full precision)")


def _rewrap(current: nn.Module, weight_bits: int | None, act_bits: int | None, granularity: str,
            group_size: int | None) -> QuantizedLayer:
    """A QuantizedLayer for ``current``; an existing wrapper is replaced, its activation range kept."""
    if not isinstance(current, QuantizedLayer):
        return QuantizedLayer(current, weight_bits, act_bits, granularity, group_size)
    layer = QuantizedLayer(current.module, weight_bits, act_bits, granularity, group_size,
                           current.act_quantizer.momentum)
    layer.act_quantizer.load_state_dict(current.act_quantizer.state_dict())
    layer.training = layer.act_quantizer.training = current.training
    return layer


def wrap_layers(model: nn.Module, bits: Mapping[str, int | None], act_bits: Mapping[str, int | None] | None = None,
                granularity: str = "channel", group_size: int | None = None, inplace: bool = False) -> nn.Module:
    """``model`` with each layer named in ``bits`` replaced by a :class:`QuantizedLayer`.

    Args:
        model: the network; left untouched unless ``inplace`` (a deep copy is wrapped).
        bits: ``{layer name: weight bits or None}``; names as :func:`quantizable_layers` lists them
            (dotted paths from ``model``; ``""`` is ``model`` itself, which is then returned wrapped).
        act_bits: ``{layer name: input-activation bits or None}``, names a subset of ``bits``'s;
            layers not named get no activation quantization (HAWQ-V3 sets a layer's activation bits
            to its weight bits: pass the same dict twice).
        granularity: as for :func:`symmetric_scale`, for every wrapped layer.
        group_size: as for :func:`symmetric_scale`, for every wrapped layer.
        inplace: wrap ``model`` itself.

    A layer that is already a QuantizedLayer is reconfigured (new bits and granularity, its
    activation range kept), never nested. All names and settings are validated before anything is
    replaced, so a ``ValueError`` leaves the model as it was. Use the returned module.

    """
    act_bits = {} if act_bits is None else act_bits
    _check_names(model, bits, act_bits)
    target = model if inplace else copy.deepcopy(model)
    sites = []
    for name in bits:
        parent_name, _, child = name.rpartition(".")
        parent = target.get_submodule(parent_name) if name else None
        current = getattr(parent, child) if name else target
        sites.append((parent, child, _rewrap(current, bits[name], act_bits.get(name), granularity, group_size)))
    for parent, child, layer in sites:
        if parent is None:
            target = layer
        else:
            setattr(parent, child, layer)
    return target
