#!/usr/bin/env python
"""K-FAC: secondorder's ``KFACOperator`` products against curvlinops' ``KFACLinearOperator``, and
the ``secondorder.optim.KFAC`` step against an SGD-momentum step, in one process, float32.

(a) **Products** on the same model and batch: both operators build their factors once (the same
    factors: type-2 / ``"ggn"``, KFAC-expand, joint weight and bias; the products are checked to
    agree), then ``op @ V`` on a ``[P, 16]`` block and ``op @ v`` on one ``[P]`` vector are timed,
    and (the floor of any implementation) each layer's two GEMMs alone, ``S @ [d_out, K d_in]``
    and ``[K d_out, d_in] @ A``, on operands already laid out for them.
    Models: the MLP 784-256-256-10 (tanh, 256 random inputs) and the CNN
    ``Conv2d(1,8,3)-ReLU-Conv2d(8,16,3)-ReLU-MaxPool2d(2)-Flatten-Linear(2304,10)`` (128 random
    1x28x28 images) of ``bench_curvature.py``. Target: ours / curvlinops <= 0.8.
(b) **Optimizer steps**: ``KFAC`` with its defaults (``fisher="mc"``, ``factor_every=10``,
    ``inverse_every=100``, lr 0.01) against ``torch.optim.SGD(lr=0.01, momentum=0.9)``, each on
    its own copy of the same network: the MNIST-1D CNN (``secondorder.datasets.Mnist1dCNN``,
    batches of 128 of the 4000 training sequences, cycled) and the MLP 784-256-256-10 (one fixed
    batch of 128, and one of 1024, random inputs). Steps are timed in blocks of 100 =
    ``inverse_every``, so every block holds exactly one inversion and ten factor steps whatever
    its phase (the amortized step). Target: KFAC / SGD <= 1.5. Diagnostic rows split the K-FAC
    step: a step without factors or inversion (gradient + preconditioning), a factor step
    (``factor_every=1``: the MC labels' extra backward and the factors' GEMMs), one inversion
    (two ``eigh`` per layer), and the preconditioning product alone (``inverse @ g``, the part of
    every step that SGD does not have).

Timing: one untimed warm-up of each function, then 9 rounds (3 with ``--quick``; 3 and 2 for the
optimizer steps) in which the functions take turns (``gc.collect()`` before each); the time
reported is the **median** over the rounds, the ratio that of the medians. ``--clock cpu``
measures the process's CPU time instead of wall time (``time.process_time``): on a shared
machine, with ``BENCH_THREADS=1``, it does not count the time other processes hold the core.

    python benchmarks/bench_kfac.py             # full run (about 2 minutes on 2 cores)
    python benchmarks/bench_kfac.py --quick     # smoke run
    python benchmarks/bench_kfac.py --json out.json
    BENCH_THREADS=1 python benchmarks/bench_kfac.py --clock cpu   # a shared machine

Needs curvlinops (``pip install --no-deps -r anchors.txt``).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from machine import Contention, prepare
from torch import nn

NUM_THREADS = prepare()
from curvlinops import KFACLinearOperator  # noqa: E402

from secondorder.datasets.mnist1d import Mnist1dCNN, load_mnist1d  # noqa: E402
from secondorder.environment import describe as machine  # noqa: E402
from secondorder.operators.kfac import KFACOperator  # noqa: E402
from secondorder.optim import KFAC  # noqa: E402

K = 16  # columns of the timed block product
BLOCK = 100  # optimizer steps per timed block (= KFAC's default inverse_every)
LR = 0.01
PRODUCT_TARGET, STEP_TARGET = 0.8, 1.5
CLOCK = time.perf_counter  # --clock cpu: time.process_time


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(784, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 10))


def cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 16, 3), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(2304, 10))


def timed(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median seconds per call of each function over ``rounds`` interleaved rounds (after one warm-up)."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {n: [] for n in fns}
    for _ in range(rounds):
        for n, fn in fns.items():
            gc.collect()
            t0 = CLOCK()
            fn()
            times[n].append(CLOCK() - t0)
    return {n: statistics.median(ts) for n, ts in times.items()}


# ---------------------------------------------------------------------------------------
# (a) products
# ---------------------------------------------------------------------------------------
def products(name: str, make: Callable[[], nn.Module], X: torch.Tensor, y: torch.Tensor, rounds: int,
             reps: int) -> dict:
    torch.manual_seed(0)
    model = make()
    ours = KFACOperator(model, nn.CrossEntropyLoss(), (X, y), fisher="ggn")
    theirs = KFACLinearOperator(model, nn.CrossEntropyLoss(), ours.params, [(X, y)], fisher_type="type-2",
                                kfac_approx="expand", separate_weight_and_bias=False, check_deterministic=False)
    P = ours.shape[0]
    g = torch.Generator().manual_seed(1)
    V, v = torch.randn(P, K, generator=g), torch.randn(P, generator=g)
    a, b = ours @ V, theirs @ V  # curvlinops computes (and caches) its factors on its first product
    rel = float((a - b).norm() / b.norm())
    assert rel < 1e-4, f"{name}: KFACOperator and curvlinops differ by {rel:.2e}"

    def repeat(fn):
        return lambda: [fn() for _ in range(reps)]

    def gemms(k: int):  # the floor: each layer's two GEMMs alone, on operands already laid out for them
        mats = [(f.S, f.A, torch.randn(f.shape[0], f.shape[1] * k), torch.randn(k * f.shape[0], f.shape[1]))
                for f in ours.factors]
        return lambda: [(torch.mm(S, M1), torch.mm(M2, A)) for S, A, M1, M2 in mats]

    t = timed({"ours_block": repeat(lambda: ours @ V), "theirs_block": repeat(lambda: theirs @ V),
               "gemms_block": repeat(gemms(K)), "ours_vec": repeat(lambda: ours @ v),
               "theirs_vec": repeat(lambda: theirs @ v), "gemms_vec": repeat(gemms(1))}, rounds)
    return dict(model=name, P=P, relative_difference=rel, **{k: s / reps for k, s in t.items()})


# ---------------------------------------------------------------------------------------
# (b) optimizer steps
# ---------------------------------------------------------------------------------------
def stepper(kind: str, model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> Callable[[], None]:
    """One training step of ``kind`` on ``model`` (which it owns), cycling through ``batches``."""
    it = [0]

    def batch():
        X, y = batches[it[0] % len(batches)]
        it[0] += 1
        return X, y

    if kind == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)

        def sgd_step():
            X, y = batch()
            opt.zero_grad()
            F.cross_entropy(model(X), y).backward()
            opt.step()

        return sgd_step
    settings = {"kfac": {}, "kfac_plain": dict(factor_every=10**9, inverse_every=10**9),
                "kfac_factor": dict(factor_every=1, inverse_every=10**9)}[kind]
    kfac = KFAC(model, nn.CrossEntropyLoss(), lr=LR, **settings)

    def kfac_step():
        X, y = batch()

        def closure():
            logits = model(X)
            return F.cross_entropy(logits, y), logits

        kfac.step(closure)

    kfac_step.optimizer = kfac  # type: ignore[attr-defined]
    return kfac_step


def steps(name: str, make: Callable[[], nn.Module], batches: list, rounds: int) -> dict:
    torch.manual_seed(0)
    base = make()
    fns = {k: stepper(k, copy.deepcopy(base), batches) for k in ("kfac", "sgd", "kfac_plain", "kfac_factor")}
    for fn in fns.values():  # warm-up: the first step of each K-FAC forms and inverts the factors
        fn()

    def block(fn, n):
        return lambda: [fn() for _ in range(n)]

    t = timed({"kfac": block(fns["kfac"], BLOCK), "sgd": block(fns["sgd"], BLOCK),
               "kfac_plain": block(fns["kfac_plain"], 20), "kfac_factor": block(fns["kfac_factor"], 20)}, rounds)
    t = {"kfac": t["kfac"] / BLOCK, "sgd": t["sgd"] / BLOCK, "kfac_plain": t["kfac_plain"] / 20,
         "kfac_factor": t["kfac_factor"] / 20}
    opt = fns["kfac"].optimizer  # type: ignore[attr-defined]
    assert opt.num_steps == 1 + BLOCK * (rounds + 1)
    factored = KFACOperator.from_factors(opt.preconditioned, opt.factors, opt.blocks)
    inverse, g = opt.inverse, torch.randn(factored.shape[0], generator=torch.Generator().manual_seed(2))
    t.update(timed({"inverse": lambda: factored.inverse(1e-3),
                    "precondition": lambda: [inverse @ g for _ in range(20)]}, rounds))
    t["precondition"] /= 20
    P = sum(p.numel() for p in base.parameters())
    return dict(model=name, P=P, **t)


# ---------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------
def ms(t: float) -> str:
    return f"{1e3 * t:.2f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (smoke run)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall time (default) or the process's CPU time (with BENCH_THREADS=1 on a shared machine)")
    parser.add_argument("--part", choices=("all", "products", "steps"), default="all", help="run only (a) or (b)")
    args = parser.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    rounds = 3 if args.quick else 9
    print(f"machine: {machine(torch.device('cpu'))}", flush=True)
    contention = Contention()

    g = torch.Generator().manual_seed(0)
    prod = [] if args.part == "steps" else [products("MLP 784-256-256-10", mlp, torch.randn(256, 784, generator=g),
                     torch.randint(0, 10, (256,), generator=g), rounds, 5),
            products("CNN (bench_curvature)", cnn, torch.randn(128, 1, 28, 28, generator=g),
                     torch.randint(0, 10, (128,), generator=g), rounds, 5)]
    step = []
    if args.part != "products":
        x_train, y_train, _, _ = load_mnist1d()
        mnist = [(x_train[i : i + 128], y_train[i : i + 128]) for i in range(0, 4000 - 127, 128)]
        step.append(steps("MNIST-1D CNN, batch 128", Mnist1dCNN, mnist, max(2, rounds // 3)))
    for n in (128, 1024) if args.part != "products" else ():
        step.append(steps(f"MLP 784-256-256-10, batch {n}", mlp, [(torch.randn(n, 784, generator=g),
                                                                     torch.randint(0, 10, (n,), generator=g))],
                          max(2, rounds // 3)))
    other, wall, share = contention.share()
    note = f"timing: other processes used {other:.1f} CPU-s in {wall:.1f} s ({100 * share:.1f}% of the machine)"
    if share > 0.05:
        note += "  ** WARNING: the machine was shared; timings are unreliable, rerun on an idle machine **"

    rows = []

    def row(metric, ours, anchor, goal):
        ratio = ours / anchor
        rows.append(dict(metric=metric, ours=ours, anchor=anchor, ratio=ratio, goal=goal,
                         passed=None if goal is None else ratio <= goal))

    for p in prod:
        row(f"a. {p['model']} (P = {p['P']:,}): `op @ V`, V [P, {K}], vs curvlinops", p["ours_block"],
            p["theirs_block"], PRODUCT_TARGET)
        row(f"a. {p['model']}: `op @ v`, one vector, vs curvlinops", p["ours_vec"], p["theirs_vec"], PRODUCT_TARGET)
        row(f"a'. {p['model']}: GEMM floor of `op @ V` (the two GEMMs per layer alone) vs curvlinops",
            p["gemms_block"], p["theirs_block"], None)
        row(f"a'. {p['model']}: GEMM floor of `op @ v` vs curvlinops", p["gemms_vec"], p["theirs_vec"], None)
    for s in step:
        row(f"b. {s['model']} (P = {s['P']:,}): KFAC step (amortized) vs SGD momentum", s["kfac"], s["sgd"],
            STEP_TARGET)
        row(f"b'. {s['model']}: KFAC step without factors or inversion vs SGD", s["kfac_plain"], s["sgd"], None)
        row(f"b'. {s['model']}: KFAC factor step (`fisher=\"mc\"`) vs SGD", s["kfac_factor"], s["sgd"], None)
        row(f"b'. {s['model']}: one inversion (per 100 steps) vs SGD step", s["inverse"], s["sgd"], None)
        row(f"b'. {s['model']}: the preconditioning product `inverse @ g` vs SGD step", s["precondition"], s["sgd"],
            None)

    print(f"\nmachine: {machine(torch.device('cpu'))}\n{note}\nclock: {args.clock}, {rounds} rounds, medians\n")
    print("| metric | secondorder | anchor | ratio | goal | result |")
    print("|---|---:|---:|---:|---:|---|")
    for r in rows:
        goal = f"<= {r['goal']}" if r["goal"] is not None else "report"
        result = "-" if r["passed"] is None else ("PASS" if r["passed"] else "FAIL")
        print(f"| {r['metric']} | {ms(r['ours'])} | {ms(r['anchor'])} | {r['ratio']:.2f} | {goal} | {result} |")
    for s in step:
        est = s["kfac_plain"] + (s["kfac_factor"] - s["kfac_plain"]) / 10 + s["inverse"] / BLOCK
        print(f"\n{s['model']}: amortized estimate plain + (factor - plain)/10 + inverse/100 = {ms(est)} "
              f"(measured {ms(s['kfac'])}); SGD {ms(s['sgd'])}")
    print("products: relative difference ours vs curvlinops: "
          + ", ".join(f"{p['model']} {p['relative_difference']:.1e}" for p in prod))
    if args.json:
        Path(args.json).write_text(json.dumps(dict(machine=machine(torch.device("cpu")), contention_share=share,
                                                    rounds=rounds, products=prod, steps=step, rows=rows), indent=2))


if __name__ == "__main__":
    main()
