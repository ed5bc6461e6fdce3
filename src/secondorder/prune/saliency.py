r"""Saliencies and the optimal-brain-surgeon compensating update, on the flattened prunable weights.

For weights :math:`w \in \mathbb R^d` and a local quadratic model of the loss,
:math:`\Delta L(\delta) \approx \tfrac12 \delta^\top H \delta` (at a minimum, the gradient term
vanishes):

* **magnitude**: :math:`\rho_q = |w_q|` (global magnitude pruning, the curvature-blind baseline);
* **optimal brain damage** (LeCun, Denker & Solla, "Optimal Brain Damage", NIPS 1990): with a
  diagonal :math:`H`, removing :math:`w_q` and leaving the others costs
  :math:`\rho_q = \tfrac12 w_q^2 H_{qq}`; no update. Here :math:`H_{qq}` is the library's
  estimate of the Hessian diagonal (Hutchinson or XDiag); a negative estimate makes a weight
  cheaper to remove, as the formula says;
* **optimal brain surgeon** (Hassibi & Stork, "Second order derivatives for network pruning:
  Optimal Brain Surgeon", NIPS 1993): removing the set :math:`Q` (:math:`E_Q` its columns of the
  identity) and letting the other weights move, the minimiser of
  :math:`\tfrac12\delta^\top H\delta` subject to :math:`\delta_Q = -w_Q` is

  .. math:: \delta^\star = -H^{-1}E_Q\,(E_Q^\top H^{-1} E_Q)^{-1} w_Q,\qquad
            \Delta L = \tfrac12 w_Q^\top (E_Q^\top H^{-1}E_Q)^{-1} w_Q,

  for one weight :math:`\delta^\star = -w_q H^{-1}e_q / [H^{-1}]_{qq}` and
  :math:`\rho_q = w_q^2 / (2[H^{-1}]_{qq})`.

With M-FAC (Frantar, Kurtic & Alistarh, "M-FAC: Efficient Matrix-Free Approximations of
Second-Order Information", NeurIPS 2021) :math:`H \approx \hat F = \lambda I + \frac1m G^\top G`,
block diagonal over chunks of :math:`B` consecutive coordinates
(:class:`~secondorder.MFACOperator` with ``block_size=B``). Then :math:`\hat F^{-1}` is block
diagonal too, the constraint splits over the blocks, and :math:`\delta^\star` is computed block by
block: with :math:`W_b = L_b^{-1} G_b` (:math:`G_b \in \mathbb R^{m\times B}` the window's chunk,
:math:`L_bL_b^\top = G_bG_b^\top + m\lambda I`), :math:`\hat F_b^{-1} = \lambda^{-1}(I - W_b^\top W_b)`
(:math:`B\times B`), and each block solves its own :math:`|Q_b|\times|Q_b|` system (all blocks at
once, the coordinates outside :math:`Q_b` padded with the identity). The cost is
:math:`O(d(mB + B^2))`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from secondorder.operators.mfac import MFACOperator

__all__ = ["magnitude_saliency", "obd_saliency", "obs_saliency", "obs_update", "select_pruned"]

_BLOCKS_AT_ONCE = 512  # blocks of B x B float64 formed at a time (512 * 128^2 * 8 bytes = 64 MiB)


def _flat(name: str, x: Tensor) -> Tensor:
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got {type(x).__name__}")
    return x.reshape(-1)


def magnitude_saliency(weights: Tensor) -> Tensor:
    r""":math:`|w_q|`."""
    return _flat("weights", weights).abs()


def obd_saliency(weights: Tensor, hessian_diagonal: Tensor) -> Tensor:
    r"""Optimal brain damage, :math:`\tfrac12 w_q^2 H_{qq}` (LeCun et al. 1990), for a given diagonal."""
    w, h = _flat("weights", weights), _flat("hessian_diagonal", hessian_diagonal)
    if h.shape != w.shape:
        raise ValueError(f"the Hessian diagonal has {h.numel()} entries, the weights {w.numel()}")
    if not bool(torch.isfinite(h).all()):
        raise ValueError("the Hessian diagonal is not finite")
    return 0.5 * w.square() * h.to(w.dtype)


def obs_saliency(weights: Tensor, inverse_diagonal: Tensor) -> Tensor:
    r"""Optimal brain surgeon, :math:`w_q^2 / (2[\hat F^{-1}]_{qq})` (Hassibi & Stork 1993), for a given
    diagonal of the inverse (e.g. :meth:`MFACOperator.inverse_diagonal`).
    """
    w, d = _flat("weights", weights), _flat("inverse_diagonal", inverse_diagonal)
    if d.shape != w.shape:
        raise ValueError(f"the inverse diagonal has {d.numel()} entries, the weights {w.numel()}")
    if not bool(torch.isfinite(d).all()) or not bool((d > 0).all()):
        raise ValueError("the diagonal of an inverse of a positive definite matrix must be finite and positive")
    return w.square() / (2 * d.to(w.dtype))


def select_pruned(saliency: Tensor, count: int, already: Tensor | None = None) -> Tensor:
    """The ``count`` entries of least ``saliency`` as a bool mask ``[d]`` (``True``: pruned).

    The entries of ``already`` (bool ``[d]``, pruned before) are always among them, so masks only
    grow; ties are broken by position (the earlier entry is pruned first), so exactly ``count``
    entries are chosen whatever the ties. ``NaN`` saliencies raise.
    """
    s = _flat("saliency", saliency)
    d = s.numel()
    if not 0 <= count <= d:
        raise ValueError(f"cannot prune {count} of {d} weights")
    if bool(torch.isnan(s).any()):
        raise ValueError("a saliency is NaN")
    s = s.clone()
    if already is not None:
        if already.shape != (d,) or already.dtype != torch.bool:
            raise ValueError(f"already must be a bool tensor of shape [{d}]")
        if int(already.sum()) > count:
            raise ValueError(f"{int(already.sum())} weights are pruned already, more than the {count} asked for")
        s[already.to(s.device)] = -math.inf
    order = torch.argsort(s, stable=True)
    out = torch.zeros(d, dtype=torch.bool, device=s.device)
    out[order[:count]] = True
    return out


def obs_update(op: MFACOperator, weights: Tensor, pruned: Tensor) -> Tensor:
    r"""The OBS compensating update :math:`\delta^\star` (module docstring) for removing the entries
    ``pruned`` (bool ``[d]``) of ``weights`` ``[d]`` under the block-diagonal :math:`\hat F` of ``op``;
    float64 ``[d]``, with :math:`\delta^\star_Q = -w_Q` set exactly (so :math:`w + \delta^\star` is
    exactly zero on :math:`Q`).
    """
    w, q = _flat("weights", weights), pruned.reshape(-1)
    d = op.shape[0]
    if w.numel() != d or q.numel() != d or q.dtype != torch.bool:
        raise ValueError(f"weights and pruned must have the operator's {d} entries (pruned: bool); "
                         f"got {w.numel()} and {q.numel()} ({q.dtype})")
    B, n = op.block_size, op.num_chunks
    pad = n * B - d
    dev = op.gradients.device
    wp = torch.cat([w.detach().double().to(dev), w.new_zeros(pad, dtype=torch.float64, device=dev)]).reshape(n, B)
    qp = torch.cat([q.to(dev), torch.zeros(pad, dtype=torch.bool, device=dev)]).reshape(n, B)
    out = torch.zeros(n, B, dtype=torch.float64, device=dev)
    for lo in range(0, n, _BLOCKS_AT_ONCE):
        hi = min(n, lo + _BLOCKS_AT_ONCE)
        qb = qp[lo:hi].double()  # [k, B]
        if not bool(qb.any()):
            continue  # nothing pruned in these blocks: they do not move
        Finv = op.inverse_blocks(lo, hi)
        S = qb[:, :, None] * Finv * qb[:, None, :] + torch.diag_embed(1 - qb)  # E_Q^T Finv E_Q, identity elsewhere
        z = torch.linalg.solve(S, (qb * wp[lo:hi]).unsqueeze(-1))  # (E_Q^T Finv E_Q)^{-1} w_Q, zero outside Q
        out[lo:hi] = -(Finv @ z).squeeze(-1)
    out = out.reshape(-1)[:d]
    out[q.to(dev)] = -w.detach().double().to(dev)[q.to(dev)]
    return out.to(w.device)
