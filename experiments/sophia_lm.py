"""Sophia vs AdamW on a tiny character-level transformer LM (small-scale check of the Sophia paper).

Sophia (Liu et al., ICLR 2024) claims ~2x fewer steps than AdamW to reach the same validation
loss on GPT-2 pre-training. Here: the 2-layer char-LM of ``charlm.py`` on ``pydoc_data.topics``,
AdamW (lr 1e-3, wd 0.1, betas (0.9, 0.95)) against SophiaG and SophiaH (k = 10, wd 0.2, lr and
rho picked from {3e-4, 1e-3} x {0.03, 0.05} on seed 0 by final validation loss), same number of
steps, constant lr (no warm-up or decay), 2 seeds. Reports steps to reach a target validation loss
(the loss mean AdamW reaches at 80% of the budget), final validation loss and the mean clip
fraction over the last 50 steps.

Run:  .venv/bin/python experiments/sophia_lm.py
      (wider grid: ... --lrs 1e-4 3e-4 --rhos 0.03 0.1 --out experiments/results/sophia_lm_wide)
Writes experiments/results/sophia_lm.md and experiments/results/sophia_lm.png.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from charlm import BATCH, CONTEXT, CharData, CharLM, evaluate, lm_loss  # noqa: E402
from common import machine_line, train_step, write_markdown  # noqa: E402

from secondorder.optim.sophia import SophiaG, SophiaH  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def make_opt(name, params, lr, rho, seed):
    if name == "AdamW":
        return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95))
    cls = SophiaG if name == "SophiaG" else SophiaH
    return cls(params, lr=lr, rho=rho, curvature_every=10, weight_decay=0.2, seed=seed)


def train(name, data, seed, steps, eval_every, lr=None, rho=None):
    torch.manual_seed(seed)
    model = CharLM(data.vocab)
    opt = make_opt(name, model.parameters(), lr, rho, seed)
    gen = torch.Generator().manual_seed(seed)
    curve, clips, diverged, t0 = [(0, evaluate(model, data))], [], False, time.perf_counter()
    for step in range(1, steps + 1):
        x, y = data.batch(gen)
        try:
            if name == "SophiaG":
                def closure():
                    logits = model(x)
                    return lm_loss(logits, y), logits
                loss = opt.step(closure)
            else:
                loss = train_step(opt, name != "AdamW", lambda: lm_loss(model(x), y))
            if name != "AdamW":
                clips.append(opt.clip_fraction)
        except (FloatingPointError, ValueError):
            diverged = True
            break
        if not math.isfinite(float(loss.detach())):
            diverged = True
            break
        if step % eval_every == 0:
            curve.append((step, evaluate(model, data)))
    return dict(curve=curve, final=curve[-1][1] if not diverged else float("nan"), diverged=diverged,
                clip=statistics.mean(clips[-50:]) if clips else float("nan"), time=time.perf_counter() - t0)


def fmt(r):
    return "diverged" if r["diverged"] else f"{r['final']:.4f}"


def steps_to(curve, target):
    return next((s for s, v in curve if v <= target), None)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--eval-every", type=int, default=20)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--lrs", type=float, nargs="+", default=[3e-4, 1e-3], help="Sophia lr grid")
    ap.add_argument("--rhos", type=float, nargs="+", default=[0.03, 0.05], help="Sophia rho grid")
    ap.add_argument("--out", default=str(RESULTS / "sophia_lm"))
    a = ap.parse_args()
    GRID = [(lr, rho) for lr in a.lrs for rho in a.rhos]
    torch.set_num_threads(a.threads)
    t_start = time.perf_counter()
    data = CharData()
    runs = {}  # (name, seed) -> result
    grid_rows, chosen = [], {}
    for name in ("SophiaG", "SophiaH"):
        best = None
        for lr, rho in GRID:
            r = train(name, data, 0, a.steps, a.eval_every, lr, rho)
            grid_rows.append((name, lr, rho, r))
            print(f"grid {name} lr {lr:g} rho {rho:g}: val {r['final']:.4f} clip {r['clip']:.3f} "
                  f"({r['time']:.0f} s)", flush=True)
            if not r["diverged"] and (best is None or r["final"] < best[2]["final"]):
                best = (lr, rho, r)
        chosen[name] = best[:2]
        runs[(name, 0)] = best[2]
    for seed in range(a.seeds):
        for name in ("AdamW", "SophiaG", "SophiaH"):
            if (name, seed) in runs:
                continue
            lr, rho = chosen.get(name, (None, None))
            runs[(name, seed)] = train(name, data, seed, a.steps, a.eval_every, lr, rho)
            r = runs[(name, seed)]
            print(f"seed {seed} {name}: val {r['final']:.4f} clip {r['clip']:.3f} ({r['time']:.0f} s)", flush=True)
    total = time.perf_counter() - t_start

    names = ["AdamW", "SophiaG", "SophiaH"]
    seeds = range(a.seeds)
    t80 = int(0.8 * a.steps) // a.eval_every * a.eval_every
    adam_at = [dict(runs[("AdamW", s)]["curve"])[t80] for s in seeds]
    target = statistics.mean(adam_at)
    cmd = ".venv/bin/python experiments/sophia_lm.py" + "".join(f" {x}" for x in sys.argv[1:])
    lines = [
        "# Sophia vs AdamW on a tiny character-level transformer LM (small-scale check)", "",
        f"Command: `{cmd}`  ",
        machine_line(),
        f"Setup: `pydoc_data.topics` ({data.n_chars} chars, 90/10 split, vocab {data.vocab} incl. UNK), "
        f"2-layer pre-LN transformer d_model 64, 4 heads, MLP 4x, context {CONTEXT}, batch {BATCH}, "
        f"{sum(p.numel() for p in CharLM(data.vocab).parameters())} parameters; {a.steps} steps, constant lr, "
        f"validation loss (nats/char) on 256 fixed validation windows every {a.eval_every} steps; {a.seeds} seeds. "
        f"AdamW lr 1e-3, wd 0.1, betas (0.9, 0.95); Sophia k=10, wd 0.2, betas (0.965, 0.99), (lr, rho) from "
        f"{{{', '.join(f'{x:g}' for x in a.lrs)}}} x {{{', '.join(f'{x:g}' for x in a.rhos)}}} picked on seed 0 by final validation loss "
        f"(so seed 0 is favoured for Sophia; seed 1 is the held-out check).  ",
        f"Target = mean AdamW validation loss at step {t80} (80% of the budget) = {target:.4f}.  ",
        f"Total runtime: {total:.0f} s", "",
        "| optimizer | (lr, rho) | steps to target (per seed) | final val loss (per seed) | mean final val loss "
        "| clip fraction, last 50 steps (per seed) | win rate = 1 - clip | time per run (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for n in names:
        rs = [runs[(n, s)] for s in seeds]
        st = ", ".join(str(steps_to(r["curve"], target) or f">{a.steps}") for r in rs)
        fin = ", ".join("diverged" if r["diverged"] else f"{r['final']:.4f}" for r in rs)
        ok = [r["final"] for r in rs if not r["diverged"]]
        lr_rho = "1e-3, –" if n == "AdamW" else f"{chosen[n][0]:g}, {chosen[n][1]:g}"
        clip = ", ".join("–" if math.isnan(r["clip"]) else f"{r['clip']:.3f}" for r in rs)
        win = ", ".join("–" if math.isnan(r["clip"]) else f"{1 - r['clip']:.3f}" for r in rs)
        lines.append(f"| {n} | {lr_rho} | {st} | {fin} | {statistics.mean(ok) if ok else float('nan'):.4f} | {clip} "
                     f"| {win} | {statistics.mean(r['time'] for r in rs):.0f} |")
    lines += ["", "Grid (seed 0):", "", "| optimizer | lr | rho | final val loss | clip fraction (last 50) |",
              "|---|---|---|---|---|"]
    for n, lr, rho, r in grid_rows:
        lines.append(f"| {n} | {lr:g} | {rho:g} | {fmt(r)} "
                     f"| {r['clip']:.3f} |")
    lines.append("")
    png, plt = write_markdown(lines, a.out)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = {"AdamW": "C0", "SophiaG": "C1", "SophiaH": "C2"}
    for n in names:
        for s in seeds:
            c = runs[(n, s)]["curve"]
            ax.plot([p[0] for p in c], [p[1] for p in c], color=colors[n], ls="-" if s == 0 else "--",
                    label=f"{n} seed {s}")
    ax.axhline(target, color="gray", lw=0.8, ls=":", label=f"target {target:.3f}")
    ax.set_xlabel("step"); ax.set_ylabel("validation loss (nats/char)")
    ax.set_ylim(top=min(3.6, ax.get_ylim()[1]))
    ax.set_title("char-LM on pydoc_data.topics: AdamW vs Sophia")
    ax.legend(fontsize=8); fig.tight_layout(); fig.savefig(png, dpi=120)
    print(f"wrote {png.with_suffix('.md')} and {png}")


if __name__ == "__main__":
    main()
