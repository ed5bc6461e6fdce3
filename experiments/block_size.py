"""AdaHessian spatial-averaging block size on the tiny char-LM (small-scale check).

The AdaHessian paper (Yao et al., AAAI 2021) reports in its ablation that on transformer
training AdaHessian's final quality is insensitive to the spatial-averaging block size for
matrices (block sizes 1 to 128). Here: the 2-layer char-LM of ``charlm.py`` trained with
AdaHessian at lr 0.15 (the base lr of ``lr_robustness.py``, where it trained stably), defaults
otherwise (betas (0.9, 0.999), eps 1e-4, Hessian power 1, update every step, no weight decay),
for block sizes 1 (= no averaging), 2, 4, 8, 16, 32, 64, 128; a fixed number of steps, constant
lr, no warm-up; several seeds (the seed fixes the model init, the batches and the Hutchinson
probes, so block sizes are compared on identical runs apart from the averaging).

Block size b averages the |z * Hz| estimate of every 2-D parameter (embeddings, the output
head and all Linear weights) over contiguous blocks of b along the last dimension. The model's
2-D parameters have last dimension 64, except the MLP output weights ``fc2`` (last dimension
256). When b does not divide a parameter's last dimension (only b = 128 with last dimension
64), that parameter goes into a parameter group with the largest divisor of its last dimension
that is <= b, i.e. 64 = the whole row: so b = 128 differs from b = 64 only in the two ``fc2``
weights. 1-D parameters (biases, LayerNorm) are never averaged.

Reports final validation loss (mean +- std over seeds), the number of diverged runs (non-finite
loss: AdaHessian raises FloatingPointError), the paired difference to b = 1, and time per step.

Run:  .venv/bin/python experiments/block_size.py
Writes experiments/results/block_size.md and experiments/results/block_size.png.
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

from secondorder.optim.adahessian import AdaHessian  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
BLOCKS = [1, 2, 4, 8, 16, 32, 64, 128]


def effective_block(block: int, last_dim: int) -> int:
    """The largest divisor of ``last_dim`` that is <= ``block``."""
    return max(d for d in range(1, min(block, last_dim) + 1) if last_dim % d == 0)


def param_groups(model, block: int):
    """One group per effective block size; 1-D parameters go with the requested one (unused for them)."""
    groups: dict[int, list] = {}
    for p in model.parameters():
        b = effective_block(block, p.shape[-1]) if p.ndim == 2 else block
        groups.setdefault(b, []).append(p)
    return [dict(params=ps, block_size=b) for b, ps in sorted(groups.items())]


def train(block, lr, data, seed, steps, eval_every):
    torch.manual_seed(seed)
    model = CharLM(data.vocab)
    opt = AdaHessian(param_groups(model, block), lr=lr, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    curve, step_times, peak = [(0, evaluate(model, data))], [], (0.0, 0)
    for step in range(1, steps + 1):
        x, y = data.batch(gen)
        t0 = time.perf_counter()
        try:
            loss = train_step(opt, True, lambda: lm_loss(model(x), y))
        except (FloatingPointError, ValueError) as e:
            return dict(final=float("nan"), late=float("nan"), diverged=True, at=step, why=type(e).__name__,
                        curve=curve, step_times=step_times, peak=peak)
        step_times.append(time.perf_counter() - t0)
        lv = float(loss.detach())
        if not math.isfinite(lv):
            return dict(final=float("nan"), late=float("nan"), diverged=True, at=step, why="non-finite loss",
                        curve=curve, step_times=step_times, peak=peak)
        if step > 20 and lv > peak[0]:
            peak = (lv, step)
        if step % eval_every == 0 or step == steps:
            curve.append((step, evaluate(model, data)))
    v = curve[-1][1]
    late = statistics.mean(l for t, l in curve if t > 0.75 * steps)
    return dict(final=v, late=late, diverged=not math.isfinite(v), at=None, why="", curve=curve,
                step_times=step_times, peak=peak)


def mean_std(xs):
    if not xs:
        return float("nan"), float("nan")
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def comparison(a, res, summary, corr):
    """The comparison with the paper's claim, computed from the numbers of this run."""
    good = [b for b in a.blocks if not math.isnan(summary[b][0])]
    if len(good) < 2:
        return []
    lo, hi = min(good, key=lambda b: summary[b][0]), max(good, key=lambda b: summary[b][0])
    spread = summary[hi][0] - summary[lo][0]
    sds = [summary[b][1] for b in good]
    b0 = a.blocks[0]
    single = [(abs(res[(b, s)]["final"] - res[(b0, s)]["final"]), b, s) for b in good for s in a.seeds
              if b != b0 and not res[(b, s)]["diverged"] and not res[(b0, s)]["diverged"]]
    out = ["## Comparison with the paper (stated plainly)", "",
           "Paper (Yao et al., AAAI 2021, ablation): AdaHessian's final quality on transformer training is insensitive "
           "to the spatial-averaging block size for matrices (1 to 128).  ",
           f"Here, mean over {len(a.seeds)} seeds: the final validation loss ranges from {summary[lo][0]:.3f} (b = {lo}) "
           f"to {summary[hi][0]:.3f} (b = {hi}), a spread of {spread:.3f} nats/char ({100 * spread / summary[lo][0]:.1f} %), "
           f"while the std over seeds at a fixed b is {min(sds):.3f} to {max(sds):.3f}.  "]
    if spread < max(sds):
        out.append("So no systematic effect of the block size is resolved: the differences between block sizes are "
                   "smaller than the seed-to-seed scatter, which is consistent with the paper's 'insensitive', but "
                   f"with {len(a.seeds)} seeds it cannot resolve effects smaller than about the seed std.  ")
    else:
        out.append("So the block size changes the mean final loss by more than the seed-to-seed scatter: at this "
                   "scale the paper's 'insensitive' is NOT reproduced.  ")
    if single:
        d, b, s = max(single)
        out.append(f"Individual runs are not insensitive, though: with the same seed (same init, batches and probes) "
                   f"changing only the block size moves the final loss by up to {d:.3f} (seed {s}: b = {b0} "
                   f"{res[(b0, s)]['final']:.3f}, b = {b} {res[(b, s)]['final']:.3f}).  ")
        if corr > 0.5:
            out.append(f"The 'max train loss' column suggests why (correlation {corr:.2f} with the final loss): whether "
                       f"a run has a loss spike soon after step 20 (constant lr {a.lr:g}, no warm-up) largely decides "
                       f"where it ends after only {a.steps} steps; which (seed, b) pairs spike is read off the table.  ")
    out += ["Caveats: one tiny model (118 k parameters, rows of only 64 or 256 entries, so b = 64 already "
            "averages whole rows and b = 128 cannot be applied to most matrices), a short constant-lr run, "
            f"{len(a.seeds)} seeds, one lr; the paper's transformer runs are far larger and longer.", ""]
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--lr", type=float, default=0.15)
    ap.add_argument("--blocks", type=int, nargs="+", default=BLOCKS)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS / "block_size"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    t_start = time.perf_counter()
    data = CharData()
    probe = CharLM(data.vocab)
    shapes = sorted({p.shape[-1] for p in probe.parameters() if p.ndim == 2})
    res = {}
    for b in a.blocks:
        for s in a.seeds:
            r = res[(b, s)] = train(b, a.lr, data, s, a.steps, a.eval_every)
            ms = 1e3 * statistics.median(r["step_times"]) if r["step_times"] else float("nan")
            print(f"block {b} seed {s}: "
                  f"{'diverged at step %d (%s)' % (r['at'], r['why']) if r['diverged'] else '%.4f' % r['final']} "
                  f"(last-quarter mean {r['late']:.4f}, max train loss {r['peak'][0]:.2f} at step {r['peak'][1]}, "
                  f"{ms:.0f} ms/step)", flush=True)
    total = time.perf_counter() - t_start
    cmd = ".venv/bin/python experiments/block_size.py" + "".join(f" {x}" for x in sys.argv[1:])

    def eff(b):
        return ", ".join(f"{effective_block(b, d)} (last dim {d})" for d in shapes)

    rows, summary = [], {}
    for b in a.blocks:
        rs = [res[(b, s)] for s in a.seeds]
        ok = [r["final"] for r in rs if not r["diverged"]]
        m, sd = mean_std(ok)
        lm, lsd = mean_std([r["late"] for r in rs if not r["diverged"]])
        deltas = [res[(b, s)]["final"] - res[(a.blocks[0], s)]["final"] for s in a.seeds
                  if not res[(b, s)]["diverged"] and not res[(a.blocks[0], s)]["diverged"]]
        dm, dsd = mean_std(deltas)
        times = [t for r in rs for t in r["step_times"]]
        ms = 1e3 * statistics.median(times) if times else float("nan")
        div = sum(r["diverged"] for r in rs)
        summary[b] = (m, sd, div, lm, lsd)
        per_seed = ", ".join("div. (step %d)" % r["at"] if r["diverged"] else "%.3f" % r["final"] for r in rs)
        peak = ", ".join(f"{r['peak'][0]:.2f} (step {r['peak'][1]})" for r in rs)
        rows.append(f"| {b} | {eff(b)} | {m:.3f} ± {sd:.3f} | {per_seed} | {dm:+.3f} ± {dsd:.3f} "
                    f"| {lm:.3f} ± {lsd:.3f} | {div}/{len(rs)} | {peak} | {ms:.0f} |")
    lines = [
        "# AdaHessian spatial-averaging block size on a tiny char-LM (small-scale check)", "",
        f"Command: `{cmd}`  ",
        machine_line(),
        f"Setup: the char-LM of `charlm.py` (`pydoc_data.topics`, 2-layer pre-LN transformer, d_model 64, "
        f"context {CONTEXT}, batch {BATCH}); AdaHessian lr {a.lr:g} (betas (0.9, 0.999), eps 1e-4, Hessian power 1, "
        f"update every step, no weight decay), {a.steps} steps, constant lr, no warm-up, seeds "
        f"{', '.join(map(str, a.seeds))} (a seed fixes init, batches and Hutchinson probes, identical across block "
        f"sizes). Block size b: |z * Hz| of every 2-D parameter (token/position embeddings, output head, all "
        f"Linear weights) averaged over contiguous blocks of b along the last dimension; 1-D parameters never "
        f"averaged. Validation loss in nats/char on 256 fixed validation windows.  ",
        f"Total runtime: {total:.0f} s", "",
        f"Note: the 2-D parameters' last dimensions are {', '.join(map(str, shapes))} (all 64 except the two MLP "
        f"output weights `fc2`, 256). Where b does not divide a last dimension (only b = 128 with 64) the parameter "
        f"is put in a group with the largest divisor <= b, i.e. 64 = its whole row; so b = 128 differs from b = 64 "
        f"only in the `fc2` weights. Column 'effective b' lists this.  ",
        "Note: 'Δ vs b=1' is the paired difference (same seed) to block size 1, mean ± std over seeds; "
        f"'last-quarter mean' = mean of the validation losses evaluated (every {a.eval_every} steps) after step "
        f"{int(0.75 * a.steps)}, per run, then mean ± std over seeds: less sensitive to where the noisy constant-lr "
        f"trajectory happens to be at the last step. 'max train loss' = largest minibatch loss after step 20, per "
        f"seed, with its step (a loss spike that recovered shows up there). "
        "'ms/step' is the median wall time of one training step over all steps and seeds (shared 2-core machine, "
        "timings vary ±20-30 % between runs).  ",
        "",
        "| block size b | effective b | final val loss (mean ± std) | per seed | Δ vs b=1 (paired) "
        "| last-quarter mean val loss | diverged | max train loss per seed | ms/step |",
        "|---|---|---|---|---|---|---|---|---|",
    ] + rows + [""]
    done = [r for r in res.values() if not r["diverged"] and r["peak"][1]]
    if len(done) > 2:
        corr = statistics.correlation([r["peak"][0] for r in done], [r["final"] for r in done])
        lines += [f"Across all {len(done)} finished runs, the correlation between the max train loss after step 20 "
                  f"and the final validation loss is {corr:.2f}.", ""]
    lines += comparison(a, res, summary, corr if len(done) > 2 else float("nan"))
    png, plt = write_markdown(lines, a.out)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    good = [b for b in a.blocks if not math.isnan(summary[b][0])]
    ax.errorbar(good, [summary[b][0] for b in good], yerr=[summary[b][1] for b in good], fmt="o-", color="C3",
                capsize=4, label=f"final, mean ± std over {len(a.seeds)} seeds")
    ax.errorbar([b * 1.06 for b in good], [summary[b][3] for b in good], yerr=[summary[b][4] for b in good],
                fmt="s--", color="C0", capsize=4, label="last-quarter mean, mean ± std")
    for s in a.seeds:
        pts = [(b, res[(b, s)]["final"]) for b in a.blocks if not res[(b, s)]["diverged"]]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], ".", color="grey", alpha=0.6,
                label="single seeds" if s == a.seeds[0] else None)
    bad = [b for b in a.blocks if summary[b][2]]
    if bad:
        top = max(summary[b][0] + summary[b][1] for b in good) if good else 3.0
        ax.plot(bad, [top * 1.01] * len(bad), "x", color="k", ms=9, mew=2, label="≥1 seed diverged")
    ax.set_xscale("log", base=2); ax.set_xticks(a.blocks); ax.set_xticklabels([str(b) for b in a.blocks])
    ax.set_xlabel("spatial-averaging block size b"); ax.set_ylabel(f"validation loss ({a.steps} steps)")
    ax.set_title("final validation loss vs block size"); ax.legend(fontsize=8)
    cmap = plt.get_cmap("viridis")
    for i, b in enumerate(a.blocks):
        for j, s in enumerate(a.seeds):
            c = res[(b, s)]["curve"]
            ax2.plot([t for t, _ in c], [l for _, l in c], ["-", "--", ":", "-."][j % 4],
                     color=cmap(i / max(len(a.blocks) - 1, 1)), lw=1, label=f"b={b}" if j == 0 else None)
    ax2.set_xlabel("step"); ax2.set_ylabel("validation loss")
    ax2.set_ylim(2.0, 3.0); ax2.set_xlim(left=50)
    ax2.set_title("validation curves (line style = seed " + ", ".join(
        f"{s}: {st}" for s, st in zip(a.seeds, ["solid", "dashed", "dotted", "dash-dot"])) + ")", fontsize=9)
    ax2.legend(fontsize=8, ncol=2)
    fig.tight_layout(); fig.savefig(png, dpi=120)
    print(f"wrote {png.with_suffix('.md')} and {png}")


if __name__ == "__main__":
    main()
