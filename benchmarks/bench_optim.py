#!/usr/bin/env python
"""secondorder's optimizers against their anchors: time per step and peak memory, in one process.

Every optimizer trains its own copy of the same small CNN (same initial weights) on the same
fixed batch (128 random 1x28x28 images, random labels, float32). Steps are timed in blocks of
10; the blocks of all optimizers take turns (one block of each per round, ``gc.collect()``
before each), so a slow phase of the machine hits them alike, and the reported time per step
is the minimum block time over the rounds divided by 10. A block of 10 steps contains exactly
2 curvature steps for ``curvature_every=5`` and exactly 1 for ``curvature_every=10``, whatever the phase.

    python benchmarks/bench_optim.py                 # full run (about a minute on 2 cores)
    python benchmarks/bench_optim.py --quick         # smoke run
    python benchmarks/bench_optim.py --json out.json
    python benchmarks/bench_optim.py --device cuda   # on a GPU (peak memory: max_memory_allocated)

Peak memory runs 10 steps of one optimizer in a fresh subprocess (``--memory-child NAME``).
Needs ``torch-optimizer`` (``pip install --no-deps -r anchors.txt``).
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from machine import Contention, prepare
from torch import nn

NUM_THREADS = prepare()
import secondorder  # noqa: E402  (after prepare() put src/ on the path if needed)
from secondorder.environment import describe as machine  # noqa: E402
from secondorder.optim import AdaHessian, SophiaG, SophiaH  # noqa: E402

BLOCK = 10  # steps per timed block
LR = 1e-3  # small enough that ~100 steps on random labels stay finite for every optimizer
DEVICE = torch.device("cpu")  # set by --device


# ---------------------------------------------------------------------------------------
# machine
# ---------------------------------------------------------------------------------------
# ---------------------------------------------------------------------------------------
# model, data, one training step per optimizer
# ---------------------------------------------------------------------------------------
def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3), nn.ReLU(), nn.Conv2d(16, 32, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 12 * 12, 10),
    )


def setup() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = cnn()
    X, y = torch.randn(128, 1, 28, 28), torch.randint(0, 10, (128,))
    return model.to(DEVICE), X.to(DEVICE), y.to(DEVICE)


def synchronize() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def make_step(name: str, model: nn.Module, X: torch.Tensor, y: torch.Tensor):
    """A function doing one training step of optimizer ``name`` on ``model`` (which it owns)."""
    params = list(model.parameters())

    def loss():
        return F.cross_entropy(model(X), y)

    if name.startswith("adahessian"):  # ours, "adahessian" or "adahessian_u5"
        opt = AdaHessian(params, lr=LR, curvature_every=5 if name.endswith("_u5") else 1)
        return lambda: opt.step(loss)
    if name in ("sophiah", "sophiag"):
        if name == "sophiah":
            opt = SophiaH(params, lr=LR, curvature_every=10)
            return lambda: opt.step(loss)
        opt = SophiaG(params, lr=LR, curvature_every=10)

        def closure_g():
            logits = model(X)
            return F.cross_entropy(logits, y), logits

        return lambda: opt.step(closure_g)
    if name == "torchopt_adahessian":
        import torch_optimizer

        opt = torch_optimizer.Adahessian(params, lr=LR, hessian_power=1.0)

        def closure_h():
            opt.zero_grad()
            value = loss()
            value.backward(create_graph=True)
            return value

        return lambda: opt.step(closure_h)
    if name in ("adam", "adamw"):
        opt = (torch.optim.Adam if name == "adam" else torch.optim.AdamW)(params, lr=LR)

        def closure():
            opt.zero_grad()
            value = loss()
            value.backward()
            return value

        return lambda: opt.step(closure)
    if name == "grad_hvp":  # the floor: one gradient + one HVP through secondorder's operator
        A = secondorder.HessianOperator(model, F.cross_entropy, (X, y))
        v = torch.randn(A.shape[0], generator=torch.Generator().manual_seed(1)).to(DEVICE)
        return lambda: A @ v
    if name == "grad":  # diagnostic: forward + plain backward
        return lambda: torch.autograd.grad(loss(), params)
    if name == "grad_graph":  # diagnostic: forward + create_graph backward, no HVP
        return lambda: torch.autograd.grad(loss(), params, create_graph=True)
    raise SystemExit(f"unknown optimizer {name!r}")


TIMED = ["adahessian", "torchopt_adahessian", "grad_hvp", "adahessian_u5", "adam",
         "sophiah", "sophiag", "adamw", "grad", "grad_graph"]


def time_steps(names: list[str], rounds: int, warmup_blocks: int = 1) -> dict[str, float]:
    """Seconds per step of each function: min over ``rounds`` interleaved blocks of BLOCK steps."""
    base_model, X, y = setup()
    fns = {n: make_step(n, copy.deepcopy(base_model), X, y) for n in names}
    for fn in fns.values():
        for _ in range(warmup_blocks * BLOCK):
            fn()
    times = {n: [] for n in names}
    for _ in range(rounds):
        for n, fn in fns.items():
            gc.collect()
            synchronize()
            t0 = time.perf_counter()
            for _ in range(BLOCK):
                fn()
            synchronize()
            times[n].append((time.perf_counter() - t0) / BLOCK)
    return {n: min(ts) for n, ts in times.items()}


# ---------------------------------------------------------------------------------------
# peak memory (fresh subprocess per optimizer)
# ---------------------------------------------------------------------------------------
def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def memory_child(name: str) -> None:
    """Peak memory increase (bytes) over BLOCK steps of ``name``, printed as JSON.

    CPU: the process's peak RSS (VmHWM) over its RSS before; CUDA: ``max_memory_allocated``
    over ``memory_allocated`` before.
    """
    model, X, y = setup()
    step = make_step(name, model, X, y)
    torch.autograd.grad(F.cross_entropy(model(X), y), list(model.parameters()))  # warm-up gradient
    gc.collect()
    if DEVICE.type == "cuda":
        synchronize()
        base = torch.cuda.memory_allocated(DEVICE)
        torch.cuda.reset_peak_memory_stats(DEVICE)
        for _ in range(BLOCK):
            step()
        peak = torch.cuda.max_memory_allocated(DEVICE)
        print(json.dumps(dict(name=name, base=base, peak=peak, increase=peak - base)))
        return
    try:  # give the freed warm-up activations back, so the baseline is the live memory
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    base = _status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM (the peak RSS) to the current RSS
        f.write("5")
    for _ in range(BLOCK):
        step()
    peak = _status_kb("VmHWM")
    print(json.dumps(dict(name=name, base=base * 1024, peak=peak * 1024, increase=(peak - base) * 1024)))


def run_child(name: str) -> dict:
    env = dict(os.environ, BENCH_THREADS=str(NUM_THREADS))
    out = subprocess.run([sys.executable, __file__, "--device", str(DEVICE), "--memory-child", name],
                         capture_output=True, text=True,
                         env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"memory child {name} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------
def ms(t: float) -> str:
    return f"{1e3 * t:.1f} ms"


def mib(b: float) -> str:
    return f"{b / 2**20:.1f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (smoke run)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--device", default="cpu", help="torch device to run on (default cpu)")
    parser.add_argument("--memory-child", metavar="NAME", help=argparse.SUPPRESS)
    args = parser.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    if args.memory_child:
        memory_child(args.memory_child)
        return

    rounds = 2 if args.quick else 7
    print(f"machine: {machine(DEVICE)}", flush=True)
    contention = Contention()
    t = time_steps(TIMED, rounds)
    other, wall, share = contention.share()
    note = (f"timing: other processes used {other:.1f} CPU-s in {wall:.1f} s "
            f"({100 * share:.1f}% of the machine)")
    if share > 0.05:
        note += "  ** WARNING: the machine was shared; timings are unreliable, rerun on an idle machine **"
    print(note, flush=True)

    mem_repeats = 1 if args.quick else 2
    mem = {n: min(run_child(n)["increase"] for _ in range(mem_repeats))
           for n in ("adahessian", "adam", "torchopt_adahessian")}

    rows = []  # metric, ours, anchor, ratio, goal (upper bound or None)

    def row(metric, ours, anchor, fmt, goal):
        ratio = ours / anchor if anchor else math.inf
        rows.append(dict(metric=metric, ours=fmt(ours), anchor=fmt(anchor), ratio=ratio, goal=goal,
                         passed=None if goal is None else ratio <= goal))

    row("1. AdaHessian step vs torch-optimizer Adahessian (hessian_power=1)", t["adahessian"],
        t["torchopt_adahessian"], ms, 0.75)
    row("2. AdaHessian step vs floor (gradient + 1 HVP, `HessianOperator @ v`)", t["adahessian"],
        t["grad_hvp"], ms, 1.1)
    row("3. AdaHessian update_each=5 step vs Adam", t["adahessian_u5"], t["adam"], ms, 1.35)
    row("4a. SophiaH k=10 step vs AdamW", t["sophiah"], t["adamw"], ms, 1.25)
    row("4b. SophiaG k=10 step vs AdamW", t["sophiag"], t["adamw"], ms, 1.25)
    row("5. peak memory increase, 10 steps: AdaHessian vs Adam", mem["adahessian"], mem["adam"], mib, None)
    row("5'. peak memory increase, 10 steps: AdaHessian vs torch-optimizer Adahessian", mem["adahessian"],
        mem["torchopt_adahessian"], mib, None)

    print(f"\nmachine: {machine(DEVICE)}\n{note}\n")
    print("| metric | secondorder | anchor | ratio | goal | result |")
    print("|---|---:|---:|---:|---:|---|")
    for r in rows:
        goal = f"<= {r['goal']}" if r["goal"] is not None else "report"
        result = "-" if r["passed"] is None else ("PASS" if r["passed"] else "FAIL")
        print(f"| {r['metric']} | {r['ours']} | {r['anchor']} | {r['ratio']:.2f} | {goal} | {result} |")
    print("\ndiagnostics (time per call): "
          + ", ".join(f"{n} {ms(v)}" for n, v in t.items())
          + "\npeak memory increase: " + ", ".join(f"{n} {mib(v)}" for n, v in mem.items()))
    if args.json:
        Path(args.json).write_text(json.dumps(dict(machine=machine(DEVICE), contention_share=share, rounds=rounds,
                                                    seconds_per_step=t, rss_increase_bytes=mem, rows=rows),
                                              indent=2))


if __name__ == "__main__":
    main()
