r"""Kronecker-factored curvature (K-FAC; Martens & Grosse 2015; KFC for convolutions, Grosse &
Martens 2016).

For a layer :math:`s = \bar W \bar a` (``nn.Linear``, or ``nn.Conv1d``/``nn.Conv2d`` on im2col patches, the
bias joined to the weight through a homogeneous coordinate :math:`\bar a = (a, 1)`), the
layer's block of the curvature of the mean loss :math:`\frac1N\sum_n \ell_n` is approximated by

.. math:: C_{\text{layer}} \approx S \otimes A,\qquad A = \frac1N\sum_n \frac1T\sum_t \bar a_{nt}\bar a_{nt}^\top,
          \qquad S = \sum_n\sum_t \sum_c g_{ntc}\, g_{ntc}^\top

(row-major :math:`\mathrm{vec}(\bar W)`, so :math:`(S\otimes A)\,\mathrm{vec}(V) = \mathrm{vec}(S V A)`),
:math:`T` the spatial positions of a convolution (1 for a linear layer) and :math:`g` the
back-propagated pre-activation gradients of one of three ``fisher`` types:

* ``"ggn"``: the exact Gauss-Newton factor ("type-2"): the columns of a symmetric square root
  :math:`M_n M_n^\top = \nabla^2_f \ell` of each sample's output Hessian (of the mean loss, closed
  form for cross-entropy, MSE, BCE, :mod:`secondorder.operators.output_hessians`), one backward
  per output dimension. With one sample per batch (or inputs with constant :math:`aa^\top`) it
  is the exact block-diagonal GGN.
* ``"mc"``: ``mc_samples`` backwards of the loss at labels drawn from the model's predictive
  distribution (cross-entropy: softmax; BCE with logits: Bernoulli; MSE: a Gaussian whose Fisher
  is the output Hessian), :math:`S = N \sum_n g_n g_n^\top` averaged over the draws: an unbiased
  estimate of the ``"ggn"`` factor, from the operator's (or optimizer's) generator.
* ``"empirical"``: the same at the true labels (the empirical Fisher; what kfac-pytorch uses).

Over a loader the factors are size-weighted like every other operator here:
:math:`A = \sum_{n} \bar a\bar a^\top / N` over all samples and :math:`S = \sum_b n_b S_b / N`.
Layers other than Linear, Conv1d and Conv2d (LayerNorm, embeddings, attention, grouped convolutions)
are refused by name: select the supported layers with ``params=``. Besides products the
operator has exact :meth:`KFACOperator.trace`, :meth:`~KFACOperator.logdet`, the eigenpairs of
its factors and :meth:`~KFACOperator.inverse`, the inverse of the factored-Tikhonov damped
:math:`(S + \frac{\sqrt\lambda}{\pi} I)\otimes(A + \pi\sqrt\lambda I)` with
:math:`\pi = \sqrt{(\mathrm{tr}A/\dim A)/(\mathrm{tr}S/\dim S)}` (Martens & Grosse 2015, §6.3).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from secondorder import validation
from secondorder.distributed.reducer import LOCAL, Reducer
from secondorder.operators.base import Block, LinearOperator
from secondorder.operators.curvature import _operator_reducer
from secondorder.operators.output_hessians import _loss_kind, output_hessian
from secondorder.operators.params import make_blocks, select_parameters
from secondorder.operators.risk import EmpiricalRisk

FISHER_TYPES = ("ggn", "mc", "empirical")
CONVOLUTIONS = (nn.Conv1d, nn.Conv2d)


@dataclass(frozen=True)
class KroneckerFactors:
    """One layer's factors: ``A`` over its (homogeneous) inputs, ``S`` over its outputs.

    ``weight`` and ``bias`` are the parameters' positions in the operator's parameter list.
    """

    name: str
    weight: int
    bias: int | None
    A: Tensor
    S: Tensor

    @property
    def shape(self) -> tuple[int, int]:
        r"""``(d_out, d_in + has bias)``: the joint matrix :math:`\bar W`."""
        return self.S.shape[0], self.A.shape[0]


def covers(module: nn.Module) -> bool:
    """Whether K-FAC factors ``module``: Linear, or Conv1d/Conv2d with groups=1 and numeric zero padding."""
    return isinstance(module, nn.Linear) or (isinstance(module, CONVOLUTIONS) and module.groups == 1
                                             and module.padding_mode == "zeros" and not isinstance(module.padding, str))


def supported_layers(model: nn.Module, params: Sequence[Tensor], names: Sequence[str]) -> list[tuple[str, nn.Module]]:
    """The Linear/Conv2d modules owning ``params``; ``ValueError`` naming any parameter another layer owns."""
    owner = {id(p): (name, m) for name, m in model.named_modules() for p in m.parameters(recurse=False)}
    layers, seen, unsupported = [], set(), []
    for p, pname in zip(params, names):
        name, module = owner[id(p)]
        if not covers(module):
            unsupported.append(f"{pname} ({type(module).__name__})")
        elif id(module) not in seen:
            seen.add(id(module))
            layers.append((name, module))
    if unsupported:
        raise ValueError(f"K-FAC covers nn.Linear, nn.Conv1d and nn.Conv2d (groups=1, numeric zero padding); these parameters belong to "
                         f"other layers: {', '.join(unsupported)}. Select the supported layers with params=, e.g. "
                         "params=lambda name, p: not name.startswith('norm')")
    return layers


def im2col(x: Tensor, kernel: Sequence[int], dilation: Sequence[int], padding: Sequence[int],
           stride: Sequence[int]) -> Tensor:
    """``F.unfold(x, kernel, dilation, padding, stride).transpose(1, 2)``, ``[N, L, C kh kw]``, as
    strided windows of the zero-padded input and one copy (3x faster than ``F.unfold`` for the
    MNIST-1D CNN's layers on a CPU, and 40x for its one-channel first layer).
    """
    (kh, kw), (dh, dw), (ph, pw), (sh, sw) = kernel, dilation, padding, stride
    x = F.pad(x, (pw, pw, ph, ph)) if ph or pw else x  # F.pad copies even by zero
    win = x.unfold(2, (kh - 1) * dh + 1, sh).unfold(3, (kw - 1) * dw + 1, sw)[..., ::dh, ::dw]  # [N, C, H', W', kh, kw]
    n, c, h, w = win.shape[:4]
    return win.permute(0, 2, 3, 1, 4, 5).reshape(n, h * w, c * kh * kw)


def _patches(module: nn.Module, x: Tensor) -> Tensor:
    """The layer's inputs as ``[N, T, d_in (+1)]`` (im2col patches for a convolution)."""
    if isinstance(module, nn.Conv1d):  # a Conv2d of height 1
        x = im2col(x.unsqueeze(2), (1, module.kernel_size[0]), (1, module.dilation[0]),
                   (0, cast(tuple, module.padding)[0]), (1, module.stride[0]))
    elif isinstance(module, nn.Conv2d):
        padding = cast(tuple, module.padding)  # numeric: checked by supported_layers
        x = im2col(x, module.kernel_size, module.dilation, padding, module.stride)
    else:
        x = x.reshape(x.shape[0], -1, x.shape[-1])
    if module.bias is not None:
        x = torch.cat([x, torch.ones_like(x[..., :1])], dim=-1)
    return x


def _output_grads(module: nn.Module, g: Tensor) -> Tensor:
    """Pre-activation gradients as ``[N, T, d_out]``."""
    if isinstance(module, CONVOLUTIONS):
        return g.flatten(2).transpose(1, 2)
    return g.reshape(g.shape[0], -1, g.shape[-1])


def _sampled_targets(loss_fn: Callable, outputs: Tensor, generator: torch.Generator, offset: int = 0,
                     total: int | None = None) -> Tensor:
    """Labels drawn from the predictive distribution whose Fisher is the loss's output Hessian.

    The random numbers are drawn for a batch of ``total`` samples and this one takes rows
    ``offset, ..., offset + n - 1``: ranks holding shards of one batch draw the labels that one
    process draws for the whole batch.
    """
    kind = _loss_kind(loss_fn)
    f = outputs.detach()
    n = f.shape[0]
    rows = slice(offset, offset + n)
    shape = ((n if total is None else total), *f.shape[1:])

    def uniform(*size: int) -> Tensor:
        return torch.rand(size, generator=generator, dtype=f.dtype, device=f.device)[rows]

    if kind is not None and kind[0] == "ce" and f.ndim == 2:
        cdf = torch.softmax(f, dim=1).cumsum(1)
        u = uniform(shape[0]).unsqueeze(1) * cdf[:, -1:]
        return torch.searchsorted(cdf, u).squeeze(1).clamp_max(f.shape[1] - 1)
    if kind is not None and kind[0] == "bce_logits":
        return (uniform(*shape) < torch.sigmoid(f)).to(f.dtype)
    if kind is not None and kind[0] == "mse":  # H = 2/(N C) I: Cov(y) = C/2 makes N E[g g^T] equal it
        noise = torch.randn(shape, generator=generator, dtype=f.dtype, device=f.device)[rows]
        return f + math.sqrt(f[0].numel() / 2) * noise
    raise ValueError("fisher='mc' samples labels for nn.CrossEntropyLoss (class targets), nn.BCEWithLogitsLoss and "
                     "nn.MSELoss (mean reduction); use fisher='ggn' or 'empirical' for other losses")


class Capture:
    """Records every layer's input and output during the forward passes inside ``with``."""

    def __init__(self, layers: list[tuple[str, nn.Module]]) -> None:
        self.layers = layers
        self.inputs: list[Tensor] = [torch.empty(0)] * len(layers)
        self.outputs: list[Tensor] = [torch.empty(0)] * len(layers)

    def __enter__(self) -> "Capture":
        def hook(i):
            def record(module, args, output):
                self.inputs[i], self.outputs[i] = args[0].detach(), output
            return record

        self._handles = [m.register_forward_hook(hook(i)) for i, (_, m) in enumerate(self.layers)]
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()

    def input_factors(self) -> list[Tensor]:
        r"""Per layer :math:`\sum_n \frac1T\sum_t \bar a\bar a^\top` of the captured inputs."""
        out = []
        for (_, module), x in zip(self.layers, self.inputs):
            u = _patches(module, x)
            out.append(torch.einsum("nti,ntj->ij", u, u) / u.shape[1])
        return out

    def output_factors(self, grads: Sequence[Tensor], scale: float) -> list[Tensor]:
        r"""Per layer ``scale`` :math:`\sum_{n,t} g g^\top` of gradients w.r.t. the captured outputs."""
        out = []
        for (_, module), g in zip(self.layers, grads):
            g = _output_grads(module, g).reshape(-1, g.shape[1] if isinstance(module, CONVOLUTIONS) else g.shape[-1])
            out.append(scale * (g.T @ g))
        return out


def check_logits(outputs: Any, where: str) -> Tensor:
    """The model's outputs, which K-FAC needs as ``[batch, outputs]`` logits."""
    if not isinstance(outputs, Tensor) or outputs.ndim != 2:
        raise ValueError(f"K-FAC needs the model to return [batch, outputs] logits; {where} gave "
                         f"{list(outputs.shape) if isinstance(outputs, Tensor) else type(outputs).__name__}")
    return outputs


def output_factors(capture: Capture, outputs: Tensor, loss_fn: Callable, fisher: str, targets: Any,
                   mc_samples: int, generator: torch.Generator, offset: int = 0,
                   total: int | None = None) -> list[Tensor]:
    """Per layer :math:`n_b S_b` of one batch (module docstring) from its captured forward."""
    n = outputs.shape[0]

    def grads(roots: Tensor, cotangent: Tensor | None = None) -> tuple:
        return torch.autograd.grad([roots], capture.outputs, None if cotangent is None else [cotangent],
                                   retain_graph=True)

    if fisher == "ggn":
        C = outputs.shape[1]
        eye = torch.eye(C, dtype=outputs.dtype, device=outputs.device)
        HU = output_hessian(loss_fn, outputs, targets)(eye.unsqueeze(1).expand(C, n, C).contiguous())
        lam, Q = torch.linalg.eigh(HU.permute(1, 2, 0))  # per sample [C, C]; symmetric
        M = Q * lam.clamp_min(0).sqrt().unsqueeze(1)
        # the cotangents carry the mean loss's 1/n: their plain sum is S_b
        parts = [capture.output_factors(grads(outputs, M[:, :, c]), float(n)) for c in range(C)]
    else:
        draws = mc_samples if fisher == "mc" else 1
        parts = []
        for _ in range(draws):
            y = _sampled_targets(loss_fn, outputs, generator, offset, total) if fisher == "mc" else targets
            parts.append(capture.output_factors(grads(loss_fn(outputs, y)), float(n) * n / draws))
    return [sum(layer[1:], layer[0]) for layer in zip(*parts)]


def batch_factors(risk: EmpiricalRisk, layers: list[tuple[str, nn.Module]], batch: Any, index: int, fisher: str,
                  mc_samples: int, generator: torch.Generator) -> list[tuple[Tensor, Tensor]]:
    """One batch's ``(sum over samples of A's terms, n_b S_b)`` per layer: the pure per-batch part."""
    with Capture(layers) as capture, torch.enable_grad():
        outputs = check_logits(risk.outputs(batch, index), f"batch {index}")
    S = output_factors(capture, outputs, risk.loss_fn, fisher, batch[1], mc_samples, generator)
    return list(zip(capture.input_factors(), S))


class KFACOperator(LinearOperator):
    """K-FAC of the data-set mean loss (module docstring), a :class:`LinearOperator` over the
    selected parameters, one block per layer.

    Args:
        model, loss_fn, data, params: as :class:`~secondorder.operators.HessianOperator`
            (``loss_fn(outputs, targets)`` returning a batch's mean loss; the model returns logits
            ``[batch, outputs]``).
        fisher: ``"ggn"`` (exact Gauss-Newton factors), ``"mc"`` (sampled labels) or ``"empirical"``.
        mc_samples: label draws per sample for ``"mc"``.
        seed: seeds the label draws (and the per-batch dropout masks).
        distributed: data-parallel (``True`` or a reducer): the factors' sums and the sample
            count are all-reduced once, so every rank holds the factors of the concatenated data.

    """

    def __init__(self, model: nn.Module, loss_fn: Callable, data: Any, params=None, *, fisher: str = "ggn",
                 mc_samples: int = 1, seed: int = 0, distributed: bool | Reducer = False,
                 batch_size_fn: Callable[[Any], int] | None = None) -> None:
        self.fisher = validation.one_of(fisher, "fisher", FISHER_TYPES)
        mc_samples = validation.positive_int(mc_samples, "mc_samples")
        named = select_parameters(model, params)
        self.params: list[Tensor] = [p for _, p in named]
        layers = supported_layers(model, self.params, [n for n, _ in named])
        index = {id(p): i for i, p in enumerate(self.params)}
        for name, m in layers:
            missing = [f"{name}.{k}" for k, p in m.named_parameters(recurse=False) if id(p) not in index]
            if missing:
                raise ValueError(f"K-FAC factors a layer's weight and bias together; select both or neither: "
                                 f"{', '.join(missing)} not selected")
        risk = EmpiricalRisk(model, loss_fn, data, False, batch_size_fn, validation.seed(seed))
        self.reducer = _operator_reducer(distributed)
        self.dtype, self.device = self.params[0].dtype, self.params[0].device
        generator = torch.Generator(device=self.device).manual_seed(seed)
        sums: list[list[Tensor]] = []

        def visit(i: int, batch: Any, n: int) -> None:
            found = batch_factors(risk, layers, batch, i, self.fisher, mc_samples, generator)
            if not sums:
                sums.extend([list(pair) for pair in found])
            else:
                for acc, pair in zip(sums, found):
                    acc[0] += pair[0]
                    acc[1] += pair[1]

        local_n = risk.for_each_batch(self.device, visit)
        flat = [t for pair in sums for t in pair] + [torch.tensor([float(local_n)], dtype=self.dtype, device=self.device)]
        flat = self.reducer.sum(flat, what="K-FAC factors")
        total = float(flat[-1])
        self.factors = tuple(
            KroneckerFactors(name, index[id(m.weight)], index[id(m.bias)] if m.bias is not None else None,
                             A=flat[2 * i] / total, S=flat[2 * i + 1] / total)
            for i, (name, m) in enumerate(layers))
        self.num_samples = int(total)
        self._setup(make_blocks(named, "module"))

    @classmethod
    def from_factors(cls, params: Sequence[Tensor], factors: Sequence[KroneckerFactors],
                     blocks: tuple[Block, ...]) -> "KFACOperator":
        """The operator of given factors (e.g. an optimizer's running averages) over ``params``."""
        op = cls.__new__(cls)
        op.params, op.factors, op.reducer, op.fisher = list(params), tuple(factors), LOCAL, "given"
        op.dtype, op.device = op.params[0].dtype, op.params[0].device
        op._setup(blocks)
        return op

    def _setup(self, blocks: tuple[Block, ...]) -> None:
        sizes = [p.numel() for p in self.params]
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        self._slices = [slice(s, s + n) for s, n in zip(starts, sizes)]
        covered = sorted(i for f in self.factors for i in (f.weight, f.bias) if i is not None)
        if covered != list(range(len(self.params))):
            raise ValueError("every parameter must belong to exactly one factored layer")
        P = sum(sizes)
        self.shape = (P, P)
        self.blocks = blocks
        self.num_matvecs = 0

    # ---- products -------------------------------------------------------------------------
    def _apply(self, V: Tensor, left: Callable[[KroneckerFactors], Tensor],
               right: Callable[[KroneckerFactors], Tensor]) -> Tensor:
        r"""Per layer ``left(f)`` :math:`\bar V` ``right(f)`` of each column of ``V`` ``[P, K]``.

        Two GEMMs per layer on a ``[d_out, K, d_in (+1)]`` copy of the layer's rows: the left factor
        acts on the leading index (``[d_out, K (d_in + 1)]``), the right one on the trailing index
        (``[d_out K, d_in + 1]``), so every product is one large matrix multiplication and the
        columns are transposed once in and once out (not a batched product per column).
        """
        V = V.contiguous()
        K = V.shape[1]
        out = torch.empty_like(V)
        for f in self.factors:
            d_out, d_in = f.shape
            w = self._slices[f.weight]
            d_w = d_in - (f.bias is not None)
            rows, into = V[w].view(d_out, d_w, K), out[w].view(d_out, d_w, K)
            if K == 1:  # plain matrices: no transposition
                rows, into = rows.view(d_out, 1, d_w), into.view(d_out, 1, d_w)
            if f.bias is None and K == 1:
                Z = rows
            else:
                Z = V.new_empty(d_out, K, d_in)
                Z[:, :, :d_w] = rows.transpose(1, 2) if K > 1 else rows
                if f.bias is not None:
                    Z[:, :, d_w] = V[self._slices[f.bias]]
            Y = torch.mm(torch.mm(left(f), Z.view(d_out, K * d_in)).view(d_out * K, d_in), right(f))
            Y = Y.view(d_out, K, d_in)
            into.copy_(Y[:, :, :d_w].transpose(1, 2) if K > 1 else Y[:, :, :d_w])
            if f.bias is not None:
                out[self._slices[f.bias]] = Y[:, :, d_w]
        return out

    def _matmat(self, V: Tensor) -> Tensor:
        return self._apply(V, lambda f: f.S, lambda f: f.A)

    # ---- exact quantities -------------------------------------------------------------------
    def trace(self) -> float:
        r""":math:`\sum_{\text{layers}} \mathrm{tr}(S)\,\mathrm{tr}(A)`, exactly."""
        return float(sum(torch.trace(f.S) * torch.trace(f.A) for f in self.factors))

    def logdet(self) -> float:
        r""":math:`\sum d_{A}\log\det S + d_{S}\log\det A` (``-inf`` for a singular factor)."""
        return float(sum(f.A.shape[0] * torch.linalg.slogdet(f.S.double())[1]
                         + f.S.shape[0] * torch.linalg.slogdet(f.A.double())[1] for f in self.factors))

    def factor_eigendecomposition(self) -> list[tuple[Tensor, Tensor, Tensor, Tensor]]:
        r"""Per layer ``(eigenvalues of A, eigenvectors of A, eigenvalues of S, eigenvectors of S)``;
        the operator's eigenvalues in a layer are the products :math:`\lambda_S\lambda_A`.
        """
        return [(*torch.linalg.eigh(f.A), *torch.linalg.eigh(f.S)) for f in self.factors]

    def inverse(self, damping: float) -> "KFACOperator":
        """The inverse of the factored-Tikhonov damped operator (module docstring), as an operator."""
        damping = validation.positive_finite(damping, "damping")
        return type(self).from_factors(self.params, [damped_inverse(f, damping) for f in self.factors], self.blocks)


def damped_inverse(f: KroneckerFactors, damping: float) -> KroneckerFactors:
    r"""One layer's factored-Tikhonov damped inverse factors :math:`(A + \pi\sqrt\lambda I)^{-1}` and
    :math:`(S + \frac{\sqrt\lambda}\pi I)^{-1}` (eigenvalues clamped at 0), by the factors' eigenpairs.
    """
    (la, qa), (ls, qs), pi = torch.linalg.eigh(f.A), torch.linalg.eigh(f.S), damped_pi(f)
    a = (qa / (la.clamp_min(0) + pi * math.sqrt(damping))) @ qa.T
    s = (qs / (ls.clamp_min(0) + math.sqrt(damping) / pi)) @ qs.T
    return replace(f, A=a, S=s)


def damped_pi(f: KroneckerFactors) -> float:
    r"""Martens & Grosse's :math:`\pi = \sqrt{(\mathrm{tr}A/\dim A)/(\mathrm{tr}S/\dim S)}` (1 for a zero factor)."""
    a, s = float(torch.trace(f.A)) / f.A.shape[0], float(torch.trace(f.S)) / f.S.shape[0]
    return math.sqrt(a / s) if a > 0 and s > 0 else 1.0
