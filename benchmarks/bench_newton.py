#!/usr/bin/env python
"""Newton-type optimizers (TrustRegion, CubicRegularization, NewtonMR): time per outer iteration
against the autograd work it is made of.

On the MNIST-1D CNN (``secondorder.datasets.Mnist1dCNN``, 3018 parameters, float32, 4000 training
sequences, ``torch.manual_seed(0)`` weights), ``hessian_fraction=0.05`` (|S| = 200), library
defaults otherwise (TrustRegion Δ0 = 1, ARC σ0 = 1). One outer iteration does a full-batch
gradient, builds the gradient graph of the sample, takes ``hessian_products`` Hessian-vector
products on it (CG-Steihaug / Lanczos / MINRES iterations, plus one for TR's random start) and
evaluates the full loss at ``function_evaluations`` trial points. Its **ideal** is that work
without the optimizer, on the same model and closure, in two readings:

* **bare replay** (the target's denominator): for every iteration, the same autograd calls done
  bare in the same order (full gradient, the sample's ``create_graph`` gradient, that iteration's
  number of back-to-back HVPs, its number of no-grad full forwards), timed like the iteration
  itself (minimum over the same ``--rounds``, taking turns with the optimizer's rounds);
* **sum of components** (the brief's literal formula, reported): ``t(full gradient) + t(sample
  graph) + products * t(HVP) + function evaluations * t(full forward)``, each component the
  minimum over ``--reps`` isolated calls (the HVP over blocks of 10 back-to-back products, / 10).
  A minimum over 20 warm, repeated calls is lower than what the same call costs inside a
  sequence of different calls, so this ideal is optimistic.

Each optimizer runs ``--steps`` iterations from the same start, ``--rounds`` times (the trajectory
is deterministic: same seed, same products); each iteration's time is its minimum over the
rounds; a ratio is the sum of those over the sum of the ideals (target <= 1.3 for TrustRegion,
against the bare replay). Also printed: propagations per iteration (2n per gradient, n per trial
loss, 2|S| per sample graph and product).

    python benchmarks/bench_newton.py                  # about 3 minutes on 2 cores
    python benchmarks/bench_newton.py --quick          # smoke run
    python benchmarks/bench_newton.py --json out.json
    BENCH_THREADS=1 python benchmarks/bench_newton.py  # 1 thread (a shared machine)
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from machine import Contention, prepare

NUM_THREADS = prepare()
from secondorder.datasets.mnist1d import Mnist1dCNN, load_mnist1d  # noqa: E402
from secondorder.environment import describe as machine  # noqa: E402
from secondorder.optim import CubicRegularization, NewtonMR, TrustRegion  # noqa: E402

FRACTION = 0.05
TARGET = 1.3  # TrustRegion: measured / ideal
HVP_BLOCK = 10  # the HVP is timed as a block of this many back-to-back products
OPTIMIZERS = {
    "TrustRegion": lambda p: TrustRegion(p, hessian_fraction=FRACTION, seed=0),
    "CubicRegularization": lambda p: CubicRegularization(p, hessian_fraction=FRACTION, seed=0),
    "NewtonMR": lambda p: NewtonMR(p, hessian_fraction=FRACTION, seed=0),
}


def make_closure(model, X, y):
    def closure(indices=None):
        if indices is None:
            return F.cross_entropy(model(X), y, reduction="none")
        return F.cross_entropy(model(X[indices]), y[indices], reduction="none")

    return closure


def best_of(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        gc.collect()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def components(model, X, y, reps: int) -> dict[str, float]:
    """Seconds of each piece of work an outer iteration is made of, timed alone."""
    params = [p for p in model.parameters() if p.requires_grad]
    closure = make_closure(model, X, y)
    n = len(X)
    size = max(1, math.ceil(FRACTION * n))  # as the optimizers draw it
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(1))[:size].sort().values

    def gradient():
        torch.autograd.grad(closure().sum(), params)

    def graph():
        return torch.autograd.grad(closure(idx).sum() / size, params, create_graph=True)

    grads = graph()
    v = [torch.randn(p.shape, generator=torch.Generator().manual_seed(2)) for p in params]

    def hvps():  # back to back, as a Krylov solver calls them
        for _ in range(HVP_BLOCK):
            torch.autograd.grad(grads, params, v, retain_graph=True)

    def forward():
        with torch.no_grad():
            float(closure().sum())

    return dict(gradient=best_of(gradient, reps), graph=best_of(graph, reps), hvp=best_of(hvps, reps) / HVP_BLOCK,
                forward=best_of(forward, reps), sample=size)


def replay(model, X, y, products: int, evaluations: int, generator: torch.Generator) -> float:
    """Seconds of one iteration's autograd work done bare, in the optimizer's order: the full gradient,
    the sample's graph, ``products`` back-to-back HVPs on it, ``evaluations`` full forwards."""
    params = [p for p in model.parameters() if p.requires_grad]
    closure = make_closure(model, X, y)
    n = len(X)
    size = max(1, math.ceil(FRACTION * n))
    v = [torch.randn(p.shape, generator=generator) for p in params]
    gc.collect()
    t0 = time.perf_counter()
    torch.autograd.grad(closure().sum(), params)
    idx = torch.randperm(n, generator=generator)[:size].sort().values
    grads = torch.autograd.grad(closure(idx).sum() / size, params, create_graph=True)
    for _ in range(products):
        torch.autograd.grad(grads, params, v, retain_graph=True)
    for _ in range(evaluations):
        with torch.no_grad():
            float(closure().sum())
    return time.perf_counter() - t0


def trajectory(name: str, base, X, y, steps: int) -> list[tuple[float, object]]:
    """(seconds, last_step) of each of ``steps`` iterations from ``base``'s weights."""
    model = copy.deepcopy(base)
    opt = OPTIMIZERS[name](model.parameters())
    closure = make_closure(model, X, y)
    out = []
    for _ in range(steps):
        gc.collect()
        t0 = time.perf_counter()
        opt.step(closure)
        out.append((time.perf_counter() - t0, opt.last_step))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps, rounds and repetitions")
    parser.add_argument("--steps", type=int, default=None, help="outer iterations per optimizer (default 15)")
    parser.add_argument("--rounds", type=int, default=None, help="repetitions of each trajectory (default 5)")
    parser.add_argument("--reps", type=int, default=None, help="repetitions of each component (default 20)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args()
    steps = args.steps or (5 if args.quick else 15)
    rounds = args.rounds or (1 if args.quick else 5)
    reps = args.reps or (5 if args.quick else 20)

    xtr, ytr, _, _ = load_mnist1d()
    torch.manual_seed(0)
    base = Mnist1dCNN()
    n = len(xtr)
    print(f"machine: {machine()}", flush=True)
    contention = Contention()
    comp = components(copy.deepcopy(base), xtr, ytr, reps)
    results = {}
    for name in OPTIMIZERS:
        runs, floors = [], []
        bare, generator = copy.deepcopy(base), torch.Generator().manual_seed(3)
        for _ in range(rounds):  # the trajectory, then its bare replay, in turns
            runs.append(trajectory(name, base, xtr, ytr, steps))
            floors.append([replay(bare, xtr, ytr, s.hessian_products, s.function_evaluations, generator)
                           for _, s in runs[-1]])
        records = [s for _, s in runs[0]]
        same = all([s.hessian_products for _, s in r] == [s.hessian_products for s in records] for r in runs)
        measured = [min(r[k][0] for r in runs) for k in range(steps)]
        ideal = [min(f[k] for f in floors) for k in range(steps)]
        summed = [comp["gradient"] + comp["graph"] + s.hessian_products * comp["hvp"]
                  + s.function_evaluations * comp["forward"] for s in records]
        results[name] = dict(
            measured_s=measured, ideal_s=ideal, components_sum_s=summed, ratio=sum(measured) / sum(ideal),
            ratio_to_components=sum(measured) / sum(summed), deterministic=same,
            per_iteration_ms=1e3 * sum(measured) / steps, ideal_ms=1e3 * sum(ideal) / steps,
            components_ms=1e3 * sum(summed) / steps,
            subproblem_iterations=statistics.mean(s.subproblem_iterations for s in records),
            hessian_products=statistics.mean(s.hessian_products for s in records),
            function_evaluations=statistics.mean(s.function_evaluations for s in records),
            propagations=statistics.mean(s.propagations for s in records),
            accepted=sum(s.accepted for s in records), loss_first=records[0].loss, loss_last=records[-1].new_loss,
            exits=sorted({s.exit for s in records}))
        r = results[name]
        print(f"{name}: {r['per_iteration_ms']:.1f} ms per iteration, ideal {r['ideal_ms']:.1f} ms, "
              f"ratio {r['ratio']:.2f}", flush=True)
    other, wall, share = contention.share()
    note = (f"timing: other processes used {other:.1f} CPU-s in {wall:.1f} s "
            f"({100 * share:.1f}% of the machine)")
    if share > 0.05:
        note += "  ** WARNING: the machine was shared; timings are unreliable, rerun on an idle machine **"

    print(f"\nmachine: {machine()}\n{note}\n")
    print(f"MNIST-1D CNN (P = {sum(p.numel() for p in base.parameters())}), n = {n}, |S| = {comp['sample']}, "
          f"{steps} iterations x {rounds} rounds, components min of {reps}: full gradient "
          f"{1e3 * comp['gradient']:.2f} ms, sample graph {1e3 * comp['graph']:.2f} ms, one HVP on it "
          f"{1e3 * comp['hvp']:.2f} ms, full forward {1e3 * comp['forward']:.2f} ms\n")
    print("| optimizer | ms / iteration | ideal ms (bare replay) | ratio | goal | result | sum of components ms "
          "(ratio) | sub-problem its | HVPs | trial losses | propagations / iteration | accepted "
          "| loss first -> last |")
    print("|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---|")
    for name, r in results.items():
        goal, verdict = ("<= 1.3", "PASS" if r["ratio"] <= TARGET else "FAIL") if name == "TrustRegion" else ("report", "-")
        flag = "" if r["deterministic"] else " (rounds differed)"
        print(f"| {name}{flag} | {r['per_iteration_ms']:.1f} | {r['ideal_ms']:.1f} | {r['ratio']:.2f} | {goal} "
              f"| {verdict} | {r['components_ms']:.1f} ({r['ratio_to_components']:.2f}) "
              f"| {r['subproblem_iterations']:.1f} | {r['hessian_products']:.1f} "
              f"| {r['function_evaluations']:.1f} | {r['propagations']:,.0f} | {r['accepted']}/{steps} "
              f"| {r['loss_first']:.3f} -> {r['loss_last']:.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(
            machine=machine(), threads=NUM_THREADS, contention_share=share, steps=steps, rounds=rounds, reps=reps,
            components_s=comp, results=results), indent=2))


if __name__ == "__main__":
    main()
