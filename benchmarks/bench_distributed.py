#!/usr/bin/env python
"""Data-parallel scaling: time per optimizer step and per Hessian-vector product vs processes.

On the MNIST-1D CNN (``secondorder.datasets.mnist1d``, 3018 parameters, float32), for each
number of processes W (``--processes``, default 1,2,4), one ``torchrun --standalone`` job of W
processes (gloo on CPU, one GPU per process with nccl under ``--device cuda``) times:

* ``hvp``: ``secondorder.HessianOperator(..., distributed=True)`` on the rank's shard, ``A @ v``
  (forward, gradient graph, one double backward, one all-reduce of the product and the sample
  count): the product of the mean loss on all ranks' samples;
* ``adahessian``: one ``AdaHessian`` step (gradient and one Hutchinson product every step, one
  bucketed all-reduce);
* ``sophiah``: one ``SophiaH`` step with k=10 (a block of 10 steps holds exactly one refresh);
* ``adam_ddp``: the reference, ``torch.optim.Adam`` on the model wrapped in
  ``DistributedDataParallel`` (``loss.backward()``, DDP's bucketed gradient all-reduce).

Two workloads: strong scaling (a fixed global batch, ``--global-batch``, split into W shards)
and weak scaling (a fixed per-rank batch, ``--rank-batch``). Each operation runs in blocks of
10 calls between barriers; the operations take turns block by block (``gc.collect()`` before
each), and the reported time per call is the minimum block time over the rounds divided by 10,
as measured on rank 0 (the closing barrier waits for the slowest rank).

    python benchmarks/bench_distributed.py                      # CPU, 1, 2 and 4 processes
    python benchmarks/bench_distributed.py --quick              # smoke run
    python benchmarks/bench_distributed.py --device cuda --processes 1,2,4,8
    python benchmarks/bench_distributed.py --json out.json

Every process uses ``--threads`` CPU threads (default 1, so that W processes on W cores compare
with one process on one core). With more processes than cores the processes share cores and
the times say nothing about scaling; the script warns.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from machine import Contention, prepare

prepare()
import secondorder  # noqa: E402  (after prepare() put src/ on the path if needed)
from secondorder.datasets.mnist1d import Mnist1dCNN, load_mnist1d  # noqa: E402
from secondorder.distributed import all_reduce, init_from_env, shutdown  # noqa: E402
from secondorder.environment import describe as machine  # noqa: E402
from secondorder.optim import AdaHessian, SophiaH  # noqa: E402

BLOCK = 10  # calls per timed block
OPERATIONS = ["hvp", "adahessian", "sophiah", "adam_ddp"]
LABELS = {"hvp": "Hessian-vector product (+ all-reduce)", "adahessian": "AdaHessian step",
          "sophiah": "SophiaH step (curvature_every=10)", "adam_ddp": "Adam step, DDP (reference)"}


# ---------------------------------------------------------------------------------------
# one process of a torchrun job
# ---------------------------------------------------------------------------------------
def make_call(name: str, device: torch.device, X: torch.Tensor, y: torch.Tensor):
    """One call of operation ``name`` on a fresh copy of the model (same weights on every rank)."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(0)
        model = Mnist1dCNN().to(device)
    params = list(model.parameters())
    if name == "hvp":
        A = secondorder.HessianOperator(model, F.cross_entropy, [(X, y)], distributed=True)
        v = torch.randn(A.shape[0], generator=torch.Generator().manual_seed(1)).to(device)
        return lambda: A @ v
    if name in ("adahessian", "sophiah"):
        opt = AdaHessian(params, lr=1e-3) if name == "adahessian" else SophiaH(params, lr=1e-3, curvature_every=10)
        return lambda: opt.step(lambda: F.cross_entropy(model(X), y))
    if name == "adam_ddp":
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        opt = torch.optim.Adam(ddp.parameters(), lr=1e-3)

        def step():
            opt.zero_grad()
            F.cross_entropy(ddp(X), y).backward()
            opt.step()

        return step
    raise SystemExit(f"unknown operation {name!r}")


def child(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    cuda = args.device == "cuda"
    world = init_from_env(backend="nccl" if cuda else "gloo")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    X_all, y_all = torch.load(args.data)
    barrier = torch.zeros(1, device=device)
    results = {}
    for mode, per_rank in (("strong", args.global_batch // world.size), ("weak", args.rank_batch)):
        rows = slice(world.rank * per_rank, (world.rank + 1) * per_rank)
        X, y = X_all[rows].to(device), y_all[rows].to(device)
        calls = {n: make_call(n, device, X, y) for n in OPERATIONS}
        for call in calls.values():  # warm-up block
            for _ in range(BLOCK):
                call()
        times: dict[str, list[float]] = {n: [] for n in OPERATIONS}
        for _ in range(args.rounds):
            for n, call in calls.items():
                gc.collect()
                all_reduce(barrier, what="barrier")
                t0 = time.perf_counter()
                for _ in range(BLOCK):
                    call()
                all_reduce(barrier, what="barrier")  # waits for the slowest rank (and the device)
                times[n].append((time.perf_counter() - t0) / BLOCK)
        results[mode] = {"rank_batch": per_rank, "seconds": {n: min(ts) for n, ts in times.items()}}
    if world.rank == 0:
        print("RESULT " + json.dumps({"machine": machine(device), "processes": world.size, **results}), flush=True)
    shutdown()


# ---------------------------------------------------------------------------------------
# the parent: one torchrun job per process count, then the table
# ---------------------------------------------------------------------------------------
def run_job(processes: int, args: argparse.Namespace, data: str) -> dict:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
               __file__, "--child", "--data", data, "--device", args.device, "--threads", str(args.threads),
               "--rounds", str(args.rounds), "--global-batch", str(args.global_batch),
               "--rank-batch", str(args.rank_batch)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    out = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"the {processes}-process job failed:\n{out.stdout}\n{out.stderr}")
    return json.loads(lines[-1][len("RESULT "):])


def ms(t: float) -> str:
    return f"{1e3 * t:.2f} ms"


def table(runs: list[dict]) -> str:
    counts = [r["processes"] for r in runs]
    head = "| scaling | operation | " + " | ".join(f"{w} proc." for w in counts) + " |"
    lines = [head, "|---|---|" + "---:|" * len(counts)]
    for mode in ("strong", "weak"):
        batches = "/".join(str(r[mode]["rank_batch"]) for r in runs)
        for n in OPERATIONS:
            base = runs[0][mode]["seconds"][n]
            cells = [ms(r[mode]["seconds"][n]) + ("" if i == 0 else f" ({base / r[mode]['seconds'][n]:.2f}x)")
                     for i, r in enumerate(runs)]
            lines.append(f"| {mode}, {batches} per rank | {LABELS[n]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + (
        f"\n\ntime per call; in parentheses the time with {counts[0]} process(es) over this one: the speed-up "
        "(strong scaling, ideal = the process ratio) or the efficiency (weak scaling, ideal 1)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", default="1,2,4", help="process counts, comma-separated (default 1,2,4)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="cpu (gloo) or cuda (nccl, one GPU per process)")
    parser.add_argument("--global-batch", type=int, default=512, help="strong scaling: samples over all ranks")
    parser.add_argument("--rank-batch", type=int, default=128, help="weak scaling: samples per rank")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per process (default 1)")
    parser.add_argument("--rounds", type=int, default=5, help="timed blocks of 10 calls per operation")
    parser.add_argument("--quick", action="store_true", help="2 rounds (smoke run)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.rounds = 2
    if args.child:
        child(args)
        return

    counts = sorted({int(p) for p in args.processes.split(",")})
    if counts[0] < 1:
        raise SystemExit(f"--processes must be positive integers, got {args.processes}")
    bad = [w for w in counts if args.global_batch % w]
    if bad:
        raise SystemExit(f"--global-batch {args.global_batch} does not split evenly over {bad} processes")
    if args.device == "cuda" and counts[-1] > torch.cuda.device_count():
        raise SystemExit(f"{counts[-1]} processes need {counts[-1]} GPUs; {torch.cuda.device_count()} visible")
    x, y, _, _ = load_mnist1d()
    need = max(args.global_batch, args.rank_batch * counts[-1])
    if need > len(x):
        raise SystemExit(f"the batches need {need} samples; MNIST-1D has {len(x)} training samples")
    cores = os.cpu_count() or 1
    contention = Contention()
    with tempfile.TemporaryDirectory(prefix="bench-distributed-") as tmp:
        data = str(Path(tmp) / "mnist1d.pt")
        torch.save((x[:need].clone(), y[:need].clone()), data)
        runs = []
        for w in counts:
            runs.append(run_job(w, args, data))
            print(f"{w} process(es) done", flush=True)
    other, wall, share = contention.share()
    note = (f"timing: other processes used {other:.1f} CPU-s in {wall:.1f} s "
            f"({100 * share:.1f}% of the machine)")
    if share > 0.05:
        note += "  ** WARNING: the machine was shared; timings are unreliable, rerun on an idle machine **"
    if args.device == "cpu" and counts[-1] * args.threads > cores:
        note += (f"\n** WARNING: {counts[-1]} processes x {args.threads} thread(s) on {cores} cores: the rows "
                 f"beyond {cores // args.threads} processes measure time-sharing, not scaling **")
    print(f"\nmachine: {runs[0]['machine']} (per process: {args.threads} thread(s))\n{note}\n")
    print(table(runs))
    if args.json:
        Path(args.json).write_text(json.dumps(dict(contention_share=share, threads=args.threads, runs=runs),
                                              indent=2))


if __name__ == "__main__":
    main()
