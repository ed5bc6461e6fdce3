#!/usr/bin/env python
"""Per-layer top eigenvalues: the old per-block loop against the lockstep ``block_eigenvalues``.

Before (issue 13), ``block_eigenvalues`` ran one Lanczos per block through a padded submatrix
(``eigenvalues(A.block(name))``), one data pass per block per step; now every block's Lanczos
shares one ``[P, L]`` product per step. On a HessianOperator of a small CNN (MNIST-1D) and an MLP
(Gaussian mixture), over a few batches, this prints for both: data passes (calls of the
operator's product), matvecs (columns), wall time (minimum over ``--repeats``) and the largest
eigenvalue difference between the two, relative to the block's top eigenvalue.

    PYTHONPATH=src python benchmarks/bench_block_eigenvalues.py [--repeats 3] [--k 1 3]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from machine import Contention, prepare
from torch import nn

NUM_THREADS = prepare()
import secondorder  # noqa: E402  (after prepare() put src/ on the path if needed)
from secondorder.datasets.mnist1d import Mnist1dCNN, load_mnist1d  # noqa: E402
from secondorder.datasets.synthetic import batches, gaussian_mixture  # noqa: E402
from secondorder.environment import describe as machine  # noqa: E402


def per_block_loop(A, k: int, seed: int, **kwargs) -> dict[str, secondorder.EigenResult]:
    """What ``block_eigenvalues`` did before: one solve per block, one block after another."""
    out = {}
    for b in A.blocks:
        op = A.block(b.name)
        if b.size <= max(2 * k + 10, 20):
            M = op.to_dense().double()
            theta = torch.linalg.eigvalsh((M + M.T) / 2).flip(0)[:k]
            out[b.name] = theta
        else:
            out[b.name] = secondorder.eigenvalues(op, k, seed=seed, **kwargs).eigenvalues.double()
    return out


def lockstep(A, k: int, seed: int, **kwargs) -> dict[str, torch.Tensor]:
    return {n: r.eigenvalues.double() for n, r in secondorder.block_eigenvalues(A, k, seed=seed, **kwargs).items()}


def problems() -> dict[str, secondorder.HessianOperator]:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        cnn, mlp = Mnist1dCNN(), nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(),
                                                nn.Linear(64, 4))
    x, y, _, _ = load_mnist1d()
    X, Y = gaussian_mixture(1024, 16, 4, seed=0)
    return {
        "MNIST-1D CNN, 4 batches of 256": secondorder.HessianOperator(cnn, F.cross_entropy, batches(x[:1024], y[:1024], 256)),
        "MLP 16-64-64-4, 4 batches of 256": secondorder.HessianOperator(mlp, F.cross_entropy, batches(X, Y, 256)),
    }


def measure(fn, A, k: int, repeats: int, **kwargs):
    """(eigenvalues, data passes, matvecs, best wall seconds) of ``fn(A, k)``."""
    calls = {"n": 0}
    product = A._matmat

    def counted(V):
        calls["n"] += 1
        return product(V)

    A._matmat = counted
    best = float("inf")
    try:
        for _ in range(repeats):
            calls["n"], start_mv = 0, A.num_matvecs
            t0 = time.perf_counter()
            values = fn(A, k, 0, **kwargs)
            best = min(best, time.perf_counter() - t0)
    finally:
        del A._matmat
    return values, calls["n"], A.num_matvecs - start_mv, best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--k", type=int, nargs="+", default=[1, 3])
    args = parser.parse_args()
    print(f"# {machine()}; {NUM_THREADS} threads; secondorder from {secondorder.__file__}\n")
    print("| problem | blocks (sizes) | k | method | data passes | matvecs | wall s | max rel. diff |")
    print("|---|---|---|---|---:|---:|---:|---:|")
    contention = Contention()
    for name, A in problems().items():
        sizes = ", ".join(str(b.size) for b in A.blocks)
        for k in args.k:
            variants = [("per-block loop" + (", block_size=1" if k > 1 else ""), per_block_loop, {"block_size": 1}),
                        ("lockstep" + (", block_size=1" if k > 1 else ""), lockstep, {"block_size": 1})]
            if k > 1:
                variants.append((f"lockstep, default block_size={k}", lockstep, {}))
            reference = None
            for label, fn, kwargs in variants:
                values, passes, matvecs, wall = measure(fn, A, k, args.repeats, **kwargs)
                reference = reference or values
                diff = max(float(((values[n] - reference[n]).abs() / reference[n].abs().max()).max()) for n in values)
                print(f"| {name} | {sizes} | {k} | {label} | {passes} | {matvecs} | {wall:.2f} | {diff:.1e} |")
    other, wall, share = contention.share()
    print(f"\nother processes took {share:.0%} of the machine during the {wall:.0f} s run ({other:.0f} CPU s)")


if __name__ == "__main__":
    main()
