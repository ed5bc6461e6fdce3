"""Data-parallel second-order training and Hessian analysis on several processes or GPUs.

Run on 2 CPU processes (gloo), or one process per GPU (nccl is picked when CUDA is available):

    torchrun --standalone --nproc-per-node 2 examples/torchrun_train.py
    torchrun --standalone --nproc-per-node 8 examples/torchrun_train.py --epochs 20

Each rank holds one equal shard of MNIST-1D's training set. AdaHessian averages the gradient
and the Hutchinson product z*Hz over the ranks in one bucketed all-reduce per step (every rank
draws the same probe z from the shared seed), so the run equals one process stepping on the
concatenated batch. Afterwards ``HessianOperator(..., distributed=True)`` gives the Hessian of
the loss on *all* ranks' samples: each product is one all-reduce, and ``eigenvalues`` and
``trace`` run unchanged, returning the same numbers on every rank. Rank 0 prints.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import secondorder as so
from secondorder.datasets.mnist1d import Mnist1dCNN, accuracy, load_mnist1d
from secondorder.datasets.synthetic import batches
from secondorder.distributed import init_from_env, shutdown
from secondorder.optim import AdaHessian


def main(epochs: int = 2, batch_per_rank: int = 128) -> dict:
    world = init_from_env(timeout=120)
    device = torch.device("cuda", torch.cuda.current_device()) if world.backend == "nccl" else torch.device("cpu")
    x, y, x_test, y_test = load_mnist1d()
    shard = slice(world.rank * (len(x) // world.size), (world.rank + 1) * (len(x) // world.size))
    x, y = x[shard].to(device), y[shard].to(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the same initial weights on every rank
        model = Mnist1dCNN().to(device)
    opt = AdaHessian(model.parameters(), lr=0.15, seed=0)  # the same seed everywhere: the same probes
    order = torch.Generator().manual_seed(world.rank)
    for epoch in range(epochs):
        perm = torch.randperm(len(x), generator=order).to(device)
        for xb, yb in batches(x[perm], y[perm], batch_per_rank):
            loss = opt.step(lambda: F.cross_entropy(model(xb), yb))  # no backward(): the optimizer differentiates
        if world.rank == 0:
            print(f"epoch {epoch + 1}: loss {float(loss):.4f}, test accuracy "
                  f"{accuracy(model, x_test.to(device), y_test.to(device)):.3f}")
    model.eval()
    H = so.HessianOperator(model, F.cross_entropy, batches(x, y, 500), distributed=True)
    top = so.eigenvalues(H, k=3, seed=0)
    tr = so.trace(H, 30, seed=0)
    if world.rank == 0:
        print(f"Hessian on all {H.num_samples} training samples ({world.size} processes): top eigenvalues "
              f"{[round(v, 3) for v in top.eigenvalues.tolist()]}, trace {tr.value:.1f} +- {tr.stderr:.1f}")
    return {"eigenvalues": top.eigenvalues.cpu(), "trace": tr.value, "samples": H.num_samples,
            "parameters": torch.cat([p.detach().reshape(-1).cpu() for p in model.parameters()])}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-per-rank", type=int, default=128)
    a = ap.parse_args()
    main(a.epochs, a.batch_per_rank)
    shutdown()
