"""Newton-MR on small tanh autoencoders from (almost) the origin, against TR, SGD and GD (small scale).

Liu & Roosta (non-convex Newton-MR, arXiv 2208.07095; MINRES-NPC, arXiv 2206.05732) train deep
tanh autoencoders from N(0, 1) / 1e8, essentially the origin, a saddle point: MINRES detects the
non-positive curvature there, the step follows the residual with a forward (expanding) line
search, and the method leaves the saddle in a few iterations and then converges with few oracle
calls, where gradient descent shows a long plateau.

Here: ``load_digits`` (1797 images, 64 pixels scaled to [0, 1]), float64, tanh after every layer
but the last; per-sample loss the mean squared reconstruction error over the 64 pixels (the
code's ``nn.MSELoss``) plus the code's non-convex regularizer ``lam * sum(x^2 / (1 + x^2))`` over
the parameters, with lam = 1e-5 (with the code's 1e-3 the penalty can reach lam * P = 2.4, 33x the
error of the mean image, which is then close to the regularized optimum; ``--lam``). Three configurations:

* ``deep``: 64-16-8-16-64 (2408 parameters) from N(0, 1) / 1e8, the code's init. With four weight
  layers the gradient in the weights is a product of three other layers' weights (~1e-24) and the
  Hessian ~1e-16: a degenerate, higher-order saddle;
* ``shallow``: 64-8-64 (1096 parameters) from N(0, 1) / 1e8: a strict saddle (the weight-weight
  block of the Hessian is the data covariance, of order 1);
* ``deep-1e-1``: 64-16-8-16-64 from N(0, 1) / 10.

Methods: ``NewtonMR`` (library defaults: inexactness 1e-2, Armijo 1e-4, MINRES at most 200
iterations) with the full Hessian (the Newton-MR code's default) and a 5% sample (the library
default); ``TrustRegion`` with Δ0 = 1 (the Newton-MR code's TR driver; library defaults otherwise,
including the random CG start of norm 0.99Δ), full Hessian and 5%; SGD with momentum 0.9
(mini-batch 5%) and plain full-batch gradient descent, each at three lrs.

x-axis: propagations / n = the Newton-MR code's "oracle calls" (2 per gradient, 1 per function
value, 2|S|/n per Hessian sample graph and per Hessian-vector product). Every run stops at the
same budget. Logged for Newton-MR: the exit of every MINRES run (``last_step.exit``) and the step
sizes of its negative-curvature (NPC) steps. The table gives the final loss relative to the loss
of the mean image (the plateau at the origin; PCA with the code size as the linear reference)
and the oracle calls to reach two fixed relative losses.

Run:  .venv/bin/python experiments/newton_mr_autoencoder.py          # about 3 minutes on 1 thread
      .venv/bin/python experiments/newton_mr_autoencoder.py --quick  # budget / 4
Writes experiments/results/newton_mr_autoencoder.md and experiments/results/newton_mr_autoencoder.png.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_line, write_markdown  # noqa: E402

from secondorder.optim import NewtonMR, TrustRegion  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
CONFIGS = {  # name: (widths, init divisor)
    "deep": ((64, 16, 8, 16, 64), 1e8),
    "shallow": ((64, 8, 64), 1e8),
    "deep-1e-1": ((64, 16, 8, 16, 64), 10.0),
}
LAMBDA = 1e-5
FRACTION = 0.05
SGD_LRS = (0.1, 1.0, 10.0)
GD_LRS = (1.0, 10.0, 100.0)
TARGETS = (0.5, 0.35)  # relative losses (loss / loss of the mean image)


def autoencoder(widths) -> nn.Module:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers).double()


def make_model(widths, zoom: float, seed: int) -> nn.Module:
    model = autoencoder(widths)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) / zoom)
    return model


def per_sample(model: nn.Module, x: torch.Tensor, lam: float) -> torch.Tensor:
    """Reconstruction error of each image (mean over pixels) plus the regularizer (so their mean is F)."""
    reg = lam * sum((p**2 / (1 + p**2)).sum() for p in model.parameters())
    return ((model(x) - x) ** 2).mean(1) + reg


@dataclass
class Run:
    label: str
    color: tuple | str
    calls: list[float] = field(default_factory=list)  # propagations / n
    times: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    iterations: int = 0
    exits: Counter = field(default_factory=Counter)
    npc_steps: list[tuple[int, float]] = field(default_factory=list)  # (iteration, step size)
    no_step: int = 0
    diverged: bool = False


def full_loss(model: nn.Module, X: torch.Tensor, lam: float) -> float:
    with torch.no_grad():
        return float(per_sample(model, X, lam).mean())


def newton_run(label, color, make_opt, model, X, lam, budget) -> Run:
    opt = make_opt(model.parameters())
    run = Run(label, color, [0.0], [0.0], [full_loss(model, X, lam)])

    def closure(indices=None):
        return per_sample(model, X if indices is None else X[indices], lam)

    props, clock, n = 0.0, 0.0, len(X)
    while props < budget * n:
        t0 = time.perf_counter()
        try:
            opt.step(closure)
        except FloatingPointError:
            run.diverged = True
            break
        clock += time.perf_counter() - t0
        s = opt.last_step
        props += s.propagations
        run.iterations += 1
        run.exits[s.exit] += 1
        run.no_step += not s.accepted
        if isinstance(opt, NewtonMR) and s.exit == "negative curvature":
            run.npc_steps.append((run.iterations, s.step_size))
        run.calls.append(props / n), run.times.append(clock), run.losses.append(s.new_loss)
    return run


def first_order_run(label, color, lr, batch, model, X, lam, budget, seed) -> Run:
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9 if batch < len(X) else 0.0)
    run = Run(label, color, [0.0], [0.0], [full_loss(model, X, lam)])
    gen = torch.Generator().manual_seed(seed)
    n, props, clock = len(X), 0.0, 0.0
    per_log = n // batch if batch < n else 20  # SGD: log once per epoch; GD: every 20 steps
    while props < budget * n and not run.diverged:
        order = torch.randperm(n, generator=gen)
        t0 = time.perf_counter()
        steps = 0
        while steps < per_log and props < budget * n:
            x = X[order[steps * batch:(steps + 1) * batch]] if batch < n else X
            opt.zero_grad(set_to_none=True)
            per_sample(model, x, lam).mean().backward()
            opt.step()
            props += 2 * batch
            steps += 1
        clock += time.perf_counter() - t0
        run.iterations += steps
        loss = full_loss(model, X, lam)
        run.calls.append(props / n), run.times.append(clock), run.losses.append(loss)
        run.diverged = not math.isfinite(loss)
    return run


def pca_loss(X: torch.Tensor, k: int) -> float:
    s = torch.linalg.svdvals(X - X.mean(0))
    return float((s[k:] ** 2).sum() / X.numel())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--budget", type=float, default=1500.0, help="oracle calls (propagations / n) per run")
    ap.add_argument("--quick", action="store_true", help="budget / 4")
    ap.add_argument("--lam", type=float, default=LAMBDA, help="weight of the non-convex regularizer")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS / "newton_mr_autoencoder"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    budget = a.budget / 4 if a.quick else a.budget
    from sklearn.datasets import load_digits

    X = torch.tensor(load_digits().data, dtype=torch.float64) / 16.0
    n, b = len(X), math.ceil(FRACTION * len(X))
    plateau = float(((X - X.mean(0)) ** 2).mean())  # loss of the mean image (regularizer ~0 at the origin)
    t_start = time.perf_counter()
    newton = [
        ("Newton-MR, full Hessian", "C3", lambda p: NewtonMR(p, hessian_fraction=1.0, seed=a.seed)),
        (f"Newton-MR, {FRACTION:.0%} Hessian", "C1", lambda p: NewtonMR(p, hessian_fraction=FRACTION, seed=a.seed)),
        ("TR Δ0=1, full Hessian", "C4", lambda p: TrustRegion(p, radius=1.0, hessian_fraction=1.0, seed=a.seed)),
        (f"TR Δ0=1, {FRACTION:.0%} Hessian", "C6",
         lambda p: TrustRegion(p, radius=1.0, hessian_fraction=FRACTION, seed=a.seed)),
    ]
    results: dict[str, list[Run]] = {}
    for key in a.configs:
        widths, zoom = CONFIGS[key]
        model = lambda: make_model(widths, zoom, a.seed)  # noqa: E731 - the same start for every method
        runs: list[Run] = []
        for label, color, make in newton:
            runs.append(newton_run(label, color, make, model(), X, a.lam, budget))
        for lr, shade in zip(SGD_LRS, (0.35, 0.65, 1.0)):
            runs.append(first_order_run(f"SGD-momentum lr={lr:g}", (0.12, 0.47, 0.71, shade), lr, b, model(), X,
                                        a.lam, budget, a.seed))
        for lr, shade in zip(GD_LRS, (0.35, 0.65, 1.0)):
            runs.append(first_order_run(f"GD lr={lr:g}", (0.17, 0.63, 0.17, shade), lr, n, model(), X, a.lam,
                                        budget, a.seed))
        for r in runs:
            print(f"{key} {r.label}: relative loss {r.losses[-1] / plateau:.3f}, {r.iterations} iterations"
                  + (f", {len(r.npc_steps)} NPC steps" if r.npc_steps else ""), flush=True)
        results[key] = runs
    total = time.perf_counter() - t_start

    def reach(run: Run, rel: float) -> str:
        for c, t, v in zip(run.calls, run.times, run.losses):
            if v <= rel * plateau:
                return f"{c:.0f} ({t:.2g} s)"
        return "-"

    cmd = ".venv/bin/python experiments/newton_mr_autoencoder.py" + "".join(f" {x}" for x in sys.argv[1:])
    lines = [
        "# Newton-MR on tanh autoencoders from the origin (small-scale check)", "",
        f"Command: `{cmd}`  ",
        machine_line(),
        f"Setup: `load_digits` (n = {n}, pixels / 16), tanh autoencoders (linear output), float64; loss = mean "
        f"squared reconstruction error + {a.lam:g}·Σ x²/(1+x²); seed {a.seed}; {a.threads} thread(s). Budget "
        f"{budget:g} oracle calls (propagations / n: 2 per gradient, 1 per function value, 2|S|/n per Hessian "
        f"sample graph and product) per run. Newton-MR and TR: library defaults (TR Δ0 = 1); SGD: momentum 0.9, "
        f"batch {b}; GD: full batch, no momentum. Relative loss = loss / {plateau:.4f} (the loss of the mean "
        f"image, where every run starts its plateau); the best linear code (PCA) with 8 components has "
        f"relative loss {pca_loss(X, 8) / plateau:.3f}. 'calls to L' = oracle calls (optimizer seconds) until "
        f"the relative loss is <= L; NPC = MINRES exit 'negative curvature'.  ",
        f"Total runtime: {total:.0f} s", "",
    ]
    for key, runs in results.items():
        widths, zoom = CONFIGS[key]
        P = sum(p.numel() for p in autoencoder(widths).parameters())
        lines += [
            f"## `{key}`: {'-'.join(map(str, widths))} (P = {P}) from N(0,1)/{zoom:g}", "",
            f"| method | iterations | relative loss: start → final | calls to {TARGETS[0]:g} | calls to {TARGETS[1]:g} "
            "| sub-problem exits | Newton-MR NPC steps: count, first 5 (iteration, step size) |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in runs:
            exits = ", ".join(f"{k} {v}" for k, v in r.exits.most_common()) or "-"
            npc = ""
            if "Newton-MR" in r.label:
                npc = f"{len(r.npc_steps)}: " + " ".join(f"({i}, {s:.2g})" for i, s in r.npc_steps[:5])
            final = "diverged" if r.diverged else f"{r.losses[-1] / plateau:.3f}"
            note = f" ({r.no_step} without a step)" if r.no_step else ""
            lines.append(f"| {r.label} | {r.iterations}{note} | {r.losses[0] / plateau:.3f} → {final} "
                         f"| {reach(r, TARGETS[0])} | {reach(r, TARGETS[1])} | {exits} | {npc} |")
        lines.append("")
    png, plt = write_markdown(lines, a.out)
    fig, axes = plt.subplots(2, len(results), figsize=(5.4 * len(results), 8.4), squeeze=False)
    for col, (key, runs) in enumerate(results.items()):
        for row, attr, xlabel in ((0, "calls", "oracle calls (propagations / n)"), (1, "times", "optimizer seconds")):
            ax = axes[row][col]
            for r in runs:
                ys = [v / plateau for v in r.losses]
                ax.plot(getattr(r, attr)[1:], ys[1:], color=r.color, lw=1.3, label=r.label)
                if r.npc_steps:
                    marks = [i for i, _ in r.npc_steps]
                    ax.plot([getattr(r, attr)[i] for i in marks], [ys[i] for i in marks], "v", color=r.color, ms=3)
            ax.axhline(pca_loss(X, 8) / plateau, color="k", lw=0.7, ls="--", label="PCA, 8 components")
            ax.set_xscale("log"); ax.set_yscale("log"); ax.set_xlabel(xlabel)
            ax.set_ylabel("loss / loss of the mean image")
            ax.set_ylim(0.2, 1.2 * max(r.losses[0] for r in runs) / plateau)
            widths, zoom = CONFIGS[key]
            ax.set_title(f"{key}: {'-'.join(map(str, widths))}, init N(0,1)/{zoom:g}  (▼ NPC step)", fontsize=9)
    axes[1][-1].legend(fontsize=7)
    fig.tight_layout(); fig.savefig(png, dpi=110)
    print(f"wrote {png.with_suffix('.md')} and {png}")


if __name__ == "__main__":
    main()
