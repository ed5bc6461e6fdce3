"""Pure-Hessian order vs dependency-augmented bisection inside an accuracy window: issue 19.

Schaefer et al. 2023 ("Augmenting Hessians with inter-layer dependencies for mixed-precision
post-training quantization") claim that per-layer Hessian sensitivities order the layers poorly,
and that measured inter-layer dependencies let a search find cheaper configurations inside an
accuracy window. Here at small scale, with the library's ``secondorder.quant.dependencies``:

* two networks retrained for every seed (the seed fixes the initialisation, the batch order and the
  Hutch++/Lanczos probes; data and split are fixed): the MNIST-1D CNN (``train_mnist1d(seed, 20)``,
  layers ``conv1, conv2, fc``, 2960 weights) and the digit transformer
  (``train_digit_transformer(seed)``, 14 Linear layers, 25,152 weights);
* calibration = the first N training samples (default: all of them, 4000 / 1437, as
  ``secondorder quantize`` does; batches of 1000 / 500); evaluation = the test set (1000 / 360);
* candidates (2, 3, 4, 8), weights only, per-channel symmetric post-training quantization;
* Hessian order: ``threshold_path(layer_sensitivities(..., trace_matvecs=90).hawq_v2(), sizes)``;
  dependency order: ``threshold_path(measure_dependencies(..., metric="accuracy").augmented(), sizes)``
  with ``pairs="all"`` (CNN: 3 pairs) and ``pairs="neighbours"`` (transformer: 13 pairs);
* for each window max_drop in {0.5, 1, 2} accuracy points on the calibration set:
  ``bisection_search(path, calibration_damage(..., metric="accuracy"), max_drop / 100, sizes)`` along
  each path; "HAWQ DP @ dep. size" = ``allocate_bits(hawq_v2, sizes, <dependency result's size>)``
  (measured, and may lie outside the window); for the CNN the brute-force oracle = the cheapest of
  all 4^3 = 64 configurations whose measured calibration drop is inside the window (ties: the
  smaller drop).

A third order beyond the brief, "dependency (loss)": the same augmented table measured with
``metric="loss"`` (the calibration loss increase; the same number of passes), bisected on the same
accuracy window. It separates "dependencies help" from "the accuracy metric is too coarse": on a
network that fits its calibration set (the transformer: 100 % train accuracy) most single-layer and
pairwise accuracy drops at 3-8 bits are exactly 0, so the accuracy-metric path has few, tied steps.

Diagnostics beyond the brief: every configuration on each path is also measured ("path min" = the
cheapest configuration on the path inside the window, what an exhaustive scan of the path would
return, and whether the measured drop is monotone along the whole path, not only at the probed
points); for the CNN the Spearman correlation over all 64 configurations of the measured calibration
drop with ΣΩ (Hessian) and with Σ s_i(b_i) (the augmented table used additively); the summed
pairwise interactions Σ I_ij(b) vs the summed single-layer drops Σ d_i(b).

Evaluations = calibration passes (one pass = the quantized model on the whole calibration set):
the bisection's probes, plus for the dependency order the ``measure_dependencies`` passes
(L|B| + #pairs |B|: CNN 24, transformer 108). Each ``calibration_damage`` / ``measure_dependencies``
object also makes one unquantized baseline pass (not counted, the same for both). The Hessian order
instead costs the sensitivities' Hessian-vector products (reported separately).

Run:  OMP_NUM_THREADS=1 .venv/bin/python experiments/quant_dependencies.py          (5 seeds, about 8 min)
      OMP_NUM_THREADS=1 .venv/bin/python experiments/quant_dependencies.py --quick  (2 seeds, calibration 1000 / 500)
Writes experiments/results/quant_dependencies.md and .png (``_quick`` with --quick).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import QUANT_MODELS as MODELS  # noqa: E402
from common import machine_line, ms, run_quant_experiment, train_quant_model  # noqa: E402

from secondorder.data import evaluate  # noqa: E402
from secondorder.datasets import batches  # noqa: E402
from secondorder.quant import allocate_bits, layer_sensitivities, quantize  # noqa: E402
from secondorder.quant.dependencies import (  # noqa: E402
    bisection_search,
    calibration_damage,
    measure_dependencies,
    threshold_path,
)

RESULTS = Path(__file__).resolve().parent / "results"
PAIRS = {"mnist1d": "all", "transformer": "neighbours"}
BITS = (2, 3, 4, 8)
ORDERS = ("Hessian", "dependencies", "dependencies (loss)")
METHODS = ("Hessian bisection", "dependency bisection", "dependency (loss) bisection", "HAWQ DP @ dep. size",
           "oracle")


class Cached:
    """A ``calibration_damage`` callable with a cache keyed by the configuration (for the diagnostics)."""

    def __init__(self, fn, names):
        self.fn, self.names, self.cache = fn, names, {}

    def __call__(self, bits):
        k = tuple(bits[n] for n in self.names)
        if k not in self.cache:
            self.cache[k] = self.fn(dict(bits))
        return self.cache[k]


def run_case(kind, seed, data, a):
    t0 = time.perf_counter()
    r, calib = train_quant_model(kind, seed, data, a.cnn_calib if kind == "mnist1d" else a.transformer_calib)
    model, test = r.model, batches(*r.test, 1000)
    t_train = time.perf_counter() - t0
    ce = F.cross_entropy
    fp_cal, fp_test = evaluate(model, ce, calib), evaluate(model, ce, test)
    t1 = time.perf_counter()
    sens = layer_sensitivities(model, ce, calib, bits=BITS, trace_matvecs=a.trace_matvecs, seed=seed)
    t_sens = time.perf_counter() - t1
    names, sizes = [x.name for x in sens.layers], sens.sizes()
    n_total = sum(sizes.values())
    t1 = time.perf_counter()
    deps = measure_dependencies(model, ce, calib, bits=BITS, pairs=PAIRS[kind], metric="accuracy")
    t_deps = time.perf_counter() - t1
    deps_loss = measure_dependencies(model, ce, calib, bits=BITS, pairs=PAIRS[kind], metric="loss")
    damage = calibration_damage(model, ce, calib, names, metric="accuracy")  # what the bisections spend
    cal = Cached(calibration_damage(model, ce, calib, names, metric="accuracy"), names)  # diagnostics
    tst = Cached(calibration_damage(model, ce, test, names, metric="accuracy"), names)
    # sanity: the damage callable on the test set is the PTQ model's accuracy drop
    probe_bits = {n: 3 for n in names}
    want = fp_test["accuracy"] - evaluate(quantize(model, probe_bits), ce, test)["accuracy"]
    assert abs(tst(probe_bits) - want) < 1e-12, (tst(probe_bits), want)
    omega = sens.hawq_v2()
    tables = {"Hessian": omega, "dependencies": deps.augmented(), "dependencies (loss)": deps_loss.augmented()}
    paths = {o: threshold_path(t, sizes) for o, t in tables.items()}
    path_drops = {o: [cal(c) for _, c in p] for o, p in paths.items()}
    avg = lambda bits: sum(sizes[n] * bits[n] for n in names) / n_total  # noqa: E731
    region = 2 * max(a.windows) / 100  # the part of a path that matters for the windows

    def near(drops):
        """The path's drops up to and including the first one above ``region``."""
        k = next((i for i, x in enumerate(drops) if x > region), len(drops) - 1)
        return drops[: k + 1]

    out = dict(kind=kind, seed=seed, names=names, n_total=n_total, fp_cal=fp_cal, fp_test=fp_test, t_train=t_train,
               t_sens=t_sens, t_deps=t_deps, matvecs=sens.num_matvecs, dep_evals=deps.evaluations,
               path_len={o: len(p) for o, p in paths.items()},
               path_monotone={o: all(x <= y for x, y in itertools.pairwise(d)) for o, d in path_drops.items()},
               path_dip={o: max([0.0] + [x - y for x, y in itertools.pairwise(d)]) for o, d in path_drops.items()},
               region_monotone={o: all(x <= y for x, y in itertools.pairwise(near(d))) for o, d in path_drops.items()},
               region_dip={o: max([0.0] + [x - y for x, y in itertools.pairwise(near(d))])
                           for o, d in path_drops.items()},
               rows={})
    single = {b: sum(deps.single[n][b] for n in names) for b in BITS}
    inter = {b: sum(deps.interaction(i, j, b) for i, j in deps.pairs) for b in BITS}
    out["additivity"] = {b: (single[b], inter[b], cal({n: b for n in names})) for b in BITS}
    configs = None
    if kind == "mnist1d":  # brute force: every configuration's measured calibration and test drop
        configs = [dict(zip(names, c)) for c in itertools.product(BITS, repeat=len(names))]
        drops = [cal(c) for c in configs]
        hess_score = [sum(omega[n][c[n]] for n in names) for c in configs]
        aug = tables["dependencies"]
        dep_score = [sum(aug[n][c[n]] for n in names) for c in configs]
        out["spearman"] = {"Hessian ΣΩ": float(spearmanr(hess_score, drops).statistic),
                           "augmented Σs_i(b_i)": float(spearmanr(dep_score, drops).statistic)}
    for w in a.windows:
        limit = w / 100
        rows = {}
        found = {}
        for o, label in zip(ORDERS, METHODS[:3]):
            r = bisection_search(paths[o], damage, limit, sizes)
            assert abs(r.damage - cal(r.bits)) < 1e-12  # the same measurement, two wrapped copies
            found[o] = r
            inside = [k for k, d in enumerate(path_drops[o]) if d <= limit]
            best = min(inside, key=lambda k: (avg(paths[o][k][1]), path_drops[o][k]))
            rows[label] = dict(bits=r.bits, avg=r.size_bits / n_total, cal=r.damage, test=tst(r.bits),
                               evals=len(r.probed) + (0 if o == "Hessian" else deps.evaluations),
                               bisect_evals=len(r.probed), monotone=r.monotone, inside=True,
                               path_min=avg(paths[o][best][1]))
        dp = allocate_bits(omega, sizes, found["dependencies"].size_bits)
        rows["HAWQ DP @ dep. size"] = dict(bits=dp.bits, avg=dp.size_bits / n_total, cal=cal(dp.bits),
                                           test=tst(dp.bits), evals=None, monotone=None,
                                           inside=cal(dp.bits) <= limit, path_min=None)
        if configs is not None:
            ok = [c for c in configs if cal(c) <= limit]
            best = min(ok, key=lambda c: (avg(c), cal(c)))
            rows["oracle"] = dict(bits=best, avg=avg(best), cal=cal(best), test=tst(best), evals=len(configs),
                                  monotone=None, inside=True, path_min=None)
            for r in rows.values():
                r["gap"] = r["avg"] - rows["oracle"]["avg"]
        out["rows"][w] = rows
    out["t_total"] = time.perf_counter() - t0
    hb, db = (out["rows"][a.windows[-1]][m]["avg"] for m in METHODS[:2])
    print(f"{kind} seed {seed}: FP cal acc {fp_cal['accuracy']:.4f} test acc {fp_test['accuracy']:.4f}; train "
          f"{t_train:.1f} s, sensitivities {t_sens:.1f} s ({sens.num_matvecs} HVPs), dependencies {t_deps:.1f} s "
          f"({deps.evaluations} passes); at {a.windows[-1]:g} pts: Hessian {hb:.2f} / dependencies {db:.2f} avg bits; "
          f"{out['t_total']:.1f} s", flush=True)
    return out


# --------------------------------------------------------------------------- report


def fmt_bits(bits, names):
    return "/".join(str(bits[n]) for n in names)


def report(a, res, total, cmd):
    S = a.seeds
    cases = [(r, o) for r in res.values() for o in ORDERS]
    full, cells = sum(r["path_monotone"][o] for r, o in cases), len(cases)
    fdip = max(r["path_dip"][o] for r, o in cases)
    L = ["# Inter-layer dependencies vs pure-Hessian order, bisection inside an accuracy window (issue 19)", "",
         f"Command: `{cmd}`  ", machine_line(), f"Total runtime: {total:.0f} s  ",
         f"Seeds: {', '.join(map(str, S))} (each retrains both networks and redraws the Hessian probes). "
         f"Candidates {BITS}, weights only, per-channel symmetric PTQ. Calibration = the first "
         f"{a.cnn_calib} (CNN) / {a.transformer_calib} (transformer) training samples; windows are accuracy drops "
         "on the calibration set, in points; 'test drop' is the FP test accuracy minus the PTQ test accuracy "
         "(points). Hessian path from `layer_sensitivities(trace_matvecs="
         f"{a.trace_matvecs}).hawq_v2()`; dependency path from `measure_dependencies(metric='accuracy').augmented()` "
         f"(CNN pairs='all', transformer pairs='neighbours'). Mean ± std over seeds. 'evaluations' = calibration "
         "passes (bisection probes, + the dependency measurement for the dependency order; the oracle measures "
         "all 64 configurations); 'monotone' = seeds whose probed drops were non-decreasing along the path "
         "(`BisectionResult.monotone`) / seeds whose drops along the path were, from its start up to the first "
         f"point above 2 × the largest window ({2 * max(a.windows):g} pts; dip: the largest decrease of the measured "
         "drop between consecutive points there, points, over seeds; the whole paths, 2-bit points included, "
         f"are monotone in {full} of the {cells} (model, seed, order) cases, largest dip {fdip * 100:.1f} pts); "
         "'dependency (loss)' = the same augmented table measured with metric='loss' (calibration loss "
         "increase; same number of passes), bisected on the same accuracy window; 'path min' = the cheapest "
         "configuration on the same path measured inside the window (an exhaustive scan of the path); "
         "'− oracle' = average bits above the oracle's; 'inside' = seeds where the configuration's measured "
         "calibration drop is inside the window.", ""]
    L += ["## Networks and costs", "",
          "| model | layers | weights | FP cal acc % | FP test acc % | path length Hessian / dep. | HVPs (sensitivities) "
          "| dependency passes | sensitivities (s) | dependencies (s) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for k in a.models:
        rs = [res[(k, s)] for s in S]
        L.append(f"| {MODELS[k]} | {len(rs[0]['names'])} | {rs[0]['n_total']} | "
                 f"{ms([r['fp_cal']['accuracy'] for r in rs], 100)} | {ms([r['fp_test']['accuracy'] for r in rs], 100)} | "
                 f"{ms([r['path_len']['Hessian'] for r in rs], fmt='.1f')} / "
                 f"{ms([r['path_len']['dependencies'] for r in rs], fmt='.1f')} | {rs[0]['matvecs']} | "
                 f"{rs[0]['dep_evals']} | {ms([r['t_sens'] for r in rs], fmt='.1f')} | "
                 f"{ms([r['t_deps'] for r in rs], fmt='.1f')} |")
    L += ["", "## Bisection inside the window", "",
          "| model | window (pts) | method | avg bits | cal drop (pts) | test drop (pts) | evaluations | monotone "
          "(probed / path) | path min (avg bits) | − oracle (avg bits) | inside |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
    for k in a.models:
        rs = [res[(k, s)] for s in S]
        for w in a.windows:
            for m in METHODS:
                rows = [r["rows"][w].get(m) for r in rs]
                if rows[0] is None:
                    continue
                ev = "–" if rows[0]["evals"] is None else ms([x["evals"] for x in rows], fmt=".1f")
                order = ORDERS[METHODS.index(m)] if METHODS.index(m) < len(ORDERS) else None
                mono = ("–" if order is None else
                        f"{sum(x['monotone'] for x in rows)}/{len(S)} / {sum(r['region_monotone'][order] for r in rs)}/"
                        f"{len(S)} (dip ≤ {max(r['region_dip'][order] for r in rs) * 100:.2f})")
                pm = "–" if rows[0]["path_min"] is None else ms([x["path_min"] for x in rows])
                gap = ms([x["gap"] for x in rows]) if "gap" in rows[0] else "–"
                L.append(f"| {MODELS[k]} | {w:g} | {m} | {ms([x['avg'] for x in rows])} | "
                         f"{ms([x['cal'] for x in rows], 100)} | {ms([x['test'] for x in rows], 100)} | {ev} | {mono} | "
                         f"{pm} | {gap} | {sum(x['inside'] for x in rows)}/{len(S)} |")
    L += ["", "Chosen configurations (bits per layer in layer order; CNN conv1/conv2/fc), per seed:", ""]
    for k in a.models:
        for w in a.windows:
            parts = []
            for m in METHODS:
                if m not in res[(k, S[0])]["rows"][w]:
                    continue
                parts.append(f"{m}: " + ", ".join(fmt_bits(res[(k, s)]["rows"][w][m]["bits"], res[(k, s)]["names"])
                                                 for s in S))
            L.append(f"* {MODELS[k]}, {w:g} pts — " + "; ".join(parts))
    L += ["", "## How additive are the layers' damages? (calibration accuracy drop, points, mean over seeds)", "",
          "| model | bits (all layers) | Σ d_i(b) (singles) | Σ I_ij(b) (pairs measured) | measured drop, all layers at b |",
          "|---|---|---|---|---|"]
    for k in a.models:
        rs = [res[(k, s)] for s in S]
        for b in BITS:
            v = [r["additivity"][b] for r in rs]
            L.append(f"| {MODELS[k]} | {b} | {ms([x[0] for x in v], 100)} | {ms([x[1] for x in v], 100)} | "
                     f"{ms([x[2] for x in v], 100)} |")
    if "mnist1d" in a.models:
        rs = [res[("mnist1d", s)] for s in S]
        L += ["", "CNN, Spearman ρ over all 64 configurations between the measured calibration accuracy drop and the "
              "order's additive score: " + "; ".join(f"{lab} {ms([r['spearman'][lab] for r in rs], fmt='.3f')}"
                                                     for lab in rs[0]["spearman"]) + "."]
    L += ["", "## Verdict (computed from this run)", ""]
    for k in a.models:
        rs = [res[(k, s)] for s in S]
        for w in a.windows:
            h = [r["rows"][w]["Hessian bisection"] for r in rs]
            parts = []
            for m, lab in (("dependency bisection", "dependency"), ("dependency (loss) bisection", "dependency (loss)")):
                d = [r["rows"][w][m] for r in rs]
                diff = [y["avg"] - x["avg"] for x, y in zip(h, d)]
                cheaper = sum(x < -1e-12 for x in diff)
                dearer = sum(x > 1e-12 for x in diff)
                extra = statistics.mean(y["evals"] - x["evals"] for x, y in zip(h, d))
                part = (f"{lab} − Hessian = {statistics.mean(diff):+.3f} avg bits (cheaper in {cheaper}/{len(S)} "
                        f"seeds, dearer in {dearer}, equal in {len(S) - cheaper - dearer}; test drop "
                        f"{statistics.mean(x['test'] for x in d) * 100:.2f} vs {statistics.mean(x['test'] for x in h) * 100:.2f}"
                        f" pts; {extra:+.1f} calibration passes")
                if "oracle" in rs[0]["rows"][w]:
                    part += f"; above the oracle by {statistics.mean(x['gap'] for x in d):.3f}"
                parts.append(part + ")")
            line = f"* {MODELS[k]}, {w:g} pts: " + "; ".join(parts)
            if "oracle" in rs[0]["rows"][w]:
                line += f"; Hessian above the oracle by {statistics.mean(x['gap'] for x in h):.3f} avg bits"
            dp = [r["rows"][w]["HAWQ DP @ dep. size"] for r in rs]
            line += f"; HAWQ DP at the dependency size inside the window in {sum(x['inside'] for x in dp)}/{len(S)}."
            L.append(line)
    L.append("")
    return L


def figure(a, res, plt, png):
    S = a.seeds
    fig, axes = plt.subplots(2, len(a.models), figsize=(6.4 * len(a.models), 8), squeeze=False)
    xs = np.array(a.windows, dtype=float)
    for col, k in enumerate(a.models):
        rs = [res[(k, s)] for s in S]
        for row, (key, lab, scale) in enumerate((("avg", "average bits chosen", 1), ("test", "test accuracy drop (pts)",
                                                                                    100))):
            ax = axes[row][col]
            for j, (m, mk) in enumerate(zip(METHODS, "osvD*")):
                if m not in rs[0]["rows"][a.windows[0]]:
                    continue
                vals = [[r["rows"][w][m][key] * scale for r in rs] for w in a.windows]
                ax.errorbar(xs * (1 + (j - 2) * 0.03), [statistics.mean(v) for v in vals],
                            yerr=[statistics.stdev(v) if len(v) > 1 else 0 for v in vals], marker=mk, capsize=3,
                            label=m)
            if key == "test":
                ax.plot(xs, xs, "k--", lw=1, label="window (on calibration)")
            ax.set_xscale("log")
            ax.minorticks_off()
            ax.set_xticks(xs, [f"{w:g}" for w in a.windows])
            ax.set_xlabel("max calibration accuracy drop (pts)")
            ax.set_ylabel(lab)
            ax.set_title(f"{MODELS[k]}: {lab} (mean ± std, {len(S)} seeds)")
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=list(range(5)))
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--windows", type=float, nargs="+", default=[0.5, 1.0, 2.0], help="max calibration drop, points")
    ap.add_argument("--trace-matvecs", type=int, default=90)
    ap.add_argument("--cnn-calib", type=int, default=4000, help="calibration samples (first N of the training set)")
    ap.add_argument("--transformer-calib", type=int, default=1437)
    ap.add_argument("--quick", action="store_true", help="2 seeds, calibration 1000 / 500 (writes *_quick.*)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="default experiments/results/quant_dependencies (+ '_quick')")
    a = ap.parse_args()
    if a.quick:
        a.seeds, a.cnn_calib, a.transformer_calib = a.seeds[:2], 1000, 500
    a.windows = sorted(a.windows)
    if a.out is None:
        a.out = str(RESULTS / ("quant_dependencies_quick" if a.quick else "quant_dependencies"))
    torch.set_num_threads(a.threads)
    run_quant_experiment(a, "quant_dependencies.py", lambda k, seed, d: run_case(k, seed, d, a), report, figure)


if __name__ == "__main__":
    main()
