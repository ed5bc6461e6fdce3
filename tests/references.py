"""Dense float64 references for curvature operators: exact Hessians and Gauss-Newton matrices.

Built with ``torch.autograd.functional.hessian`` / ``jacobian`` on a flat parameter vector
(``torch.func.hessian`` is wrong through an affine LayerNorm in torch 2.13), and checked for
symmetry. For several batches the reference is the size-weighted mean of per-batch matrices.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call


def _unflatten(theta: Tensor, named: list[tuple[str, Tensor]]) -> dict[str, Tensor]:
    out, i = {}, 0
    for name, p in named:
        out[name] = theta[i : i + p.numel()].view_as(p)
        i += p.numel()
    return out


def _per_batch(model: nn.Module, batches, names, matrix_fn) -> Tensor:
    named = [(n, p) for n, p in model.named_parameters() if n in names]
    fixed = {n: p.detach() for n, p in model.named_parameters() if n not in names}
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    theta0 = torch.cat([p.detach().reshape(-1) for _, p in named])
    total, count = 0, 0
    for batch in batches:
        # fresh buffer copies per batch, so train-mode BatchNorm leaves the model untouched
        state = lambda theta: {**fixed, **{k: v.clone() for k, v in buffers.items()}, **_unflatten(theta, named)}  # noqa: E731
        M = matrix_fn(state, theta0, batch)
        n = batch[0].shape[0]
        total, count = total + n * M, count + n
    return total / count


def dense_hessian(model: nn.Module, loss_fn, batches, names) -> Tensor:
    """The Hessian of the size-weighted mean loss over ``batches`` w.r.t. the parameters ``names``."""

    def matrix(state, theta0, batch):
        X, y = batch
        H = torch.autograd.functional.hessian(lambda t: loss_fn(functional_call(model, state(t), (X,)), y), theta0)
        assert (H - H.T).abs().max() <= 1e-10 * H.abs().max().clamp_min(1e-300), "reference Hessian not symmetric"
        return H

    return _per_batch(model, batches, names, matrix)


def dense_ggn(model: nn.Module, loss_fn, batches, names) -> Tensor:
    """``J^T H_out J`` per batch, size-weighted."""

    def matrix(state, theta0, batch):
        X, y = batch
        f = lambda t: functional_call(model, state(t), (X,))  # noqa: E731
        out = f(theta0).detach()
        J = torch.autograd.functional.jacobian(f, theta0).reshape(out.numel(), -1)
        H_out = torch.autograd.functional.hessian(lambda o: loss_fn(o.view_as(out), y), out.reshape(-1))
        return J.T @ H_out @ J

    return _per_batch(model, batches, names, matrix)


def closure_hessian(model: nn.Module, closure, batches, names, sizes) -> Tensor:
    """Hessian for a ``closure(model, batch)`` loss, via a functional re-binding of the parameters."""
    named = [(n, p) for n, p in model.named_parameters() if n in names]
    theta0 = torch.cat([p.detach().reshape(-1) for _, p in named])
    total = 0
    for batch, n in zip(batches, sizes):
        def f(theta, batch=batch):
            params = _unflatten(theta, named)

            class Bound(nn.Module):
                def forward(self, *args, **kwargs):
                    return functional_call(model, params, args, kwargs)

            return closure(Bound(), batch)

        total = total + n * torch.autograd.functional.hessian(f, theta0)
    return total / sum(sizes)


def tiny_mlp_problem(seed: int = 0, num_samples: int = 32, split: int = 20):
    """``Linear(4, 6) - Tanh - Linear(6, 3)`` in float64 and two (ragged) batches of 3-class data.

    Model weights from ``seed`` in a forked RNG, data from a private generator: the global RNG
    is untouched.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    X = torch.randn(num_samples, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (num_samples,), generator=gen)
    return model, [(X[:split], y[:split]), (X[split:], y[split:])]
