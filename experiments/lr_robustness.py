"""Learning-rate robustness of AdamW vs AdaHessian on the tiny char-LM (small-scale check).

The AdaHessian paper (Yao et al., AAAI 2021) reports that on transformer training AdamW diverges
once its lr is scaled by about 6x, while AdaHessian stays close to its best result up to 10x.
Here: the 2-layer char-LM of ``charlm.py``; each optimizer's base lr (AdamW 1e-3 with wd 0.1 and
betas (0.9, 0.95); AdaHessian 0.15, or 0.05 if 0.15 itself diverges, defaults otherwise, no weight
decay) is scaled by 0.5, 1, 2, 3, 4, 5, 6, 10; 1 seed, a fixed number of steps, constant lr,
no warm-up. Reports final validation loss, or "diverged" when the loss or the update went
non-finite (AdaHessian raises FloatingPointError).

Run:  .venv/bin/python experiments/lr_robustness.py
Writes experiments/results/lr_robustness.md and experiments/results/lr_robustness.png.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from charlm import BATCH, CONTEXT, CharData, CharLM, evaluate, lm_loss  # noqa: E402
from common import machine_line, train_step, write_markdown  # noqa: E402

from secondorder.optim.adahessian import AdaHessian  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SCALES = [0.5, 1, 2, 3, 4, 5, 6, 10]


def train(name, lr, data, seed, steps):
    torch.manual_seed(seed)
    model = CharLM(data.vocab)
    if name == "AdamW":
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
    else:
        opt = AdaHessian(model.parameters(), lr=lr, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    t0, peak = time.perf_counter(), 0.0
    for step in range(1, steps + 1):
        x, y = data.batch(gen)
        try:
            loss = train_step(opt, name != "AdamW", lambda: lm_loss(model(x), y))
        except (FloatingPointError, ValueError) as e:
            return dict(final=float("nan"), diverged=True, at=step, why=type(e).__name__, peak=peak,
                        time=time.perf_counter() - t0)
        lv = float(loss.detach())
        if not math.isfinite(lv):
            return dict(final=float("nan"), diverged=True, at=step, why="non-finite loss", peak=peak,
                        time=time.perf_counter() - t0)
        if step > 20:
            peak = max(peak, lv)
    v = evaluate(model, data)
    return dict(final=v, diverged=not math.isfinite(v), at=None, why="", peak=peak, time=time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS / "lr_robustness"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    t_start = time.perf_counter()
    data = CharData()
    res, bases, notes = {}, {"AdamW": 1e-3, "AdaHessian": 0.15}, []
    r = train("AdaHessian", 0.15, data, a.seed, a.steps)
    if r["diverged"]:
        bases["AdaHessian"] = 0.05
        notes.append(f"AdaHessian at lr 0.15 diverged at step {r['at']} ({r['why']}); base lr set to 0.05.")
    else:
        res[("AdaHessian", 1)] = r
    for name in ("AdamW", "AdaHessian"):
        for s in SCALES:
            if (name, s) not in res:
                res[(name, s)] = train(name, bases[name] * s, data, a.seed, a.steps)
            r = res[(name, s)]
            print(f"{name} x{s} (lr {bases[name] * s:g}): "
                  f"{'diverged at step %d' % r['at'] if r['diverged'] else '%.4f' % r['final']} ({r['time']:.0f} s)",
                  flush=True)
    total = time.perf_counter() - t_start
    cmd = ".venv/bin/python experiments/lr_robustness.py" + "".join(f" {x}" for x in sys.argv[1:])
    cell = lambda r: f"diverged (step {r['at']})" if r["diverged"] else f"{r['final']:.3f}"
    lines = [
        "# Learning-rate robustness: AdamW vs AdaHessian on a tiny char-LM (small-scale check)", "",
        f"Command: `{cmd}`  ",
        machine_line(),
        f"Setup: the char-LM of `charlm.py` (`pydoc_data.topics`, 2-layer pre-LN transformer, d_model 64, "
        f"context {CONTEXT}, batch {BATCH}); {a.steps} steps, constant lr, no warm-up, seed {a.seed}. "
        f"AdamW base lr {bases['AdamW']:g} (wd 0.1, betas (0.9, 0.95)); AdaHessian base lr {bases['AdaHessian']:g} "
        f"(betas (0.9, 0.999), eps 1e-4, Hessian power 1, update every step, no weight decay, no spatial averaging). "
        f"Cells: final validation loss (nats/char, 256 fixed validation windows) or 'diverged' (non-finite "
        f"loss / FloatingPointError) with the step. 'max train loss' = largest minibatch loss after step 20 "
        f"(a loss spike that recovered shows up there).  ",
        f"Total runtime: {total:.0f} s", "",
    ] + [f"Note: {n}  " for n in notes] + [
        "",
        "| lr scale | AdamW lr | AdamW val loss | AdamW max train loss | AdaHessian lr | AdaHessian val loss "
        "| AdaHessian max train loss |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in SCALES:
        ra, rh = res[("AdamW", s)], res[("AdaHessian", s)]
        lines.append(f"| {s}x | {bases['AdamW'] * s:g} | {cell(ra)} | {ra['peak']:.2f} | {bases['AdaHessian'] * s:g} "
                     f"| {cell(rh)} | {rh['peak']:.2f} |")
    lines.append("")
    png, plt = write_markdown(lines, a.out)
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    ymax = max([r["final"] for r in res.values() if not r["diverged"]] + [0.0])
    for name, c in (("AdamW", "C0"), ("AdaHessian", "C3")):
        ok = [(s, res[(name, s)]["final"]) for s in SCALES if not res[(name, s)]["diverged"]]
        bad = [s for s in SCALES if res[(name, s)]["diverged"]]
        ax.plot([p[0] for p in ok], [p[1] for p in ok], "o-", color=c, label=f"{name} (base lr {bases[name]:g})")
        if bad:
            ax.plot(bad, [ymax * 1.03] * len(bad), "x", color=c, ms=10, mew=2, label=f"{name} diverged")
    ax.set_xscale("log"); ax.set_xticks(SCALES); ax.set_xticklabels([f"{s:g}" for s in SCALES])
    ax.set_xlabel("lr scale (x base lr)"); ax.set_ylabel(f"validation loss after {a.steps} steps")
    ax.set_title("lr robustness on the char-LM"); ax.legend(fontsize=8); fig.tight_layout(); fig.savefig(png, dpi=120)
    print(f"wrote {png.with_suffix('.md')} and {png}")


if __name__ == "__main__":
    main()
