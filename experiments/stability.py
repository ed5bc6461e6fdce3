r"""Dynamical stability on MNIST-1D (issue 18): where do GD and SGD end, against 2/lr?

The claims (the seeds' implicit-regularization abstract; Cohen et al., ICLR 2021; Wu and Su, ICML
2023): a minimum is linearly stable for gradient descent only if :math:`\lambda_{\max}(H) \le 2/\eta`,
and full-batch GD trains at that edge (progressive sharpening up to 2/η, then hovering); for SGD a
minimum is linearly stable only if :math:`\mathrm{tr}(H) \le 2/\eta`, a far stronger constraint
(:math:`\mathrm{tr} \ge \lambda_{\max}`).

Protocol: an MLP 40-64-64-10 (tanh; 7,434 parameters) on the 4,000 MNIST-1D training samples,
cross-entropy, from one initialisation per seed; for each learning rate ``lr``:

* GD: full-batch steps (``--gd-steps``), with :class:`~secondorder.analysis.HessianTracker` every
  ``--every`` steps (the edge-of-stability curve: λ_max and tr(H) of the full training loss);
* SGD: batches of ``--batch`` (plain SGD, no momentum, reshuffled each epoch) for the same number of
  epochs-equivalent of samples as the GD run's steps times 4,000 / ``--sgd-factor``.

At the end, λ_max (thick-restart Lanczos, with its residual) and tr(H) (Hutch++, 60 products, with
its 95% interval) of the full-data training loss, and the library's verdicts against 2/lr. Each
cell is the mean over seeds 0..``--seeds``-1 (min-max in brackets). Writes
``experiments/results/stability.md`` and ``.png``.

    OMP_NUM_THREADS=1 .venv/bin/python experiments/stability.py --quiet   # about 6 minutes on 1 core
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F
from common import machine_line, write_markdown
from torch import nn
from tqdm import tqdm

from secondorder.analysis import HessianTracker
from secondorder.datasets import load_mnist1d

LRS = (0.05, 0.1, 0.2, 0.4, 0.8)


def make_model(seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Flatten(), nn.Linear(40, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(),
                             nn.Linear(64, 10))


def final_check(model: nn.Module, data, lr: float, seed: int):
    tracker = HessianTracker(F.cross_entropy, data, lr=lr, trace_matvecs=60, seed=seed)
    return tracker(0, model)


def run_gd(model, data, lr, steps, every, seed, quiet):
    tracker = HessianTracker(F.cross_entropy, data, lr=lr, trace_matvecs=30, seed=seed, every=every)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    X, y = data
    for step in tqdm(range(steps + 1), desc=f"GD lr {lr}", disable=quiet, leave=False):
        tracker(step, model)
        if step == steps:
            break
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(X), y)
        if not torch.isfinite(loss):
            return tracker.points, False
        loss.backward()
        opt.step()
    return tracker.points, True


def run_sgd(model, data, lr, epochs, batch, seed, quiet):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    X, y = data
    gen = torch.Generator().manual_seed(seed)
    for _ in tqdm(range(epochs), desc=f"SGD lr {lr}", disable=quiet, leave=False):
        order = torch.randperm(len(X), generator=gen)
        for start in range(0, len(X), batch):
            idx = order[start:start + batch]
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(X[idx]), y[idx])
            if not torch.isfinite(loss):
                return False
            loss.backward()
            opt.step()
    return True


def accuracy(model, X, y) -> float:
    with torch.no_grad():
        return float((model(X).argmax(-1) == y).float().mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--gd-steps", type=int, default=1500)
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--sgd-epochs", type=int, default=30)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--out", default="experiments/results/stability")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    xtr, ytr, xte, yte = load_mnist1d()
    data = (xtr, ytr)
    rows: dict[tuple[str, float], list[dict]] = {}
    curves: dict[float, list] = {}
    for seed in range(args.seeds):
        init = make_model(seed)
        for lr in LRS:
            for method in ("GD", "SGD"):
                model = copy.deepcopy(init)
                if method == "GD":
                    points, finite = run_gd(model, data, lr, args.gd_steps, args.every, seed, args.quiet)
                    if seed == 0:
                        curves[lr] = points
                else:
                    finite = run_sgd(model, data, lr, args.sgd_epochs, args.batch, seed, args.quiet)
                rec = {"finite": finite}
                if finite:
                    p = final_check(model, data, lr, seed)
                    s = p.stability
                    rec.update(loss=p.loss, lam=p.top_eigenvalue, lam_verdict=s.sharpness.verdict, tr=p.trace,
                               tr_low=s.trace.low, tr_high=s.trace.high, tr_verdict=s.trace.verdict,
                               acc=accuracy(model, xte, yte))
                rows.setdefault((method, lr), []).append(rec)

    def cell(recs, key, fmt="{:.3g}"):
        vals = [r[key] for r in recs if r["finite"]]
        if not vals:
            return "diverged"
        mean = sum(vals) / len(vals)
        return fmt.format(mean) + (f" [{fmt.format(min(vals))}, {fmt.format(max(vals))}]" if len(vals) > 1 else "")

    lines = ["# Dynamical stability on MNIST-1D: GD and SGD against 2/lr", "", machine_line(), "",
             f"MLP 40-64-64-10 (tanh), 4000 training samples; GD {args.gd_steps} full-batch steps, SGD "
             f"{args.sgd_epochs} epochs of batch {args.batch}; {args.seeds} seeds (mean [min, max]); λ_max and "
             "tr(H) of the full training loss at the end.", "",
             "| method | lr | 2/lr | λ_max(H) | λ_max verdict | tr(H) | tr verdict | train loss | test acc |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (method, lr), recs in rows.items():
        verdicts = lambda key: "/".join(sorted({r[key] for r in recs if r["finite"]})) or "-"  # noqa: E731
        lines.append(f"| {method} | {lr} | {2 / lr:.3g} | {cell(recs, 'lam')} | {verdicts('lam_verdict')} | "
                     f"{cell(recs, 'tr')} | {verdicts('tr_verdict')} | {cell(recs, 'loss')} | "
                     f"{cell(recs, 'acc', '{:.3f}')} |")
    lines += ["", f"Total {time.perf_counter() - start:.0f} s.", ""]
    png, plt = write_markdown(lines, args.out)

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    grid = [min(LRS) / 1.3, max(LRS) * 1.3]
    for ax, key, title in ((axes[0], "lam", "λ_max(H) at the end"), (axes[1], "tr", "tr(H) at the end")):
        for method, marker in (("GD", "o"), ("SGD", "s")):
            pts = [(lr, r[key]) for (m, lr), recs in rows.items() if m == method for r in recs if r["finite"]]
            ax.loglog(*zip(*pts), marker, label=method, alpha=0.8)
        ax.loglog(grid, [2 / g for g in grid], "k--", label="2/lr")
        ax.set_xlabel("learning rate")
        ax.set_title(title)
        ax.legend()
    ax = axes[2]
    for i, (lr, points) in enumerate(sorted(curves.items())):
        color = f"C{i}"
        ax.semilogy([p.step for p in points], [p.top_eigenvalue for p in points], color=color, label=f"lr {lr}")
        ax.axhline(2 / lr, color=color, ls="--", lw=0.8)
    ax.set_xlabel("GD step")
    ax.set_title("GD: λ_max(H) during training (dashed: 2/lr), seed 0")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    print(f"wrote {args.out}.md and {png}")


if __name__ == "__main__":
    main()
