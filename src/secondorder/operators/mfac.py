r"""M-FAC: the damped empirical Fisher of a window of gradients, with matrix-free inverse products
(Frantar, Kurtic & Alistarh, "M-FAC: Efficient Matrix-Free Approximations of Second-Order
Information", NeurIPS 2021).

For a window of :math:`m` gradients, the rows of :math:`G \in \mathbb R^{m\times d}`,

.. math:: \hat F = \lambda I + \tfrac1m G^\top G,\qquad
          \hat F^{-1}x = \lambda^{-1}\big(x - G^\top K^{-1} G x\big),\qquad
          [\hat F^{-1}]_{qq} = \lambda^{-1}\big(1 - G_{:,q}^\top K^{-1} G_{:,q}\big),\qquad
          K = GG^\top + m\lambda I_m

(Woodbury; the paper's rank-one recursion in closed form). :math:`K` (:math:`m\times m`, float64;
its entries from the products' dtype, or accumulated in float64 where float32 rounding would make it
indefinite) is kept with its Cholesky factor :math:`K = LL^\top`: an inverse product costs two products with
:math:`G` and one :math:`m\times m` solve, :math:`O(dm + m^2)`; the whole inverse diagonal
:math:`O(dm^2)`. The window is a ring buffer: :meth:`MFACOperator.add` replaces the oldest row, updates
one row and column of :math:`GG^\top` (:math:`O(dm)`) and refactors (:math:`O(m^3)`). Rows not
yet filled are zero (the :math:`1/m` stays), as in the authors' code.

With ``block_size`` :math:`B` the coordinates are cut into consecutive chunks of :math:`B` (the
last one shorter) and :math:`\hat F` is block diagonal, each chunk with its own
:math:`\lambda I + \frac1m G_b^\top G_b` (the paper's pruning uses :math:`B = 128`); all chunks
are handled at once as a batch of :math:`m\times m` systems. The window may be stored in float16 or
bfloat16 (``storage_dtype``; half the memory of :math:`md` floats), products upcast it.

Accuracy: for a vector inside :math:`\mathrm{span}(G)` (a window gradient, what the optimizer
multiplies) the two terms of the closed form cancel, and the relative error of an inverse product
is about :math:`\varepsilon\,\kappa`, :math:`\kappa = \lambda_{\max}(GG^\top)/(m\lambda)`, with
:math:`\varepsilon` the products' precision (``experiments/mfac_exactness.py``: float32 is useless
at :math:`\kappa \approx 10^8`, float64 keeps 1e-9). Where :math:`\kappa` is large use
``dtype=torch.float64`` (the window may stay float32 or float16) or a larger damping.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from secondorder import validation
from secondorder.operators.base import Block, LinearOperator, _check_blocks, _single_block
from secondorder.operators.params import make_blocks, select_parameters
from secondorder.operators.risk import EmpiricalRisk

__all__ = ["MFACInverse", "MFACOperator"]

SLAB = 1 << 16
INDEFINITE = "GG^T + m*lambda*I is not positive definite in float64: raise the damping"
"""Coordinates per float64 slab of the window when its Gram matrix is accumulated."""


class MFACOperator(LinearOperator):
    r""":math:`\lambda I + \frac1m G^\top G` over a ring buffer of ``window`` gradients of dimension ``dim``
    (module docstring); starts empty (:math:`\lambda I`), :meth:`add` inserts.

    Args:
        window: :math:`m`, the number of gradients kept.
        dim: :math:`d`, the gradients' length.
        damping: :math:`\lambda > 0`.
        block_size: chunks of this many coordinates, each its own block of :math:`\hat F` (``None``: one).
        dtype: the dtype of products (float32 or float64); :math:`K` is float64 in any case.
        storage_dtype: the window's dtype (default ``dtype``; float16/bfloat16 halve its memory).
        device: where the window lives.
        blocks: named blocks for per-layer quantities (default one block ``"all"``).

    """

    def __init__(self, window: int, dim: int, damping: float, *, block_size: int | None = None,
                 dtype: torch.dtype = torch.float32, storage_dtype: torch.dtype | None = None,
                 device: torch.device | str = "cpu", blocks: Sequence[Block] | None = None) -> None:
        self.window = validation.positive_int(window, "window (the number of gradients m)")
        dim = validation.positive_int(dim, "dim")
        self.damping = validation.positive_finite(damping, "damping (lambda)")
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        storage = dtype if storage_dtype is None else storage_dtype
        if storage not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            raise ValueError(f"storage_dtype must be a floating dtype, got {storage_dtype}")
        self.block_size = dim if block_size is None else validation.positive_int(block_size, "block_size")
        self.block_size = min(self.block_size, dim)
        self.num_chunks = math.ceil(dim / self.block_size)
        self.shape, self.dtype, self.device = (dim, dim), dtype, torch.device(device)
        self.blocks = _check_blocks(blocks, dim) if blocks is not None else _single_block(dim)
        self.num_matvecs = 0
        padded = self.num_chunks * self.block_size  # zero padding: a full last chunk, no effect
        self.gradients = torch.zeros(self.window, padded, dtype=storage, device=self.device)
        self.gram = torch.zeros(self.num_chunks, self.window, self.window, dtype=torch.float64, device=self.device)
        self.num_added = 0
        self._factor()

    # ---- construction from gradients or a model ---------------------------------------------
    @classmethod
    def from_gradients(cls, gradients: Tensor, damping: float, **kwargs: Any) -> "MFACOperator":
        r"""The static operator of the rows of ``gradients`` ``[m, d]`` (``kwargs`` as the constructor)."""
        if not isinstance(gradients, Tensor) or gradients.ndim != 2 or not gradients.is_floating_point():
            shape = list(gradients.shape) if isinstance(gradients, Tensor) else type(gradients).__name__
            raise ValueError(f"gradients must be a floating [m, d] tensor (one gradient per row), got {shape}")
        kwargs.setdefault("dtype", gradients.dtype if gradients.dtype == torch.float64 else torch.float32)
        kwargs.setdefault("device", gradients.device)
        op = cls(gradients.shape[0], gradients.shape[1], damping, **kwargs)
        op._check_rows(gradients)
        op.gradients[:, : gradients.shape[1]] = gradients.to(op.gradients.dtype)
        op.num_added = gradients.shape[0]
        op._rebuild()
        return op

    @classmethod
    def from_model(cls, model: torch.nn.Module, loss_fn: Callable, data: Any, damping: float, params=None, *,
                   rows: str = "batch", **kwargs: Any) -> "MFACOperator":
        r"""The static operator of a model's gradients over ``data`` (one batch or a re-iterable):
        ``rows="batch"``, one row per batch (the gradient of its mean loss, the paper's pruning
        driver), or ``rows="sample"``, one row per sample (then :math:`\frac1m G^\top G` is the
        empirical Fisher of the mean loss). Named blocks per layer.
        """
        G, blocks = model_gradients(model, loss_fn, data, params, rows)
        return cls.from_gradients(G, damping, blocks=blocks, **kwargs)

    # ---- the ring buffer --------------------------------------------------------------------
    def add(self, gradient: Tensor) -> None:
        """Insert ``gradient`` ``[d]`` in place of the oldest row; checked (shape, finite) and the new
        :math:`K` factored before anything changes (a failed insertion leaves the window as it was).
        """
        self._check_rows(gradient.reshape(1, -1) if isinstance(gradient, Tensor) and gradient.ndim == 1 else gradient)
        slot = self.num_added % self.window
        row = self.gradients.new_zeros(self.gradients.shape[1])
        row[: self.shape[0]] = gradient.reshape(-1).to(self.gradients.dtype)  # as stored (rounded)
        gram, cholesky = self._inserted(row, slot, exact=False)  # O(dm): one row (and column) of GG^T
        if cholesky is None:  # the products' rounding made K indefinite: the row in float64
            gram, cholesky = self._inserted(row, slot, exact=True)
        if cholesky is None:
            raise FloatingPointError(INDEFINITE)
        self.gradients[slot] = row
        self.gram, self.cholesky = gram, cholesky
        self.num_added += 1

    # ---- checkpoints --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The window as copies: ``gradients`` ``[m, padded d]`` (storage dtype), ``gram``
        ``[chunks, m, m]`` (float64) and ``num_added``, with the settings they fit
        (:meth:`load_state_dict` refactors :math:`K` from ``gram``, bit for bit).
        """
        return {"window": self.window, "dim": self.shape[0], "block_size": self.block_size,
                "damping": self.damping, "gradients": self.gradients.clone(), "gram": self.gram.clone(),
                "num_added": self.num_added}

    def load_state_dict(self, state: Any) -> None:
        """Load a :meth:`state_dict` after checking that it fits this window (``ValueError`` before anything changes)."""
        self.restore(self.checked_state(state))

    def checked_state(self, state: Any) -> tuple[Tensor, Tensor, Tensor, int]:
        """A :meth:`state_dict` checked against this window's settings and shapes and made ready to
        :meth:`restore` (copies on this device, :math:`K` refactored), or ``ValueError``; nothing changes.
        """
        if not isinstance(state, dict):
            raise ValueError(f"an M-FAC window state is a dict of MFACOperator.state_dict(), got {type(state).__name__}")
        mine = {"window": self.window, "dim": self.shape[0], "block_size": self.block_size, "damping": self.damping}
        theirs = {k: state.get(k) for k in mine}
        if theirs != mine:
            raise ValueError(f"the saved M-FAC window has {theirs}, this one {mine}: saved with other settings")
        for name, want in (("gradients", self.gradients), ("gram", self.gram)):
            got = state.get(name)
            if not isinstance(got, Tensor) or got.shape != want.shape or got.dtype != want.dtype:
                shape = f"{got.dtype} {list(got.shape)}" if isinstance(got, Tensor) else type(got).__name__
                raise ValueError(f"the saved M-FAC window's {name} is {shape}, this window needs "
                                 f"{want.dtype} {list(want.shape)}")
            if not bool(torch.isfinite(got).all()):
                raise ValueError(f"the saved M-FAC window's {name} is not finite")
        num_added = validation.non_negative_int(state.get("num_added"), "the saved M-FAC window's num_added")
        gram = state["gram"].to(self.device, copy=True)
        return state["gradients"].to(self.device, copy=True), gram, self._cholesky(gram), num_added

    def restore(self, checked: tuple[Tensor, Tensor, Tensor, int]) -> None:
        """Take a state of :meth:`checked_state`."""
        self.gradients, self.gram, self.cholesky, self.num_added = checked

    def _check_rows(self, rows: Any) -> None:
        d = self.shape[0]
        if not isinstance(rows, Tensor) or rows.ndim != 2 or rows.shape[1] != d:
            shape = list(rows.shape) if isinstance(rows, Tensor) else type(rows).__name__
            raise ValueError(f"a gradient of this M-FAC window has {d} entries; got shape {shape}")
        if not bool(torch.isfinite(rows).all()):
            raise ValueError("a gradient for the M-FAC window is not finite; the window was not changed")

    def _chunked(self, X: Tensor) -> Tensor:
        """Rows ``[r, padded]`` as ``[num_chunks, r, B]``."""
        return X.reshape(X.shape[0], self.num_chunks, self.block_size).transpose(0, 1)

    def _inserted(self, row: Tensor, slot: int, exact: bool) -> tuple[Tensor, Tensor | None]:
        """The Gram matrix with ``row`` in ``slot`` and its Cholesky factor (``None``: not positive
        definite); ``exact``: all of it accumulated in float64 (the fallback), else one new row.
        """
        new = self._gram(row, exact)
        new[:, slot] = row.double().reshape(self.num_chunks, self.block_size).square().sum(1)
        gram = self._gram(None, exact=True) if exact else self.gram.clone()
        gram[:, slot, :] = new
        gram[:, :, slot] = new
        return gram, self._try_cholesky(gram)

    def _rebuild(self) -> None:
        self.gram = self._gram(None, exact=False)
        if self._try_cholesky(self.gram) is None:
            self.gram = self._gram(None, exact=True)
        self._factor()

    def _gram(self, row: Tensor | None, exact: bool) -> Tensor:
        """Per chunk ``GG^T`` ``[n, m, m]`` (``row=None``) or ``G row`` ``[n, m]``, in float64: in the
        products' dtype, or (``exact``) accumulated in float64 over slabs of whole chunks (about
        ``SLAB`` coordinates each, so the float64 copy stays small; ~10x slower for a float32 window).
        In float32 a Gram entry's rounding, about eps ||g||^2, can exceed m lambda and make K
        indefinite (large gradients, tiny damping); only then is the exact one computed.
        """
        if not exact or self.dtype == torch.float64 == self.gradients.dtype:
            G = self._window()
            return ((G @ G.transpose(1, 2)) if row is None else (G @ row.to(self.dtype).reshape(
                self.num_chunks, self.block_size, 1)).squeeze(2)).double()
        m, B = self.window, self.block_size
        step = max(1, SLAB // B) * B
        out = []
        for c0 in range(0, self.gradients.shape[1], step):
            G = self.gradients[:, c0:c0 + step].double().reshape(m, -1, B).transpose(0, 1)  # [n', m, B]
            if row is None:
                out.append(G @ G.transpose(1, 2))
            else:
                out.append((G @ row[c0:c0 + step].double().reshape(-1, B, 1)).squeeze(2))
        return torch.cat(out)

    def _factor(self) -> None:
        self.cholesky = self._cholesky(self.gram)

    def _cholesky(self, gram: Tensor) -> Tensor:
        r"""The Cholesky factors of :math:`K = GG^\top + m\lambda I` for ``gram`` :math:`GG^\top` (nothing stored)."""
        L = self._try_cholesky(gram)
        if L is None:
            raise FloatingPointError(INDEFINITE)
        return L

    def _try_cholesky(self, gram: Tensor) -> Tensor | None:
        m = self.window
        K = gram + m * self.damping * torch.eye(m, dtype=torch.float64, device=self.device)
        L, info = torch.linalg.cholesky_ex(K)
        return None if bool((info != 0).any()) else L

    # ---- products -------------------------------------------------------------------------
    def _padded(self, V: Tensor) -> Tensor:
        """``V`` ``[d, K]`` as ``[num_chunks, B, K]`` (zero rows past ``d``)."""
        pad = self.num_chunks * self.block_size - self.shape[0]
        if pad:
            V = torch.cat([V, V.new_zeros(pad, V.shape[1])])
        return V.reshape(self.num_chunks, self.block_size, V.shape[1])

    def _window(self) -> Tensor:
        return self._chunked(self.gradients.to(self.dtype))  # [n, m, B]

    def _unpadded(self, X: Tensor) -> Tensor:
        return X.reshape(-1, X.shape[-1])[: self.shape[0]]

    def _matmat(self, V: Tensor) -> Tensor:
        G = self._window()
        X = self._padded(V)
        return self._unpadded(self.damping * X + G.transpose(1, 2) @ (G @ X) / self.window)

    def inverse_product(self, V: Tensor) -> Tensor:
        r""":math:`\hat F^{-1} V` for ``V`` ``[d]`` or ``[d, K]`` (module docstring)."""
        V2 = self._as_block(V).to(self.dtype)
        G = self._window()
        X = self._padded(V2)
        C = torch.cholesky_solve((G @ X).double(), self.cholesky).to(self.dtype)
        out = self._unpadded((X - G.transpose(1, 2) @ C) / self.damping)
        return out if V.ndim == 2 else out.squeeze(1)

    def inverse(self) -> "MFACInverse":
        r""":math:`\hat F^{-1}` as an operator: a live view (it follows later :meth:`add` calls)."""
        return MFACInverse(self)

    def _whitened(self, start: int = 0, stop: int | None = None) -> Tensor:
        r""":math:`W_b = L_b^{-1} G_b` of chunks ``start:stop``, ``[n, m, B]`` float64, so that
        :math:`\hat F_b^{-1} = \lambda^{-1}(I - W_b^\top W_b)`.
        """
        G = self._chunked(self.gradients)[start:stop].double()
        return torch.linalg.solve_triangular(self.cholesky[start:stop], G, upper=False)

    def inverse_diagonal(self) -> Tensor:
        r"""The diagonal of :math:`\hat F^{-1}`, ``[d]``: :math:`\lambda^{-1}(1 - \|L^{-1}G_{:,q}\|^2)`."""
        inside = self._whitened().square().sum(1)  # [n, B]
        return ((1 - inside) / self.damping).reshape(-1)[: self.shape[0]].to(self.dtype)

    def inverse_blocks(self, start: int = 0, stop: int | None = None) -> Tensor:
        r"""The diagonal blocks :math:`\hat F_b^{-1} = \lambda^{-1}(I - W_b^\top W_b)` of chunks
        ``start:stop``, ``[n, B, B]`` float64 (the last chunk's padding rows and columns are
        :math:`\lambda^{-1}I`, inert).
        """
        W = self._whitened(start, stop)
        eye = torch.eye(self.block_size, dtype=torch.float64, device=W.device)
        return (eye - W.transpose(1, 2) @ W) / self.damping

    def __repr__(self) -> str:
        return (f"MFACOperator(dim={self.shape[0]}, window={self.window}, filled={min(self.num_added, self.window)}, "
                f"damping={self.damping:g}, block_size={self.block_size}, storage={self.gradients.dtype})")


def model_gradients(model: torch.nn.Module, loss_fn: Callable, data: Any, params=None,
                    rows: str = "batch") -> tuple[Tensor, tuple[Block, ...]]:
    """The gradients ``[m, P]`` of each batch's mean loss (``rows="batch"``) or of each sample's loss
    (``"sample"``: one backward per sample, the batches' inputs and targets split along dim 0),
    and the parameters' blocks per layer; the model's mode, buffers and RNG are left as they were.
    """
    validation.one_of(rows, "rows", ("batch", "sample"))
    named = select_parameters(model, params)
    tensors = [p for _, p in named]
    risk = EmpiricalRisk(model, loss_fn, data)
    found: list[Tensor] = []

    def gradient(loss: Tensor) -> Tensor:
        parts = torch.autograd.grad(loss, tensors, allow_unused=True)
        return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(parts, tensors)])

    def visit(index: int, batch: Any, n: int) -> None:
        if rows == "batch":
            found.append(gradient(risk.loss(risk.outputs(batch, index), batch, index)))
            return
        risk.check_pair(batch, index)
        for j in range(n):
            one = (batch[0][j:j + 1], batch[1][j:j + 1])
            found.append(gradient(risk.loss(risk.outputs(one, index), one, index)))

    with torch.enable_grad():
        risk.for_each_batch(tensors[0].device, visit)
    return torch.stack(found), make_blocks(named, "module")


class MFACInverse(LinearOperator):
    r""":math:`\hat F^{-1}` of an :class:`MFACOperator`, through :meth:`MFACOperator.inverse_product`."""

    def __init__(self, forward: MFACOperator) -> None:
        self.forward = forward
        self.shape, self.dtype, self.device, self.blocks = forward.shape, forward.dtype, forward.device, forward.blocks
        self.num_matvecs = 0

    def _matmat(self, V: Tensor) -> Tensor:
        return self.forward.inverse_product(V)

    def diagonal(self) -> Tensor:
        """The exact diagonal (:meth:`MFACOperator.inverse_diagonal`)."""
        return self.forward.inverse_diagonal()
