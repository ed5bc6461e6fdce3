r"""Top Hessian eigenvalue and maximal stable learning rate against the batch size (issue 18; research note §7:
Granziol, Zohren & Roberts, "Learning rates as a function of batch size", JMLR 2022), small-scale check.

The paper models the mini-batch Hessian as the full one plus noise of variance ~ 1/B, which pushes its top
eigenvalue up by ~ 1/B; SGD being stable up to ~ 2 / lambda_max(H_B), its maximal learning rate then grows
linearly in B while the noise dominates and saturates at large B; for Adam it derives sqrt(B).

Protocol (``secondorder.analysis.batch_scaling``, every default of the API unless named):

* Data: scikit-learn ``load_digits`` (8x8 images / 16, flattened), the seeded 80 % training split (1437
  samples); the curvature and the training runs use only these. Model: MLP 64-128-10 (ReLU, 9.7k
  parameters), as in experiments/mfac_optimizer.py.
* Two states per seed: the **initialisation** (torch's default init, seeded) and the **checkpoint** after
  ``--epochs`` (5) epochs of SGD from it (lr 0.05, momentum 0.9, batch 32, seeded order).
* At each state, for B in {8, 16, ..., 512}: the top eigenvalue (Lanczos, certified residual) of the
  Hessian of the mean cross-entropy on 10 random mini-batches of B distinct samples (mean +- stderr), and
  of the full 1437-sample Hessian; the weighted fit lambda_B = c + a (1/B - 1/n) with c free and with c
  fixed at the full value (the 1/n is the finite-population correction of sampling without replacement;
  at n = 1437 it matters at B = 512).
* Maximal stable learning rate for plain SGD (no momentum) and Adam (torch defaults) at each B: 200 steps
  from the state (a deep copy) on fresh random batches of B (the same sequence at every lr), diverged =
  a non-finite batch loss or the loss over the 1437 samples above 2x its initial value (checked every 10
  steps); the boundary is bracketed by factors of 4 and bisected on log lr to 5 %. Fits lr_max ~ B^p over
  all B and over the smaller half (8..64).
* Seeds 0..``--seeds``-1 change the initialisation, the training, the mini-batches and the lr runs' batch
  sequences; tables give the mean over seeds and the per-seed range.

Writes ``experiments/results/batch_scaling.md`` and ``.png``.

    OMP_NUM_THREADS=1 .venv/bin/python experiments/batch_scaling.py    # about 4-6 minutes on 2 busy cores
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import time

import torch
import torch.nn.functional as F
from common import machine_line, write_markdown
from torch import nn

from secondorder.analysis import batch_scaling

SIZES = (8, 16, 32, 64, 128, 256, 512)
STATES = ("checkpoint", "initialisation")


def load_digits_split(seed: int = 0):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.as_tensor(d.data / 16.0, dtype=torch.float32)
    y = torch.as_tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_tr = int(0.8 * len(x))
    return x[perm[:n_tr]], y[perm[:n_tr]], x[perm[n_tr:]], y[perm[n_tr:]]


def states(seed: int, epochs: int, x, y, xte, yte):
    torch.manual_seed(seed)
    init = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    model = copy.deepcopy(init)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), 32):
            idx = perm[i:i + 32]
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    with torch.no_grad():
        acc = float((model(xte).argmax(-1) == yte).float().mean())
        loss = float(F.cross_entropy(model(x), y))
    for p in model.parameters():
        p.grad = None
    return {"checkpoint": model, "initialisation": init}, acc, loss


def gmean(values):
    return math.exp(sum(math.log(v) for v in values) / len(values))


def spread(values, fmt="{:.3g}"):
    return f"{fmt.format(statistics.mean(values))} ({fmt.format(min(values))}–{fmt.format(max(values))})"


def pm(values, digits=2):
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {sd:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--num-batches", type=int, default=10)
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--out", default="experiments/results/batch_scaling")
    a = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    x, y, xte, yte = load_digits_split(0)
    res: dict = {s: [] for s in STATES}
    accs, losses = [], []
    for seed in range(a.seeds):
        models, acc, loss = states(seed, a.epochs, x, y, xte, yte)
        accs.append(acc)
        losses.append(loss)
        for state in STATES:
            t = time.perf_counter()
            r = batch_scaling(models[state], F.cross_entropy, (x, y), SIZES, num_batches=a.num_batches,
                              steps=a.steps, seed=seed, progress=not a.quiet)
            res[state].append(r)
            print(f"seed {seed} {state}: {time.perf_counter() - t:.0f} s, lambda_full {r.full:.3f}, "
                  f"R2 {r.fit.r_squared:.3f}/{r.fit_fixed.r_squared:.3f}, p_sgd {r.lr_of('sgd').fit.exponent:.2f}, "
                  f"p_adam {r.lr_of('adam').fit.exponent:.2f}", flush=True)
    seconds = time.perf_counter() - start
    n, seeds = len(x), a.seeds

    lines = ["# Top Hessian eigenvalue and maximal stable learning rate against the batch size", "",
             machine_line(),
             f"digits (load_digits, {n} training samples), MLP 64-128-10 ({res[STATES[0]][0].num_parameters} "
             f"parameters); checkpoint = {a.epochs} epochs of SGD (lr 0.05, momentum 0.9, batch 32): test accuracy "
             f"{spread([100 * v for v in accs], '{:.1f}')} %, training loss {spread(losses)}; {seeds} seeds "
             f"(mean, and range over seeds, in parentheses); {a.num_batches} mini-batches per B; lr runs "
             f"{a.steps} steps, diverged = non-finite loss or the training-set loss above 2x its initial value, "
             f"bisection to 5 %. Total {seconds / 60:.1f} min.", ""]
    verdict_rows = {}
    for state in STATES:
        rs = res[state]
        lines += [f"## At the {state}", "",
                  "λ_B = mean top eigenvalue of 10 mini-batch Hessians (± its stderr, seed 0); ratio = λ_B / λ_full; "
                  "lr_max = maximal stable learning rate (geometric mean over seeds, range); 2/λ_B = SGD's edge "
                  "predicted from the mini-batch eigenvalue (seed mean).", "",
                  "| B | λ_B (seed 0) | λ_B / λ_full | lr_max SGD | 2 / λ_B | lr_max SGD × λ_B / 2 | lr_max Adam |",
                  "|---:|---:|---:|---:|---:|---:|---:|"]
        for i, B in enumerate(SIZES):
            p0 = rs[0].eigenvalues[i]
            ratio = [r.eigenvalues[i].mean / r.full for r in rs]
            sgd = [r.lr_of("sgd").points[i].lr for r in rs]
            adam = [r.lr_of("adam").points[i].lr for r in rs]
            edge = [2 / r.eigenvalues[i].mean for r in rs]
            over = [s / e for s, e in zip(sgd, edge)]
            lines.append(f"| {B} | {p0.mean:.3f} ± {p0.stderr:.3f} | {spread(ratio)} | "
                         f"{gmean(sgd):.3g} ({min(sgd):.3g}–{max(sgd):.3g}) | {statistics.mean(edge):.3g} | "
                         f"{spread(over)} | {gmean(adam):.3g} ({min(adam):.3g}–{max(adam):.3g}) |")
        full = [r.full for r in rs]
        lines.append(f"| full ({n}) | {rs[0].full:.3f} | 1 | | {statistics.mean([2 / v for v in full]):.3g} | | |")
        lines += ["", "| seed | λ_full | fit c free: c ± se (z vs λ_full) | a ± se | R² | χ²/dof | c = λ_full: a ± se | "
                  "R² | χ²/dof |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for seed, r in enumerate(rs):
            f, g = r.fit, r.fit_fixed
            lines.append(f"| {seed} | {r.full:.3f} | {f.intercept:.3f} ± {f.intercept_stderr:.3f} ({r.intercept_z:+.1f})"
                         f" | {f.slope:.3g} ± {f.slope_stderr:.2g} | {f.r_squared:.3f} | {f.chi2 / f.dof:.2f} | "
                         f"{g.slope:.3g} ± {g.slope_stderr:.2g} | {g.r_squared:.3f} | {g.chi2 / g.dof:.2f} |")
        p = {(o, k): [getattr(r.lr_of(o), k).exponent for r in rs] for o in ("sgd", "adam") for k in ("fit", "fit_small")}
        lines += ["", "Fitted exponent p of lr_max ∝ B^p, mean ± sd over seeds (per seed in brackets):", "",
                  "| optimizer | p over B = 8..512 | p over B = 8..64 | paper |", "|---|---:|---:|---|"]
        for o, paper in (("sgd", "1 at small B, then saturating"), ("adam", "0.5")):
            lines.append(f"| {o} | {pm(p[o, 'fit'])} [{', '.join(f'{v:.2f}' for v in p[o, 'fit'])}] | "
                         f"{pm(p[o, 'fit_small'])} [{', '.join(f'{v:.2f}' for v in p[o, 'fit_small'])}] | {paper} |")
        unbracketed = sum(not pt.bracketed for r in rs for s in r.lr for pt in s.points)
        trials = [len(pt.trials) for r in rs for s in r.lr for pt in s.points]
        lines += ["", f"{unbracketed} of {len(trials)} searches not bracketed; {min(trials)}–{max(trials)} trials "
                      f"each; {sum(r.num_matvecs for r in rs)} Hessian-vector products in all.", ""]
        decreasing = sum(all(r.eigenvalues[i].mean >= r.eigenvalues[i + 1].mean - 2 * r.eigenvalues[i + 1].stderr
                             for i in range(len(SIZES) - 1)) for r in rs)
        verdict_rows[state] = {
            "r2": [r.fit.r_squared for r in rs], "r2_fixed": [r.fit_fixed.r_squared for r in rs],
            "z": [r.intercept_z for r in rs], "decreasing": decreasing,
            "ratio8": [r.eigenvalues[0].mean / r.full for r in rs], "ratio512": [r.eigenvalues[-1].mean / r.full for r in rs],
            "p": p,
            "over": [r.lr_of("sgd").points[i].lr * r.eigenvalues[i].mean / 2 for r in rs for i in range(len(SIZES))],
            "sat": [r.lr_of("sgd").points[-1].lr / r.lr_of("sgd").points[-3].lr for r in rs],
        }

    lines += ["## Verdict (numbers; the discussion is in experiments/README.md)", ""]
    for state in STATES:
        v = verdict_rows[state]
        lines += [f"- **{state}**: λ_8 / λ_full = {spread(v['ratio8'])}, λ_512 / λ_full = {spread(v['ratio512'])}; "
                  f"λ_B non-increasing in B (within 2 stderr) on {v['decreasing']} of {seeds} seeds; R² of the 1/B fit "
                  f"(c free) {spread(v['r2'])}, > 0.9 on {sum(r > 0.9 for r in v['r2'])} of {seeds} seeds; c fixed at "
                  f"λ_full {spread(v['r2_fixed'])}; free intercept minus λ_full in stderrs: "
                  f"{', '.join(f'{z:+.1f}' for z in v['z'])}. p(SGD) {pm(v['p']['sgd', 'fit'])} over 8..512, "
                  f"{pm(v['p']['sgd', 'fit_small'])} over 8..64; lr_max(512) / lr_max(128) for SGD {spread(v['sat'])}; "
                  f"SGD's lr_max × λ_B / 2 = {min(v['over']):.2f}–{max(v['over']):.2f}; p(Adam) "
                  f"{pm(v['p']['adam', 'fit'])} over 8..512, {pm(v['p']['adam', 'fit_small'])} over 8..64."]
    lines += ["", "![batch scaling](batch_scaling.png)", ""]
    png, plt = write_markdown(lines, a.out)

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.4))
    for k, state in enumerate(STATES):
        for seed, r in enumerate(res[state]):
            ax = axes[0]
            ratio = [p.mean / r.full for p in r.eigenvalues]
            err = [p.stderr / r.full for p in r.eigenvalues]
            ax.errorbar(SIZES, ratio, yerr=err, fmt="o" if k == 0 else "s", color=f"C{k}", alpha=0.8, capsize=2,
                        label=f"{state} (R² {', '.join(f'{q.fit.r_squared:.2f}' for q in res[state])})"
                        if seed == 0 else None)
            grid = [2 ** (3 + j / 10) for j in range(61)]
            ax.plot(grid, [r.fit.predict(b) / r.full for b in grid], "-", color=f"C{k}", lw=0.8, alpha=0.7)
            ax2 = axes[1 + k]
            for j, o in enumerate(("sgd", "adam")):
                s = r.lr_of(o)
                ax2.plot(SIZES, s.lrs, "o-", color=f"C{2 + j}", alpha=0.7, ms=4,
                         label=f"{o}: p = {pm(verdict_rows[state]['p'][o, 'fit'])} (8..64: "
                               f"{pm(verdict_rows[state]['p'][o, 'fit_small'])})" if seed == 0 else None)
            ax2.plot(SIZES, [2 / p.mean for p in r.eigenvalues], "x--", color="gray", lw=0.8,
                     label="2 / λ_B" if seed == 0 else None)
            ax2.axhline(2 / r.full, color="gray", ls=":", lw=0.6)
    axes[0].axhline(1, color="gray", ls=":", lw=0.8)
    axes[0].set_xscale("log", base=2)
    axes[0].set_xlabel("batch size B")
    axes[0].set_ylabel("λ_B / λ_full")
    axes[0].set_title("top mini-batch Hessian eigenvalue (lines: c + a(1/B - 1/n) fits)", fontsize=9)
    axes[0].legend(fontsize=7)
    for k, state in enumerate(STATES):
        ax2 = axes[1 + k]
        ax2.set_xscale("log", base=2)
        ax2.set_yscale("log")
        ax2.set_xlabel("batch size B")
        ax2.set_ylabel("max stable learning rate")
        ax2.set_title(f"from the {state} ({a.steps} steps; dotted: 2 / λ_full)", fontsize=9)
        ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    print(f"wrote {a.out}.md and {png}")


if __name__ == "__main__":
    main()
