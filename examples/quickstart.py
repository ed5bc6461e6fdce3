"""Quickstart: the curvature of a small trained classifier, as in the README.

Run: ``.venv/bin/python examples/quickstart.py`` (after ``./run main`` or ``./run tests`` made ``.venv``).
"""

from __future__ import annotations

import torch

import secondorder as so
from secondorder.datasets import default_problem


def main() -> dict:
    problem = default_problem(seed=0)  # a small tanh MLP trained on a synthetic Gaussian mixture
    model, loss_fn, loader = problem.model, problem.loss_fn, problem.data

    H = so.HessianOperator(model, loss_fn, loader)  # Hessian of the whole-data-set mean loss
    print(f"P = {H.shape[0]} parameters in blocks {[b.name for b in H.blocks]}")

    tr = so.trace(H, 90, seed=0)  # Hutch++
    low, high = tr.confidence_interval(0.95)
    print(f"trace {tr.value:.4f} +- {tr.stderr:.4f} (95% CI [{low:.4f}, {high:.4f}])")
    for b in tr.blocks:
        print(f"  layer {b.name}: {b.value:.4f} +- {b.stderr:.4f} ({b.per_parameter:.2e} per parameter)")

    eig = so.eigenvalues(H, k=5, seed=0)
    print(f"top-5 eigenvalues {eig.eigenvalues.tolist()} in {eig.num_matvecs} matvecs, "
          f"max residual {eig.residuals.max():.1e}")
    smallest = so.eigenvalues(H, k=1, which="smallest", seed=0, max_matvecs=300)
    print(f"smallest eigenvalue {smallest.eigenvalues[0]:.3e} (converged: {bool(smallest.converged[0])})")

    layers = so.block_eigenvalues(H, k=1, seed=0)
    print("top eigenvalue per layer:", {name: round(float(r.eigenvalues[0]), 5) for name, r in layers.items()})

    d = so.diagonal(H, 60, method="xdiag", seed=0)
    print(f"diagonal: mean {d.value.mean():.3e}, median stderr {d.stderr.median():.1e}")

    sd = so.spectral_density(H, num_probes=4, num_steps=60, seed=0)
    print(f"SLQ trace estimate {sd.trace()[0]:.4f} +- {sd.trace()[1]:.4f}")

    G = so.GGNOperator(model, loss_fn, loader)  # Gauss-Newton: positive semi-definite
    g = torch.cat([p.reshape(-1) for p in torch.autograd.grad(
        sum(loss_fn(model(x), y) * len(y) for x, y in loader) / sum(len(y) for _, y in loader),
        list(model.parameters()))]).detach()
    step = so.solve(G, -g, damping=1e-3, tol=1e-6)  # a damped Gauss-Newton (Newton-CG) step
    print(f"Newton-CG step: {step.iterations} CG iterations, relative residual {step.residuals.item():.1e}")
    return {"trace": tr, "eigenvalues": eig, "layers": layers, "step": step}


if __name__ == "__main__":
    main()
