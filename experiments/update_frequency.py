"""AdaHessian's Hessian-update-frequency table, at small scale on MNIST-1D (CPU).

Reproduces the shape of the AdaHessian paper's (Yao et al., AAAI 2021) update-frequency
experiment: AdaHessian with ``update_each`` = 1..5 against SGD (momentum 0.9) and Adam, on
MNIST-1D (4000 train / 1000 test, length 40) with a small 1-D CNN. Reports final test
accuracy (mean +- std over seeds) and the median wall time of one training step relative to
SGD and to Adam.

Run:  .venv/bin/python experiments/update_frequency.py
Writes experiments/results/update_frequency.md and experiments/results/update_frequency.png.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import machine_line, train_step, write_markdown

from secondorder.datasets.mnist1d import Mnist1dCNN, load_mnist1d
from secondorder.optim.adahessian import AdaHessian

RESULTS = Path(__file__).resolve().parent / "results"
PAPER_THEORY = {1: 2.0, 2: 1.5, 3: 1.33, 4: 1.25, 5: 1.2}  # x one gradient (paper, Table on update frequency)
PAPER_MEASURED_SGD = {1: 2.42, 5: 1.28}  # x SGD, paper's measured endpoints


load_data = load_mnist1d  # the shared MNIST-1D loader and CNN (secondorder.datasets.mnist1d)
Net = Mnist1dCNN


def make_opt(name: str, params, seed: int, ah_lr: float):
    if name == "SGD":
        return torch.optim.SGD(params, lr=0.1, momentum=0.9)
    if name == "Adam":
        return torch.optim.Adam(params, lr=1e-3)
    n = int(name.split("=")[1])
    return AdaHessian(params, lr=ah_lr, curvature_every=n, seed=seed)


def run(name: str, seed: int, data, epochs: int, batch: int, ah_lr: float) -> dict:
    xtr, ytr, xte, yte = data
    torch.manual_seed(seed)
    model = Net()
    opt = make_opt(name, model.parameters(), seed, ah_lr)
    second_order = isinstance(opt, AdaHessian)
    gen = torch.Generator().manual_seed(seed)
    times, kinds, losses, diverged = [], [], [], False
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(xtr), generator=gen)
        for i in range(0, len(xtr), batch):
            idx = perm[i : i + batch]
            xb, yb = xtr[idx], ytr[idx]
            curv_before = opt.num_curvature_steps if second_order else 0
            t0 = time.perf_counter()
            try:
                loss = train_step(opt, second_order, lambda: F.cross_entropy(model(xb), yb))
            except FloatingPointError:
                diverged = True
                break
            times.append(time.perf_counter() - t0)
            kinds.append(second_order and opt.num_curvature_steps > curv_before)  # a Hessian-refresh step?
            losses.append(float(loss.detach()))
            if not math.isfinite(losses[-1]):
                diverged = True
                break
        if diverged:
            break
    model.eval()
    with torch.no_grad():
        acc = (model(xte).argmax(1) == yte).float().mean().item() if not diverged else float("nan")
    n_last = max(1, len(xtr) // batch)
    # amortized cost per step, robust to timer noise: median time of the Hessian-refresh steps and of
    # the gradient-only steps, weighted by their shares (1/n and (n-1)/n). A plain median over all steps
    # would, for n >= 3, just return the gradient-only step time and hide the Hessian cost.
    curv = [t for t, k in zip(times, kinds) if k]
    grad = [t for t, k in zip(times, kinds) if not k]
    share = len(curv) / len(times)
    step_time = share * (statistics.median(curv) if curv else 0.0) + (1 - share) * (
        statistics.median(grad) if grad else 0.0)
    return dict(acc=acc, step_time=step_time, diverged=diverged, mean_time=statistics.mean(times),
                curv_time=statistics.median(curv) if curv else float("nan"),
                grad_time=statistics.median(grad) if grad else float("nan"),
                train_loss=statistics.mean(losses[-n_last:]) if losses else float("nan"))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--adahessian-lr", type=float, default=0.15)
    ap.add_argument("--out", default=str(RESULTS / "update_frequency"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    t_start = time.perf_counter()
    data = load_data()
    names = ["SGD", "Adam"] + [f"AdaHessian n={n}" for n in range(1, 6)]
    res = {n: [] for n in names}
    for seed in range(a.seeds):  # seeds outer, optimizers inner: timing drift hits every optimizer alike
        for name in names:
            r = run(name, seed, data, a.epochs, a.batch, a.adahessian_lr)
            res[name].append(r)
            print(f"seed {seed} {name:16s} acc {r['acc']:.4f} loss {r['train_loss']:.4f} "
                  f"step {r['step_time'] * 1e3:.2f} ms{' DIVERGED' if r['diverged'] else ''}", flush=True)
    total = time.perf_counter() - t_start

    def summary(name):
        accs = [r["acc"] for r in res[name] if not r["diverged"]]
        t = statistics.median(r["step_time"] for r in res[name])
        return dict(mean=statistics.mean(accs) if accs else float("nan"),
                    std=statistics.stdev(accs) if len(accs) > 1 else 0.0,
                    loss=statistics.mean(r["train_loss"] for r in res[name] if not r["diverged"]) if accs else float("nan"),
                    t=t, div=sum(r["diverged"] for r in res[name]),
                    mean_t=statistics.median(r["mean_time"] for r in res[name]),
                    curv_t=statistics.median(r["curv_time"] for r in res[name]),
                    grad_t=statistics.median(r["grad_time"] for r in res[name]))

    S = {n: summary(n) for n in names}
    t_sgd, t_adam = S["SGD"]["t"], S["Adam"]["t"]
    cmd = ".venv/bin/python experiments/update_frequency.py" + "".join(
        f" {x}" for x in sys.argv[1:])
    lines = [
        "# AdaHessian Hessian-update frequency on MNIST-1D (small-scale reproduction)",
        "",
        f"Command: `{cmd}`  ",
        machine_line(),
        f"Setup: MNIST-1D (4000 train / 1000 test), Conv1d(1,16,5)-ReLU-Conv1d(16,32,5)-ReLU-GAP-Linear(32,10), "
        f"batch {a.batch}, {a.epochs} epochs, {a.seeds} seeds; SGD lr 0.1 momentum 0.9, Adam lr 1e-3, "
        f"AdaHessian lr {a.adahessian_lr} (defaults otherwise). No schedule, no weight decay.  ",
        f"Total runtime: {total:.0f} s",
        "",
        "| optimizer | test acc (mean ± std) | final-epoch train loss (non-diverged) | step (ms, amortized) | × SGD | × Adam "
        "| mean step × SGD | Hessian step / gradient-only step (ms) | paper theory (× gradient) | paper measured (× SGD) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in names:
        s = S[name]
        n = int(name.split("=")[1]) if "=" in name else None
        theory = f"{PAPER_THEORY[n]:.2f}" if n else "1"
        meas = f"{PAPER_MEASURED_SGD[n]:.2f}" if n in PAPER_MEASURED_SGD else ("1" if name == "SGD" else "–")
        div = f" ({s['div']} diverged)" if s["div"] else ""
        lines.append(f"| {name} | {100 * s['mean']:.1f} ± {100 * s['std']:.1f}{div} | {s['loss']:.3f} | "
                     f"{1e3 * s['t']:.2f} | {s['t'] / t_sgd:.2f} | {s['t'] / t_adam:.2f} | {s['mean_t'] / S['SGD']['mean_t']:.2f} | "
                     + (f"{1e3 * s['curv_t']:.2f} / {1e3 * s['grad_t']:.2f}" if n else "–")
                     + f" | {theory} | {meas} |")
    lines += ["", "Step time = wall time of one full training step (forward, backward or Hessian-vector "
              "product, update). 'Amortized' = (1/n) x median time of the Hessian-refresh steps + (1 - 1/n) x "
              "median time of the gradient-only steps of a run (for SGD/Adam: the median step), then the median "
              "over seeds. A plain median over all steps is not used because for n >= 3 it equals the "
              "gradient-only step and hides the Hessian cost. 'mean step' = arithmetic mean over all steps "
              "(includes timer outliers), as a cross-check.", ""]
    png, plt = write_markdown(lines, a.out)

    ns = list(range(1, 6))
    ah = [S[f"AdaHessian n={n}"] for n in ns]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.errorbar(ns, [100 * s["mean"] for s in ah], yerr=[100 * s["std"] for s in ah], marker="o",
                 capsize=3, label="AdaHessian")
    for ref, c in (("SGD", "tab:green"), ("Adam", "tab:red")):
        ax1.axhline(100 * S[ref]["mean"], color=c, ls="--", label=f"{ref} ({100 * S[ref]['mean']:.1f})")
        ax1.axhspan(100 * (S[ref]["mean"] - S[ref]["std"]), 100 * (S[ref]["mean"] + S[ref]["std"]),
                    color=c, alpha=0.1)
    ax1.set(xlabel="update_each (Hessian refreshed every n steps)", ylabel="test accuracy (%)",
            title=f"MNIST-1D, {a.epochs} epochs, {a.seeds} seeds", xticks=ns)
    ax1.legend()
    ax2.plot(ns, [s["t"] / t_sgd for s in ah], marker="o", label="AdaHessian measured (× SGD)")
    ax2.plot(ns, [PAPER_THEORY[n] for n in ns], marker="s", ls=":", color="gray",
             label="paper theory (× gradient)")
    ax2.plot(list(PAPER_MEASURED_SGD), list(PAPER_MEASURED_SGD.values()), marker="^", ls="", color="k",
             label="paper measured (× SGD)")
    ax2.axhline(1.0, color="tab:green", ls="--", label="SGD")
    ax2.axhline(t_adam / t_sgd, color="tab:red", ls="--", label="Adam")
    ax2.set(xlabel="update_each", ylabel="amortized step time relative to SGD", title="cost per step (noisy: ±20% run to run)",
            xticks=ns, ylim=(0, None))
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    print(f"wrote {png.with_suffix('.md')} and {png} in {total:.0f} s")


if __name__ == "__main__":
    main()
