"""Hyper-parameter robustness of sub-sampled TR and ARC against SGD-momentum and Adam (small scale).

Xu, Roosta & Mahoney ("Second-order optimization for non-convex machine learning: an empirical
study", SDM 2020) report that trust region (TR) and adaptive cubic regularization (ARC) with the
full gradient and a 5% uniformly sub-sampled Hessian are competitive with hand-tuned SGD with
momentum, are highly robust to their hyper-parameter (the initial radius or sigma, over orders of
magnitude), and escape the flat region / saddle of a zero initialization where SGD stalls.

Here, two problems:

* ``nls``: their non-linear least squares, a sigmoid binary classifier with the squared loss
  ``mean (y - sigmoid(a^T w))^2`` on scikit-learn ``load_digits`` (1797 samples, label digit >= 5,
  64 pixels scaled to [0, 1] plus a bias column, 65 parameters, float64);
* ``mlp``: 40-128-10, sigmoid hidden layer, softmax cross-entropy, on MNIST-1D (4000 training
  sequences generated offline; 6538 parameters, float32); test accuracy on its 1000 test sequences.

Methods, each over a grid of its one parameter spanning five orders of magnitude:
``TrustRegion`` (radius Δ0), ``CubicRegularization`` (σ0), both at ``hessian_fraction=0.05`` and
library defaults otherwise (the authors' η1 0.8, η2 1e-4, γ1 2, γ2 1.2, CG-Steihaug from a random
start / Lanczos from a perturbed gradient); SGD with momentum 0.9 and Adam (default betas) with a
constant lr, mini-batches of 5% of n drawn without replacement (a new permutation each epoch).
Initializations: ``zeros`` (all parameters zero: for the MLP every hidden unit is the same, a
saddle SGD cannot leave) and ``random`` (N(0, I) divided by its norm, the authors' init 1).

Cost: propagations (the library's count: 2n per full gradient, n per trial loss, 2|S| for the
sample's graph and per Hessian-vector product; SGD/Adam 2 per sample). Each run stops at its
propagation budget; first-order runs log the full training loss once per epoch (untimed, not
counted). Reported per method and init: the fraction of grid points whose full training loss
reaches each of two fixed targets within the budget, the final losses, and the best grid point.
Wall clock is the optimizer's own time (1 thread by default: the machine is shared).

Run:  .venv/bin/python experiments/nonconvex_newton.py            # about 8 minutes on 1 thread
      .venv/bin/python experiments/nonconvex_newton.py --quick    # budgets / 4, 3-point grids
Writes experiments/results/nonconvex_newton.md and experiments/results/nonconvex_newton.png.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_line, write_markdown  # noqa: E402

from secondorder.optim import CubicRegularization, TrustRegion  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("TR", "ARC", "SGD-momentum", "Adam")
PARAM = {"TR": "Δ0", "ARC": "σ0", "SGD-momentum": "lr", "Adam": "lr"}
GRIDS = {  # five orders of magnitude each
    "TR": [1e-2, 1e-1, 1, 10, 100, 1000],
    "ARC": [1e-3, 1e-2, 1e-1, 1, 10, 100],
    "SGD-momentum": [1e-3, 1e-2, 1e-1, 1, 10, 100],
    "Adam": [1e-4, 1e-3, 1e-2, 1e-1, 1, 10],
}
QUICK_GRIDS = {k: v[::2] for k, v in GRIDS.items()}
INITS = ("zeros", "random")
FRACTION = 0.05
COLORS = {"TR": "C3", "ARC": "C1", "SGD-momentum": "C0", "Adam": "C2"}


# ---------------------------------------------------------------------------------------------
# problems
# ---------------------------------------------------------------------------------------------
@dataclass
class Problem:
    name: str
    title: str
    X: torch.Tensor
    Y: torch.Tensor
    make: Callable[[str], nn.Module]  # init name -> model
    per_sample: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
    budget: float  # propagations
    targets: tuple[float, float]  # loose, tight
    test: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def n(self) -> int:
        return len(self.X)


class Sigmoid1(nn.Module):
    """sigmoid(A w): the NLS model (the bias is a column of A)."""

    def __init__(self, d: int):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(d, dtype=torch.float64))

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(a @ self.w)


def initialize(model: nn.Module, init: str, seed: int) -> nn.Module:
    vec = nn.utils.parameters_to_vector(model.parameters())
    if init == "zeros":
        new = torch.zeros_like(vec)
    else:
        new = torch.randn(vec.shape, generator=torch.Generator().manual_seed(seed), dtype=vec.dtype)
        new /= new.norm()
    with torch.no_grad():
        nn.utils.vector_to_parameters(new, model.parameters())
    return model


def nls_problem(seed: int, budget: float) -> Problem:
    from sklearn.datasets import load_digits

    d = load_digits()
    A = torch.tensor(d.data, dtype=torch.float64) / 16.0
    A = torch.cat([A, torch.ones(len(A), 1, dtype=A.dtype)], 1)
    y = torch.tensor(d.target >= 5, dtype=torch.float64)
    return Problem("nls", "NLS sigmoid classifier, digits (n=1797, P=65)", A, y,
                   lambda init: initialize(Sigmoid1(A.shape[1]), init, seed),
                   lambda m, a, t: (t - m(a)) ** 2, budget, (0.08, 0.072))


def mlp_problem(seed: int, budget: float) -> Problem:
    from secondorder.datasets import load_mnist1d

    xtr, ytr, xte, yte = load_mnist1d()

    def make(init):
        m = nn.Sequential(nn.Linear(40, 128), nn.Sigmoid(), nn.Linear(128, 10))
        return initialize(m, init, seed)

    return Problem("mlp", "MLP 40-128-10 sigmoid, MNIST-1D (n=4000, P=6538)", xtr.squeeze(1), ytr, make,
                   lambda m, a, t: F.cross_entropy(m(a), t, reduction="none"), budget, (1.0, 0.5),
                   (xte.squeeze(1), yte))


# ---------------------------------------------------------------------------------------------
# runs
# ---------------------------------------------------------------------------------------------
@dataclass
class Run:
    method: str
    param: float
    init: str
    props: list[float] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    diverged: bool = False
    test_accuracy: float = math.nan
    note: str = ""

    @property
    def final(self) -> float:
        return math.nan if self.diverged else self.losses[-1]

    def reached(self, target: float) -> tuple[float, float] | None:
        """(propagations, optimizer seconds) when the full loss first was <= target (None: never)."""
        for p, t, v in zip(self.props, self.times, self.losses):
            if v <= target:
                return p, t
        return None


def full_loss(problem: Problem, model: nn.Module) -> float:
    with torch.no_grad():
        return float(problem.per_sample(model, problem.X, problem.Y).mean())


def newton_run(problem: Problem, method: str, param: float, init: str, seed: int) -> Run:
    model = problem.make(init)
    run = Run(method, param, init)

    def closure(indices=None):
        a, t = (problem.X, problem.Y) if indices is None else (problem.X[indices], problem.Y[indices])
        return problem.per_sample(model, a, t)

    if method == "TR":
        opt = TrustRegion(model.parameters(), radius=param, hessian_fraction=FRACTION, seed=seed)
    else:
        opt = CubicRegularization(model.parameters(), sigma=param, hessian_fraction=FRACTION, seed=seed)
    props, clock = 0.0, 0.0
    run.props, run.times, run.losses = [0.0], [0.0], [full_loss(problem, model)]
    rejected = 0
    while props < problem.budget:
        t0 = time.perf_counter()
        try:
            opt.step(closure)
        except FloatingPointError:
            run.diverged = True
            break
        clock += time.perf_counter() - t0
        step = opt.last_step
        props += step.propagations
        rejected += not step.accepted
        run.props.append(props), run.times.append(clock), run.losses.append(step.new_loss)
    run.note = f"{len(run.props) - 1} iterations, {rejected} without a step"
    finish(problem, model, run)
    return run


def first_order_run(problem: Problem, method: str, lr: float, init: str, seed: int) -> Run:
    model = problem.make(init)
    run = Run(method, lr, init)
    params = list(model.parameters())
    opt = (torch.optim.SGD(params, lr=lr, momentum=0.9) if method == "SGD-momentum"
           else torch.optim.Adam(params, lr=lr))
    n, b = problem.n, max(1, math.ceil(FRACTION * problem.n))
    gen = torch.Generator().manual_seed(seed)
    props, clock = 0.0, 0.0
    run.props, run.times, run.losses = [0.0], [0.0], [full_loss(problem, model)]
    while props < problem.budget and not run.diverged:
        order = torch.randperm(n, generator=gen)
        t0 = time.perf_counter()
        for start in range(0, n - b + 1, b):  # whole mini-batches only
            idx = order[start:start + b]
            opt.zero_grad(set_to_none=True)
            problem.per_sample(model, problem.X[idx], problem.Y[idx]).mean().backward()
            opt.step()
            props += 2 * b
        clock += time.perf_counter() - t0
        loss = full_loss(problem, model)
        run.props.append(props), run.times.append(clock), run.losses.append(loss)
        run.diverged = not math.isfinite(loss)
    finish(problem, model, run)
    return run


def finish(problem: Problem, model: nn.Module, run: Run) -> None:
    if problem.test is not None and not run.diverged:
        with torch.no_grad():
            x, y = problem.test
            run.test_accuracy = float((model(x).argmax(-1) == y).double().mean())


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------
def fmt_loss(v: float) -> str:
    return "div." if not math.isfinite(v) else f"{v:.3g}" if v >= 1e-3 else f"{v:.1e}"


def summary_rows(problem: Problem, runs: list[Run]) -> list[str]:
    lo, hi = problem.targets
    rows = []
    for init in INITS:
        for method in METHODS:
            rs = [r for r in runs if r.method == method and r.init == init]
            if not rs:
                continue
            finals = [r.final for r in rs]
            ok = [r for r in rs if not r.diverged]
            best = min(ok, key=lambda r: r.final) if ok else None
            med = statistics.median([f if math.isfinite(f) else math.inf for f in finals])
            cells = []
            for target in (lo, hi):
                hits = [r.reached(target) for r in rs]
                got = [h for h in hits if h is not None]
                cells.append(f"{len(got)}/{len(rs)}")
                cells.append(f"{statistics.median(h[0] for h in got):.2g} ({statistics.median(h[1] for h in got):.2g} s)"
                             if got else "-")
            grid = " ".join(fmt_loss(f) for f in finals)
            best_cell = f"{PARAM[method]}={best.param:g}: {fmt_loss(best.final)}" if best else "-"
            acc = "" if problem.test is None else (f" {100 * best.test_accuracy:.1f} |" if best else " - |")
            rows.append(f"| {init} | {method} | {' | '.join(cells)} | {fmt_loss(med)} | {grid} | {best_cell} |{acc}")
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problems", nargs="+", default=["nls", "mlp"], choices=["nls", "mlp"])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--nls-budget", type=float, default=1e6, help="propagations per NLS run")
    ap.add_argument("--mlp-budget", type=float, default=4e6, help="propagations per MLP run")
    ap.add_argument("--quick", action="store_true", help="budgets / 4 and every other grid point")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS / "nonconvex_newton"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    scale = 0.25 if a.quick else 1.0
    grids = QUICK_GRIDS if a.quick else GRIDS
    t_start = time.perf_counter()
    problems = {"nls": lambda: nls_problem(a.seed, a.nls_budget * scale),
                "mlp": lambda: mlp_problem(a.seed, a.mlp_budget * scale)}
    results: dict[str, tuple[Problem, list[Run]]] = {}
    for key in a.problems:
        problem = problems[key]()
        runs = []
        for init in INITS:
            for method in a.methods:
                for param in grids[method]:
                    torch.manual_seed(a.seed)
                    t0 = time.perf_counter()
                    run = (newton_run if method in ("TR", "ARC") else first_order_run)(
                        problem, method, param, init, a.seed)
                    runs.append(run)
                    print(f"{key} {init:6s} {method:12s} {PARAM[method]}={param:<6g} final {fmt_loss(run.final):>8s} "
                          f"({time.perf_counter() - t0:.1f} s{', ' + run.note if run.note else ''})", flush=True)
        results[key] = (problem, runs)
    total = time.perf_counter() - t_start

    cmd = ".venv/bin/python experiments/nonconvex_newton.py" + "".join(f" {x}" for x in sys.argv[1:])
    lines = [
        "# Hyper-parameter robustness: sub-sampled TR / ARC vs SGD-momentum / Adam (small-scale check)", "",
        f"Command: `{cmd}`  ",
        machine_line(),
        f"Setup: full gradient and a {FRACTION:.0%} uniform Hessian sample for TR (CG-Steihaug, random start) and "
        f"ARC (Lanczos), library defaults otherwise; SGD (momentum 0.9) and Adam with constant lr and "
        f"mini-batches of {FRACTION:.0%} of n; seed {a.seed}; {a.threads} thread(s). Grids: "
        + "; ".join(f"{m} {PARAM[m]} ∈ {{{', '.join(f'{v:g}' for v in grids[m])}}}" for m in a.methods)
        + ". Budgets (propagations: 2n per full gradient, n per trial loss, 2|S| per sample graph and Hessian "
        "product, 2 per SGD/Adam sample): "
        + ", ".join(f"{k} {results[k][0].budget:.2g}" for k in results)
        + ". 'reach L' = grid points whose full training loss reached L within the budget, and the median "
        "propagations (optimizer seconds) they needed; 'div.' = non-finite loss.  ",
        f"Total runtime: {total:.0f} s", "",
    ]
    for problem, runs in results.values():
        lo, hi = problem.targets
        acc_head, acc_sep = (" test acc. of best (%) |", "---|") if problem.test is not None else ("", "")
        lines += [
            f"## {problem.title}", "",
            f"| init | method | reach {lo:g} | props (s) | reach {hi:g} | props (s) | median final | final loss per grid point "
            f"(ascending {'/'.join(sorted({PARAM[m] for m in a.methods}))}) | best grid point |{acc_head}",
            f"|---|---|---|---|---|---|---|---|---|{acc_sep}",
        ] + summary_rows(problem, runs) + [""]
    png, plt = write_markdown(lines, a.out)

    keys = list(results)
    fig, axes = plt.subplots(2, 2 * len(keys), figsize=(5.2 * len(keys) * 2, 8.4), squeeze=False)
    for col, (key, init) in enumerate((k, i) for k in keys for i in INITS):
        problem, runs = results[key]
        for row, attr in enumerate(("props", "times")):
            ax = axes[row][col]
            for method in a.methods:
                rs = [r for r in runs if r.method == method and r.init == init]
                for j, r in enumerate(rs):
                    shade = 0.35 + 0.65 * j / max(1, len(rs) - 1)
                    ax.plot(getattr(r, attr)[1:], r.losses[1:], color=COLORS[method], alpha=shade, lw=1.0,
                            label=f"{method} ({PARAM[method]} light→dark ascending)" if j == 0 else None)
            for target in problem.targets:
                ax.axhline(target, color="k", lw=0.6, ls=":")
            ax.set_xscale("log"); ax.set_yscale("log")
            ax.set_xlabel("propagations" if attr == "props" else "optimizer wall-clock (s)")
            ax.set_ylabel("full training loss")
            ax.set_title(f"{key}, init {init}", fontsize=10)
            lossmax = max(r.losses[0] for r in runs) * 1.5
            ax.set_ylim(top=lossmax)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout(); fig.savefig(png, dpi=110)
    print(f"wrote {png.with_suffix('.md')} and {png}")


if __name__ == "__main__":
    main()
