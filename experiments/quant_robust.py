"""Robust (upper-confidence-bound) vs plain HAWQ-V2 bit allocation over probe redraws: issue 19.

HAWQ-V2's Ω_i(b) = Tr(H_i)/n_i ||Q_b(W_i) - W_i||^2 rests on a Hutch++ trace estimate with a standard
error σ_i. ``secondorder.quant.uncertainty`` offers a robust allocation (solve the DP on
``confidence_omega(entries, z)``, i.e. Ω at Tr + zσ) and two stability estimates:
``parametric_stability`` (redraw the traces from N(T_i, σ_i^2) of ONE probe set, no Hessian products)
and the honest one, new probes. Questions: how often does the allocation change when the probes are
redrawn, does the robust allocator change less often or give better PTQ accuracy, and does the
cheap parametric estimate predict the observed redraw frequency?

Setup, for each network and training seed (the seed fixes the initialisation and batch order; data,
split and calibration set fixed):

* MNIST-1D CNN (``train_mnist1d(seed, 20)``; conv1, conv2, fc; 2960 weights) and the digit
  transformer (``train_digit_transformer(seed)``; 14 Linear layers, 25,152 weights);
* sensitivity data = the first N training samples (default 1000 / 500, batches of 1000 / 500: a
  subset to keep the 2 x R trace estimates per network inside the time budget); test = the test set;
* candidates (2, 3, 4, 8), size budgets of an average of 3 and 4 bits (b Σ n_i bits), weights only,
  per-channel symmetric PTQ;
* R = 10 probe seeds r = 0..R-1 and two trace budgets, ``trace_matvecs`` 90 (the default) and a
  cheap 30; for each: the traces and their standard errors, then ``allocate_bits(hawq_v2)`` (plain)
  and ``allocate_bits(confidence_omega(entries, 1.645))`` (robust), and the PTQ test accuracy of both.

The per-probe traces are ``layer_sensitivities(..., seed=r, top_eigenvalues=False)``: without the
per-layer Lanczos top eigenvalues, which HAWQ-V2 does not use and which cost more Hessian-vector
products than the traces on the transformer (165 of 255 at 90).

Reported: per (network, budget, trace budget, plain/robust): the frequency of the most common
configuration over the R redraws and the number of distinct ones; how often the allocation equals
the *reference* allocation (the same allocator on the traces averaged over the R probe seeds at 90
matvecs, a ~3x more precise estimate; σ shrunk by √R for the robust reference); the PTQ test accuracy
(mean over seeds of the mean across redraws ± mean over seeds of the std across redraws); and
``parametric_stability([entries of probe seed 0], solve, chosen=probe 0's allocation, redraws=200)``
against the observed frequency of probe 0's allocation among the other R-1 probe seeds (robust:
the redrawn traces shifted by z σ of probe seed 0). Also: are the reported trace standard errors
calibrated (std of the R trace estimates / mean reported σ, per layer)?

Run:  OMP_NUM_THREADS=1 .venv/bin/python experiments/quant_robust.py          (3 seeds, R = 10, about 9 min)
      OMP_NUM_THREADS=1 .venv/bin/python experiments/quant_robust.py --quick  (2 seeds, R = 3, calibration 1000 / 250)
Writes experiments/results/quant_robust.md and .png (``_quick`` with --quick).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import QUANT_MODELS as MODELS  # noqa: E402
from common import machine_line, ms, run_quant_experiment, train_quant_model  # noqa: E402

from secondorder.datasets import batches  # noqa: E402
from secondorder.quant import allocate_bits, layer_sensitivities, quantizable_layers  # noqa: E402
from secondorder.quant.dependencies import calibration_damage  # noqa: E402
from secondorder.quant.sensitivity import Sensitivities  # noqa: E402
from secondorder.quant.uncertainty import confidence_omega, parametric_stability, redraw_stability  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
BITS = (2, 3, 4, 8)
METHODS = ("plain", "robust")


def shifted(table, entries, z):
    """Ω at T + zσ from a table at T: Ω is linear in the trace (σ from ``entries``)."""
    by = {x.name: x for x in entries}
    return {n: {b: v + z * by[n].trace_stderr / by[n].size * by[n].errors[b] for b, v in t.items()}
            for n, t in table.items()}


def run_case(kind, seed, data, a):
    t0 = time.perf_counter()
    r, calib = train_quant_model(kind, seed, data, a.cnn_calib if kind == "mnist1d" else a.transformer_calib)
    model, test = r.model, batches(*r.test, 1000)
    t_train = time.perf_counter() - t0
    layers = quantizable_layers(model)
    names = [n for n, _ in layers]
    sizes = {n: m.weight.numel() for n, m in layers}
    n_total = sum(sizes.values())
    t_trace = {}
    entries = {}  # (matvecs, probe) -> entries
    for mv in a.matvecs:
        t1 = time.perf_counter()
        for r in range(a.probes):
            entries[(mv, r)] = layer_sensitivities(model, F.cross_entropy, calib, bits=BITS, trace_matvecs=mv, seed=r,
                                                   top_eigenvalues=False).layers
        t_trace[mv] = (time.perf_counter() - t1) / a.probes
    test_damage = calibration_damage(model, F.cross_entropy, test, names, metric="accuracy")
    fp_acc = test_damage.baseline["accuracy"]
    acc_cache = {}

    def acc(bits):
        k = tuple(bits[n] for n in names)
        if k not in acc_cache:
            acc_cache[k] = fp_acc - test_damage(dict(bits))
        return acc_cache[k]

    # the reference: traces averaged over the R probe seeds at the largest trace budget
    top = max(a.matvecs)
    ref_entries = tuple(replace(x, trace=statistics.mean(entries[(top, r)][i].trace for r in range(a.probes)),
                                trace_stderr=statistics.mean(entries[(top, r)][i].trace_stderr for r in range(a.probes))
                                / np.sqrt(a.probes)) for i, x in enumerate(entries[(top, 0)]))
    calibration = {}
    for mv in a.matvecs:
        ratio = []
        for i in range(len(names)):
            ts = [entries[(mv, r)][i].trace for r in range(a.probes)]
            ss = [entries[(mv, r)][i].trace_stderr for r in range(a.probes)]
            ratio.append(statistics.stdev(ts) / statistics.mean(ss))
        calibration[mv] = ratio
    out = dict(kind=kind, seed=seed, names=names, n_total=n_total, fp_acc=fp_acc, t_train=t_train, t_trace=t_trace,
               calibration=calibration, rows={})
    t1 = time.perf_counter()
    for budget in a.budgets:
        limit = budget * n_total
        solve = lambda t, limit=limit: allocate_bits(t, sizes, limit)  # noqa: E731
        tables = {"plain": lambda e: Sensitivities(e, 0).hawq_v2(), "robust": lambda e: confidence_omega(e, a.z)}
        ref = {m: solve(tables[m](ref_entries)).bits for m in METHODS}
        for mv in a.matvecs:
            for m in METHODS:
                allocs = {r: solve(tables[m](entries[(mv, r)])) for r in range(a.probes)}
                keys = [tuple(allocs[r].bits[n] for n in names) for r in range(a.probes)]
                counts = Counter(keys)
                accs = [acc(allocs[r].bits) for r in range(a.probes)]
                chosen = allocs[0]
                e0 = entries[(mv, 0)]
                observed = redraw_stability(lambda r, m=m, mv=mv: [tables[m](entries[(mv, r)])], solve, chosen,
                                            range(1, a.probes))
                psolve = solve if m == "plain" else (lambda t, e0=e0, solve=solve: solve(shifted(t, e0, a.z)))
                para = parametric_stability([e0], psolve, chosen, redraws=a.redraws, seed=seed)
                out["rows"][(budget, mv, m)] = dict(
                    most_common=counts.most_common(1)[0][1] / a.probes, distinct=len(counts),
                    same_ref=sum(allocs[r].bits == ref[m] for r in range(a.probes)) / a.probes,
                    acc_mean=statistics.mean(accs), acc_std=statistics.stdev(accs) if len(accs) > 1 else 0.0,
                    accs=accs, avg_bits=statistics.mean(allocs[r].size_bits / n_total for r in range(a.probes)),
                    keys=keys, ref=tuple(ref[m][n] for n in names), ref_acc=acc(ref[m]),
                    para=para.frequency, para_distinct=para.distinct, observed=observed.frequency,
                    observed_distinct=observed.distinct)
    out["t_alloc"] = time.perf_counter() - t1
    out["t_total"] = time.perf_counter() - t0
    print(f"{kind} seed {seed}: FP test acc {fp_acc:.4f}; train {t_train:.1f} s; traces "
          + ", ".join(f"{mv} matvecs {t:.1f} s" for mv, t in t_trace.items()) + f" per probe seed; allocation and "
          f"stability {out['t_alloc']:.1f} s; " + "; ".join(
              f"{b} bits/{mv}: plain {out['rows'][(b, mv, 'plain')]['distinct']} / robust "
              f"{out['rows'][(b, mv, 'robust')]['distinct']} distinct" for b in a.budgets for mv in a.matvecs)
          + f"; {out['t_total']:.1f} s", flush=True)
    return out


# --------------------------------------------------------------------------- report


def cells(a, res):
    """Every (model, budget, matvecs, allocation) cell of the tables with its rows, one per training seed."""
    for k in a.models:
        for b, mv, m in itertools.product(a.budgets, a.matvecs, METHODS):
            yield k, b, mv, m, [res[(k, s)]["rows"][(b, mv, m)] for s in a.seeds]


def report(a, res, total, cmd):
    S = a.seeds
    L = ["# Robust vs plain HAWQ-V2 bit allocation over probe redraws (issue 19)", "",
         f"Command: `{cmd}`  ", machine_line(), f"Total runtime: {total:.0f} s  ",
         f"Training seeds: {', '.join(map(str, S))}; probe seeds 0..{a.probes - 1} (R = {a.probes}) at trace_matvecs "
         f"{' and '.join(map(str, a.matvecs))}; sensitivity data = the first {a.cnn_calib} (CNN) / "
         f"{a.transformer_calib} (transformer) training samples; candidates {BITS}; budgets "
         f"{' and '.join(f'{b:g}' for b in a.budgets)} average bits; robust = `confidence_omega(entries, {a.z})`; "
         "accuracy = PTQ test accuracy (weights only, per-channel). 'most common' = frequency of the most common "
         "configuration over the R redraws, 'distinct' = number of different configurations (both averaged over "
         "the training seeds); 'same as ref.' = frequency of the allocation on the R-seed-averaged traces at "
         f"{max(a.matvecs)} matvecs; 'test acc' = mean over seeds of the mean across redraws ± mean over seeds of "
         "the std across redraws; 'robust − plain' = paired difference of the mean accuracies (seeds where robust "
         "is higher / lower).", ""]
    L += ["## How often the allocation changes, and what it costs in accuracy", "",
          "| model | budget (avg bits) | matvecs | allocation | most common | distinct (of R) | same as ref. | "
          "test acc % | robust − plain (pts) | robust ≠ plain (redraws) | avg bits used |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
    for k, b, mv, m, rows in cells(a, res):
        if m == "robust":
            pl = [res[(k, s)]["rows"][(b, mv, "plain")] for s in S]
            d = [x["acc_mean"] - y["acc_mean"] for x, y in zip(rows, pl)]
            diff = f"{statistics.mean(d) * 100:+.2f} ({sum(x > 1e-12 for x in d)}/{sum(x < -1e-12 for x in d)})"
            differ = f"{statistics.mean(sum(u != v for u, v in zip(x['keys'], y['keys'])) / a.probes for x, y in zip(rows, pl)):.2f}"
        else:
            diff = differ = "–"
        L.append(f"| {MODELS[k]} | {b:g} | {mv} | {m} | {statistics.mean(x['most_common'] for x in rows):.2f} | "
                 f"{statistics.mean(x['distinct'] for x in rows):.1f} | "
                 f"{statistics.mean(x['same_ref'] for x in rows):.2f} | "
                 f"{statistics.mean(x['acc_mean'] for x in rows) * 100:.2f} ± "
                 f"{statistics.mean(x['acc_std'] for x in rows) * 100:.2f} | {diff} | {differ} | "
                 f"{statistics.mean(x['avg_bits'] for x in rows):.3f} |")
    L += ["", "## Does the parametric stability predict the probe-redraw frequency?", "",
          f"P(probe seed 0's allocation comes back): parametric = `parametric_stability` from probe seed 0's traces and "
          f"error bars ({a.redraws} redraws; robust: each redraw shifted by z σ of probe seed 0), observed = "
          f"the fraction of probe seeds 1..{a.probes - 1} giving the same allocation. Per training seed "
          "'parametric/observed', then the mean absolute difference; 'distinct' = parametric over its "
          f"{a.redraws} redraws / observed over {a.probes - 1} (means over seeds).", "",
          "| model | budget | matvecs | allocation | per seed (parametric/observed) | mean parametric | mean observed | "
          "mean abs. diff | distinct (param. / obs.) |", "|---|---|---|---|---|---|---|---|---|"]
    allpairs = []
    for k, b, mv, m, rows in cells(a, res):
        allpairs += [(x["para"], x["observed"]) for x in rows]
        L.append(f"| {MODELS[k]} | {b:g} | {mv} | {m} | "
                 + ", ".join(f"{x['para']:.2f}/{x['observed']:.2f}" for x in rows)
                 + f" | {statistics.mean(x['para'] for x in rows):.2f} | "
                 f"{statistics.mean(x['observed'] for x in rows):.2f} | "
                 f"{statistics.mean(abs(x['para'] - x['observed']) for x in rows):.2f} | "
                 f"{statistics.mean(x['para_distinct'] for x in rows):.1f} / "
                 f"{statistics.mean(x['observed_distinct'] for x in rows):.1f} |")
    p, o = np.array([x[0] for x in allpairs]), np.array([x[1] for x in allpairs])
    corr = float(np.corrcoef(p, o)[0, 1]) if p.std() > 0 and o.std() > 0 else float("nan")
    L += ["", f"Over all {len(allpairs)} (model, seed, budget, matvecs, allocation) cells: mean parametric "
          f"{p.mean():.2f}, mean observed {o.mean():.2f}, mean parametric − observed {np.mean(p - o):+.2f}, "
          f"mean |diff| {np.mean(np.abs(p - o)):.2f}, Pearson r {corr:.2f}; parametric above observed in "
          f"{int(np.sum(p > o + 1e-12))}, below in {int(np.sum(p < o - 1e-12))}."]
    hard = (p < 1) | (o < 1)
    if hard.any():
        ph, oh = p[hard], o[hard]
        rh = float(np.corrcoef(ph, oh)[0, 1]) if hard.sum() > 2 and ph.std() > 0 and oh.std() > 0 else float("nan")
        L.append(f"Only the {int(hard.sum())} cells where either is below 1 (the others are the trivial 1.00/1.00): "
                 f"mean parametric {ph.mean():.2f}, mean observed {oh.mean():.2f}, mean |diff| "
                 f"{np.mean(np.abs(ph - oh)):.2f}, Pearson r {rh:.2f}; |diff| > 0.3 in {int(np.sum(np.abs(ph - oh) > 0.3))}. "
                 f"(The observed frequency of a cell is a binomial proportion over {a.probes - 1} redraws: its "
                 f"standard error is up to {0.5 / np.sqrt(a.probes - 1):.2f}; 'distinct' counts are not comparable "
                 f"between {a.redraws} and {a.probes - 1} redraws.)")
    L.append("")
    L += ["## Are the reported trace standard errors calibrated?", "",
          f"Per layer: std of the {a.probes} trace estimates (probe seeds) / mean of their reported standard errors "
          "(1 = calibrated; > 1: the error bars are too small). Median and range over layers and seeds.", "",
          "| model | matvecs | median ratio | min | max | layers with ratio > 2 |", "|---|---|---|---|---|---|"]
    for k in a.models:
        for mv in a.matvecs:
            v = [x for s in S for x in res[(k, s)]["calibration"][mv]]
            L.append(f"| {MODELS[k]} | {mv} | {statistics.median(v):.2f} | {min(v):.2f} | {max(v):.2f} | "
                     f"{sum(x > 2 for x in v)}/{len(v)} |")
    L += ["", "Time per probe seed (trace only, s): " + "; ".join(
        f"{MODELS[k]} " + ", ".join(f"{mv}: {ms([res[(k, s)]['t_trace'][mv] for s in S], fmt='.1f')}"
                                   for mv in a.matvecs) for k in a.models) + ".", ""]
    L += ["## Verdict (computed from this run)", ""]
    for k in a.models:
        rs = [res[(k, s)] for s in S]
        for b in a.budgets:
            for mv in a.matvecs:
                pl, rb = ([r["rows"][(b, mv, m)] for r in rs] for m in METHODS)
                d = [x["acc_mean"] - y["acc_mean"] for x, y in zip(rb, pl)]
                L.append(f"* {MODELS[k]}, {b:g} bits, {mv} matvecs: most common configuration "
                         f"{statistics.mean(x['most_common'] for x in pl):.2f} (plain) vs "
                         f"{statistics.mean(x['most_common'] for x in rb):.2f} (robust), distinct "
                         f"{statistics.mean(x['distinct'] for x in pl):.1f} vs {statistics.mean(x['distinct'] for x in rb):.1f}; "
                         f"test accuracy {statistics.mean(x['acc_mean'] for x in pl) * 100:.2f} vs "
                         f"{statistics.mean(x['acc_mean'] for x in rb) * 100:.2f} % (robust − plain "
                         f"{statistics.mean(d) * 100:+.2f} pts, higher in {sum(x > 1e-12 for x in d)}/{len(S)} seeds, "
                         f"lower in {sum(x < -1e-12 for x in d)}); within-seed std across redraws "
                         f"{statistics.mean(x['acc_std'] for x in pl) * 100:.2f} vs "
                         f"{statistics.mean(x['acc_std'] for x in rb) * 100:.2f} pts.")
    L.append("")
    return L


def figure(a, res, plt, png):
    S = a.seeds
    fig, axes = plt.subplots(2, len(a.models), figsize=(6.4 * len(a.models), 8.4), squeeze=False)
    for col, k in enumerate(a.models):
        rs = [res[(k, s)] for s in S]
        ax = axes[0][col]
        labels, j = [], 0
        for b in a.budgets:
            for mv in a.matvecs:
                labels.append(f"{b:g} b\n{mv} mv")
                for i, (m, c) in enumerate(zip(METHODS, ("C0", "C3"))):
                    for s_i, r in enumerate(rs):
                        accs = np.array(r["rows"][(b, mv, m)]["accs"]) * 100
                        x = j + (i - 0.5) * 0.35 + (s_i - (len(rs) - 1) / 2) * 0.08
                        ax.scatter(np.full(len(accs), x), accs, s=10, color=c, alpha=0.5,
                                   label=m if (j == 0 and s_i == 0) else None)
                j += 1
        ax.set_xticks(range(len(labels)), labels, fontsize=8)
        ax.set_ylabel("PTQ test accuracy %")
        ax.set_title(f"{MODELS[k]}: accuracy of each probe redraw (dots), per seed")
        ax.legend(fontsize=8)
        ax = axes[1][col]
        for m, mk in zip(METHODS, "os"):
            for mv, c in zip(a.matvecs, ("C0", "C1", "C2")):
                pts = [(r["rows"][(b, mv, m)]["para"], r["rows"][(b, mv, m)]["observed"]) for r in rs for b in a.budgets]
                ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=mk, color=c, s=40, alpha=0.7,
                           label=f"{m}, {mv} matvecs")
        ax.plot([0, 1], [0, 1], "k--", lw=1)
        ax.set_xlim(-0.05, 1.05)
        ax.set_ylim(-0.05, 1.05)
        ax.set_xlabel("parametric P(same allocation) from one probe set")
        ax.set_ylabel(f"observed over {a.probes - 1} new probe sets")
        ax.set_title(f"{MODELS[k]}: parametric vs observed stability")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--probes", type=int, default=10, help="R, the number of probe seeds")
    ap.add_argument("--matvecs", type=int, nargs="+", default=[90, 30])
    ap.add_argument("--budgets", type=float, nargs="+", default=[3.0, 4.0], help="average bits")
    ap.add_argument("--z", type=float, default=1.645)
    ap.add_argument("--redraws", type=int, default=200)
    ap.add_argument("--cnn-calib", type=int, default=1000, help="sensitivity samples (first N of the training set)")
    ap.add_argument("--transformer-calib", type=int, default=500)
    ap.add_argument("--quick", action="store_true", help="2 seeds, R = 3, transformer calibration 250 (*_quick.*)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="default experiments/results/quant_robust (+ '_quick')")
    a = ap.parse_args()
    if a.quick:
        a.seeds, a.probes, a.transformer_calib = a.seeds[:2], 3, 250
    if a.probes < 3:
        ap.error("--probes must be >= 3")
    if a.out is None:
        a.out = str(RESULTS / ("quant_robust_quick" if a.quick else "quant_robust"))
    torch.set_num_threads(a.threads)
    run_quant_experiment(a, "quant_robust.py", lambda k, seed, d: run_case(k, seed, d, a), report, figure)


if __name__ == "__main__":
    main()
