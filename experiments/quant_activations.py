"""HAWQ-V2 activation precision: weight-only vs weight+activation mixed precision at equal BOPs (issue 19).

HAWQ-V2 (Dong et al., NeurIPS 2020) extends the Hessian-trace sensitivity to activations,
Omega_act_i(b) = Tr(d2L/da_i2)/n_a_i * ||Q_b(a_i) - a_i||^2 (per-sample means), and reports mixed-precision
activations as "very beneficial for object detection". HAWQ-V3's ILP (Yao et al., ICML 2021) limits the
bit operations BOPs = sum_i MACs_i * w_i * a_i. Here at small scale, with the library's
``quant.activation_sensitivities`` + ``quant.allocate_joint``, on two networks retrained for every seed
(the seed fixes initialisation, batch order and the Hutch++ probes; data and split are fixed):

* MNIST-1D CNN: ``train_mnist1d(seed, 20)`` (``conv1, conv2, fc``; 2960 weights), the default model of
  ``secondorder quantize``; calibration / sensitivity data = the 4000 training sequences in batches of
  1000 (as the CLI's ``_default``), evaluation = the 1000 test sequences;
* digit transformer: ``train_digit_transformer(seed)`` (14 Linear layers, 25,152 weights); calibration =
  the 1437 training images in batches of 500, evaluation = the 360 test images.

Candidates: weights {2, 3, 4, 8} (per-channel symmetric, round to nearest), input activations
{3, 4, 6, 8} (per-tensor asymmetric over the range calibrated on the calibration data); every
quantizable layer gets a (w, a) pair. Weight traces: ``layer_sensitivities(..., trace_matvecs=P)``,
activation traces: ``activation_sensitivities(..., trace_matvecs=P)`` (P = --probes, 60 by default to
fit the time limit; the standard errors are reported). MACs per sample from ``layer_macs``.

BOPs budgets: ``interpolated_budget(low, high, alpha)`` for alpha in {0.25, 0.5, 0.75}, low = all
layers at the lowest pair (W2A3), high = all at W8A8 (HAWQ-V3's Low/Medium/High rows); the size budget is
8 bits per weight, which never binds, so the BOPs decide. Rows per model and alpha:

(a) joint: ``allocate_joint(Omega_w, Omega_act, sizes, macs, bops_budget=G)`` (weights and activations free);
(b) weight only, as ``secondorder quantize --activations`` reports it: activations uniform at the
    highest candidate width for which the weight-only ILP is feasible (``act_pinned`` all equal);
(b*) weight only, the uniform activation width chosen by the smallest summed Omega (beyond the brief:
    separates "mixed activation bits help" from "the highest width that fits is a poor uniform choice");
(c) the best uniform WxAy pair inside the budget by mean test accuracy over the seeds: chosen with
    hindsight on the test set, a reference, not a method.

All PTQ (``quantize(model, bits, act_bits, calibration=data)``), no fine-tuning. Also: does Omega_act
predict activation-quantization damage? --configs random activation configurations per seed (each layer's
width uniform from the candidates, weights in full precision): Spearman correlation of sum Omega_act with the
measured test-loss increase (and the calibration-loss increase), against the curvature-blind
sum ||Q(a) - a||^2 on the same configurations.

Sanity checks on every run: (a) is the minimum of the exact joint (BOPs, sum Omega) frontier
(``joint_frontier``) inside the budget, (b) at 8-bit activations the minimum of the 8-bit frontier;
the ranges ``activation_sensitivities`` reports are the ranges ``quantize(..., calibration=)`` sets.

Run:  OMP_NUM_THREADS=1 .venv/bin/python experiments/quant_activations.py          (3 seeds, about 8-10 min)
      OMP_NUM_THREADS=1 .venv/bin/python experiments/quant_activations.py --quick  (1 seed, 20 probes, 10 configs, 1000 calibration samples)
Writes experiments/results/quant_activations.md and .png (``_quick`` with --quick).
"""

from __future__ import annotations

import argparse
import math
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
from secondorder.quant import (  # noqa: E402
    QuantizedLayer,
    activation_sensitivities,
    allocate_joint,
    interpolated_budget,
    joint_frontier,
    layer_macs,
    layer_sensitivities,
    quantize,
    uniform_cost,
)

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("joint", "weight-only", "weight-only*", "uniform")
LABELS = {"joint": "(a) joint weight + activation", "weight-only": "(b) weight only, highest act. width that fits",
          "weight-only*": "(b*) weight only, act. width by min ΣΩ", "uniform": "(c) best uniform pair (hindsight)"}
ALPHAS = (0.25, 0.5, 0.75)
SIZE_BITS_PER_WEIGHT = 8


def subset(calib, n):
    """The first n calibration samples (None: all), as batches of the same size."""
    if n is None:
        return calib
    x, y = torch.cat([b[0] for b in calib]), torch.cat([b[1] for b in calib])
    return batches(x[:n], y[:n], len(calib[0][0]))


def mac_mean(bits, macs):
    return sum(macs[n] * b for n, b in bits.items()) / sum(macs.values())


class Evaluator:
    """PTQ test (and calibration) loss / accuracy, cached by configuration."""

    def __init__(self, model, calib, test):
        self.model, self.calib, self.test, self.cache = model, calib, [test], {}

    def __call__(self, bits, act_bits, calib_loss=False):
        key = (tuple(sorted(bits.items(), key=str)), tuple(sorted(act_bits.items())), calib_loss)
        if key not in self.cache:
            q = quantize(self.model, bits, act_bits, calibration=self.calib)
            r = evaluate(q, F.cross_entropy, self.test)
            out = {"loss": r["loss"], "acc": r["accuracy"]}
            if calib_loss:
                out["calib_loss"] = evaluate(q, F.cross_entropy, self.calib)["loss"]
            self.cache[key] = (out, q)
        return self.cache[key]


def row(a, macs, high, budget, ev, extra=None):
    res, _ = ev(a.bits, a.act_bits)
    out = {"bops_budget": a.bops / budget, "bops_high": a.bops / high, "omega": a.sensitivity,
           "wbits": a.average_bits, "abits": mac_mean(a.act_bits, macs), "bits": a.bits, "act_bits": a.act_bits,
           **res}
    return {**out, **(extra or {})}


def frontier_min(points, budget):
    inside = [p.sensitivity for p in points if p.bops <= budget]
    return min(inside) if inside else math.inf


def run_case(kind, seed, data, a, figure_seed):
    t0 = time.perf_counter()
    trained, calib = train_quant_model(kind, seed, data)
    calib = subset(calib, a.calib)
    model = trained.model
    t_train = time.perf_counter() - t0
    fp = evaluate(model, F.cross_entropy, [trained.test])
    fp_test = {"loss": fp["loss"], "acc": fp["accuracy"]}
    fp_calib = evaluate(model, F.cross_entropy, calib)["loss"]
    t1 = time.perf_counter()
    sens = layer_sensitivities(model, F.cross_entropy, calib, bits=a.wbits, trace_matvecs=a.probes, seed=seed)
    t_w = time.perf_counter() - t1
    t1 = time.perf_counter()
    acts = activation_sensitivities(model, F.cross_entropy, calib, bits=a.abits, trace_matvecs=a.probes, seed=seed)
    t_a = time.perf_counter() - t1
    t1 = time.perf_counter()
    names = [x.name for x in sens.layers]
    sizes, w_om, a_om = sens.sizes(), sens.hawq_v2(), acts.hawq_v2()
    macs = layer_macs(model, calib[0][0])
    high = uniform_cost(sizes, max(a.wbits), macs, dict.fromkeys(names, max(a.abits)))[1]
    low = uniform_cost(sizes, min(a.wbits), macs, dict.fromkeys(names, min(a.abits)))[1]
    size_budget = SIZE_BITS_PER_WEIGHT * sum(sizes.values())
    ev = Evaluator(model, calib, trained.test)
    front = {"joint": joint_frontier(w_om, a_om, sizes, macs)}
    for b in a.abits:
        front[b] = joint_frontier(w_om, a_om, sizes, macs, act_bits=b)
    checks = []
    rows = {}
    for alpha in ALPHAS:
        G = interpolated_budget(low, high, alpha)
        solve = lambda **kw: allocate_joint(w_om, a_om, sizes, macs, size_budget_bits=size_budget, bops_budget=G,
                                            **kw)
        joint = solve()
        rows[(alpha, "joint")] = row(joint, macs, high, G, ev)
        fixed = {}
        for b in a.abits:
            try:
                fixed[b] = solve(act_pinned=dict.fromkeys(names, b))
            except ValueError:
                continue
        top = max(fixed)  # the highest uniform width that is feasible (the CLI's first weight-only rule)
        best = min(fixed, key=lambda b: fixed[b].sensitivity)
        rows[(alpha, "weight-only")] = row(fixed[top], macs, high, G, ev, {"uniform_act": top})
        rows[(alpha, "weight-only*")] = row(fixed[best], macs, high, G, ev, {"uniform_act": best})
        # checks: the ILP optimum is the frontier's minimum inside the budget; joint <= every fixed width
        for got, points in ((joint.sensitivity, front["joint"]), (fixed[max(a.abits)].sensitivity
                                                                   if max(a.abits) in fixed else None,
                                                                   front[max(a.abits)])):
            if got is not None:
                want = frontier_min(points, G)
                checks.append(abs(got - want) / max(abs(want), 1e-300))
        checks.append(max(0.0, joint.sensitivity - min(f.sensitivity for f in fixed.values())))
    uniform = {}
    for wb in a.wbits:
        for ab in a.abits:
            res, _ = ev(dict.fromkeys(names, wb), dict.fromkeys(names, ab))
            uniform[(wb, ab)] = {**res, "bops_high": wb * ab / (max(a.wbits) * max(a.abits)),
                                 "omega": sum(w_om[n][wb] + a_om[n][ab] for n in names)}
    # Omega_act as a predictor: random activation configurations, weights in full precision
    rng = np.random.default_rng(10_000 + seed)
    errors = {x.name: x.errors for x in acts.layers}
    configs = []
    ranges_ok = True
    for k in range(a.configs):
        cfg = {n: int(rng.choice(a.abits)) for n in names}
        res, q = ev(dict.fromkeys(names), cfg, calib_loss=True)
        if k == 0:  # the ranges the sensitivities used are the ranges calibration set
            for x in acts.layers:
                m = q.get_submodule(x.name)
                assert isinstance(m, QuantizedLayer)
                aq = m.act_quantizer
                ranges_ok &= float(aq.running_min) == x.low and float(aq.running_max) == x.high
        configs.append({"cfg": cfg, "d_test": res["loss"] - fp_test["loss"], "d_calib": res["calib_loss"] - fp_calib,
                        "omega": sum(a_om[n][cfg[n]] for n in names), "mse": sum(errors[n][cfg[n]] for n in names),
                        "acc": res["acc"]})
    corr = {("total", "uniform"): float(spearmanr([u["omega"] for u in uniform.values()],
                                                  [u["loss"] for u in uniform.values()])[0])}
    for pred in ("omega", "mse"):
        for target in ("d_test", "d_calib"):
            corr[(pred, target)] = float(spearmanr([c[pred] for c in configs], [c[target] for c in configs])[0])
    t_ptq = time.perf_counter() - t1
    out = {"fp": fp_test, "fp_calib": fp_calib, "names": names, "sizes": sizes, "macs": macs, "high": high,
           "low": low, "rows": rows, "uniform": uniform, "configs": configs, "corr": corr,
           "check": max(checks), "ranges_ok": ranges_ok,
           "w_layers": {x.name: (x.trace / x.size, x.trace_stderr / x.size) for x in sens.layers},
           "a_layers": {x.name: (x.size, x.trace / x.size, x.trace_stderr / x.size, x.low, x.high)
                        for x in acts.layers},
           "times": {"train": t_train, "weights": t_w, "activations": t_a, "ptq": t_ptq,
                     "total": time.perf_counter() - t0},
           "matvecs": (sens.num_matvecs, acts.num_matvecs)}
    if seed == figure_seed:
        out["front"] = {k: [(p.bops / high, p.sensitivity) for p in v] for k, v in front.items()}
        out["budgets"] = [interpolated_budget(low, high, al) / high for al in ALPHAS]
    r = rows
    print(f"{kind} seed {seed}: FP {100 * fp_test['acc']:.1f} %; "
          + "; ".join(f"α={al}: joint {100 * r[(al, 'joint')]['acc']:.1f} / w-only "
                      f"A{r[(al, 'weight-only')]['uniform_act']} {100 * r[(al, 'weight-only')]['acc']:.1f} / "
                      f"w-only* A{r[(al, 'weight-only*')]['uniform_act']} {100 * r[(al, 'weight-only*')]['acc']:.1f}"
                      for al in ALPHAS)
          + f"; Spearman Ω_act {corr[('omega', 'd_test')]:.2f}, MSE {corr[('mse', 'd_test')]:.2f}; "
          + " ".join(f"{k} {v:.0f} s" for k, v in out["times"].items()), flush=True)
    return out


# --------------------------------------------------------------------------- report


def best_uniform(rs, alpha, a):
    """The uniform pair inside the alpha budget with the best mean test accuracy over the seeds (hindsight)."""
    r0 = rs[0]
    budget = interpolated_budget(r0["low"], r0["high"], alpha) / r0["high"]
    fits = [p for p in r0["uniform"] if r0["uniform"][p]["bops_high"] <= budget + 1e-12]
    return max(fits, key=lambda p: (statistics.mean(r["uniform"][p]["acc"] for r in rs),
                                    -statistics.mean(r["uniform"][p]["loss"] for r in rs)))


def method_rows(rs, alpha, m, a):
    """Per-seed dicts of one method at one alpha (the uniform reference built like the others)."""
    if m != "uniform":
        return [r["rows"][(alpha, m)] for r in rs]
    p = best_uniform(rs, alpha, a)
    out = []
    for r in rs:
        u, budget = r["uniform"][p], interpolated_budget(r["low"], r["high"], alpha)
        out.append({**u, "bops_budget": u["bops_high"] * r["high"] / budget, "wbits": p[0], "abits": p[1],
                    "pair": p})
    return out


def fmt_bits(bits, act):
    return ", ".join(f"{n} {bits[n]}/{act[n]}" for n in bits)


def report(a, res, total, cmd):
    S = a.seeds
    L = ["# Activation precision from Hessians: weight-only vs weight+activation at equal BOPs (issue 19)", "",
         f"Command: `{cmd}`  ", machine_line(), f"Total runtime: {total:.0f} s  ",
         f"Seeds: {', '.join(map(str, S))} (each retrains both networks and redraws the probes; data and split fixed). "
         f"Weight candidates {list(a.wbits)} (per-channel symmetric, round to nearest), activation candidates "
         f"{list(a.abits)} (per-tensor asymmetric, range = min/max on the calibration data). Traces: Hutch++ with "
         f"{a.probes} products (weights: on the whole calibration set; activations: per batch). BOPs budget = "
         f"`interpolated_budget(low, high, α)`, low = all W{min(a.wbits)}A{min(a.abits)}, high = all "
         f"W{max(a.wbits)}A{max(a.abits)}; size budget {SIZE_BITS_PER_WEIGHT} bits per weight (never binds). "
         "Post-training quantization only, no fine-tuning. Mean ± std over seeds.", ""]
    L += ["## Networks", "", "| model | layers | weights | MACs / sample | FP test acc % | FP test loss | "
          "weight / act. matvecs | time per seed: train, weight traces, act. traces, PTQ evals (s) |",
          "|---|---|---|---|---|---|---|---|"]
    for k in a.models:
        rs = [res[(k, s)] for s in S]
        r0 = rs[0]
        t = {x: statistics.mean(r["times"][x] for r in rs) for x in ("train", "weights", "activations", "ptq")}
        L.append(f"| {MODELS[k]} | {len(r0['names'])} | {sum(r0['sizes'].values())} | {sum(r0['macs'].values())} | "
                 f"{ms([r['fp']['acc'] for r in rs], 100)} | {ms([r['fp']['loss'] for r in rs], fmt='.3f')} | "
                 f"{r0['matvecs'][0]} / {r0['matvecs'][1]} | "
                 + ", ".join(f"{v:.0f}" for v in t.values()) + " |")
    L += ["", "## Equal-BOPs comparison", "",
          "BOPs / budget: the configuration's BOPs over the α budget. Avg weight bits: size-weighted; avg act. bits: "
          "MAC-weighted (what the BOPs see). ΣΩ = Σ Ω_w + Σ Ω_act (the ILP's objective). 'joint > row' = seeds where "
          "joint has the strictly higher test accuracy (ties in brackets). (b)/(b*) name the uniform activation "
          "width with the number of seeds that chose it. (c) is one pair per model and α, picked by the mean test "
          "accuracy over the seeds among the uniform pairs inside the budget: hindsight on the test set.", "",
          "| model | α | row | BOPs / budget | ΣΩ | avg weight bits | avg act. bits | test acc % | test loss | "
          "joint > row (seeds) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for k in a.models:
        rs = [res[(k, s)] for s in S]
        fp = rs[0]
        L.append(f"| {MODELS[k]} | – | full precision | – | – | 32 | 32 | {ms([r['fp']['acc'] for r in rs], 100)} | "
                 f"{ms([r['fp']['loss'] for r in rs], fmt='.3f')} | – |")
        del fp
        for alpha in ALPHAS:
            joint = method_rows(rs, alpha, "joint", a)
            for m in METHODS:
                x = method_rows(rs, alpha, m, a)
                label = LABELS[m]
                if m in ("weight-only", "weight-only*"):
                    widths = [y["uniform_act"] for y in x]
                    label += " [" + ", ".join(f"A{w}×{widths.count(w)}" for w in sorted(set(widths))) + "]"
                if m == "uniform":
                    label += f" W{x[0]['pair'][0]}A{x[0]['pair'][1]}"
                beats = "–" if m == "joint" else (
                    f"{sum(j['acc'] > y['acc'] for j, y in zip(joint, x))}/{len(S)} "
                    f"({sum(j['acc'] == y['acc'] for j, y in zip(joint, x))})")
                L.append(f"| {MODELS[k]} | {alpha} | {label} | {ms([y['bops_budget'] for y in x], fmt='.3f')} | "
                         f"{ms([y['omega'] for y in x], fmt='.3g')} | {ms([y['wbits'] for y in x])} | "
                         f"{ms([y['abits'] for y in x])} | {ms([y['acc'] for y in x], 100)} | "
                         f"{ms([y['loss'] for y in x], fmt='.3f')} | {beats} |")
    L += ["", f"Checks on all {len(res) * len(ALPHAS)} allocations: the ILP's ΣΩ equals the minimum of the exact "
          "`joint_frontier` inside the budget (joint, and weight only at 8-bit activations) and joint ΣΩ ≤ every "
          f"fixed-width ΣΩ: largest relative deviation {max(r['check'] for r in res.values()):.1e}; the activation "
          "ranges of `activation_sensitivities` equal those `quantize(..., calibration=)` sets: "
          f"{'yes' if all(r['ranges_ok'] for r in res.values()) else 'NO'} on every run.", ""]
    L += [f"## Chosen (weight / activation) bits, seed {S[0]}", "", "| model | α | row | bits (layer w/a) |",
          "|---|---|---|---|"]
    for k in a.models:
        r = res[(k, S[0])]
        for alpha in ALPHAS:
            for m in METHODS[:3]:
                x = r["rows"][(alpha, m)]
                L.append(f"| {MODELS[k]} | {alpha} | {LABELS[m].split(' ')[0]} | {fmt_bits(x['bits'], x['act_bits'])} |")
    L += ["", "## Uniform pairs WxAy: test accuracy % (mean over seeds; BOPs / all-W8A8 in brackets)", ""]
    for k in a.models:
        rs = [res[(k, s)] for s in S]
        L += [f"**{MODELS[k]}**", "", "| weights \\ activations | " + " | ".join(f"A{b}" for b in a.abits) + " |",
              "|---|" + "---|" * len(a.abits)]
        for wb in a.wbits:
            L.append(f"| W{wb} | " + " | ".join(
                f"{100 * statistics.mean(r['uniform'][(wb, ab)]['acc'] for r in rs):.1f} "
                f"({rs[0]['uniform'][(wb, ab)]['bops_high']:.3f})" for ab in a.abits) + " |")
        L.append("")
    L += ["## Does Ω_act predict activation-quantization damage?", "",
          f"{a.configs} random activation configurations per seed (each layer's width uniform from "
          f"{list(a.abits)}), weights in full precision. Spearman ρ over the configurations of the predictor with "
          "the measured loss increase (PTQ model minus FP), per seed, mean ± std; 'Ω_act wins' = seeds where "
          "ΣΩ_act has the higher ρ.", "",
          "| model | target | ρ(ΣΩ_act) | ρ(Σ‖Q(a)−a‖²) | Ω_act wins | per-seed ρ (Ω_act / MSE) | Δ test loss range |",
          "|---|---|---|---|---|---|---|"]
    for k in a.models:
        rs = [res[(k, s)] for s in S]
        for target, lab in (("d_test", "test loss"), ("d_calib", "calibration loss")):
            o = [r["corr"][("omega", target)] for r in rs]
            e = [r["corr"][("mse", target)] for r in rs]
            d = [c["d_test"] for r in rs for c in r["configs"]]
            L.append(f"| {MODELS[k]} | {lab} | {ms(o)} | {ms(e)} | {sum(x > y for x, y in zip(o, e))}/{len(S)} | "
                     + ", ".join(f"{x:.2f}/{y:.2f}" for x, y in zip(o, e)) + f" | {min(d):.3g} … {max(d):.3g} |")
    L += ["", "The joint objective on weights and activations together: Spearman ρ of ΣΩ_w + ΣΩ_act with the PTQ "
          f"test loss over the {len(a.wbits) * len(a.abits)} uniform pairs WxAy, per seed: "
          + "; ".join(f"{MODELS[k]} {ms([res[(k, s)]['corr'][('total', 'uniform')] for s in S])} ("
                      + ", ".join(f"{res[(k, s)]['corr'][('total', 'uniform')]:.2f}" for s in S) + ")"
                      for k in a.models) + "."]
    L += ["", "## Per-layer curvature (mean over seeds)", "",
          "| model | layer | weights | MACs | Tr(H_w)/n ± se | act. entries | Tr(H_a)/n_a ± se | act. range (seed "
          f"{S[0]}) |", "|---|---|---|---|---|---|---|---|"]
    for k in a.models:
        rs = [res[(k, s)] for s in S]
        for n in rs[0]["names"]:
            wt = statistics.mean(r["w_layers"][n][0] for r in rs)
            we = statistics.mean(r["w_layers"][n][1] for r in rs)
            at = statistics.mean(r["a_layers"][n][1] for r in rs)
            ae = statistics.mean(r["a_layers"][n][2] for r in rs)
            lo, hi = rs[0]["a_layers"][n][3:5]
            L.append(f"| {MODELS[k]} | {n} | {rs[0]['sizes'][n]} | {rs[0]['macs'][n]} | {wt:.3g} ± {we:.1g} | "
                     f"{rs[0]['a_layers'][n][0]} | {at:.3g} ± {ae:.1g} | [{lo:.2f}, {hi:.2f}] |")
    L += ["", "## Summary (computed from this run)", ""]
    for k in a.models:
        rs = [res[(k, s)] for s in S]
        for alpha in ALPHAS:
            mean = {m: 100 * statistics.mean(y["acc"] for y in method_rows(rs, alpha, m, a)) for m in METHODS}
            L.append(f"* {MODELS[k]}, α = {alpha}: joint {mean['joint']:.1f} %, weight only (highest width) "
                     f"{mean['weight-only']:.1f} % ({mean['joint'] - mean['weight-only']:+.1f} pts), weight only "
                     f"(min ΣΩ width) {mean['weight-only*']:.1f} % ({mean['joint'] - mean['weight-only*']:+.1f}), "
                     f"best uniform (hindsight) {mean['uniform']:.1f} % ({mean['joint'] - mean['uniform']:+.1f}).")
    L.append("")
    return L


def figure(a, res, plt, png):
    S = a.seeds
    fig, axes = plt.subplots(4, len(a.models), figsize=(7 * len(a.models), 18), squeeze=False)
    marks = {"joint": ("*", "tab:red"), "weight-only": ("D", "k"), "weight-only*": ("s", "tab:blue"),
             "uniform": ("o", "tab:grey")}
    for col, k in enumerate(a.models):
        rs = [res[(k, s)] for s in S]
        r0 = next(r for r in rs if "front" in r)
        ax = axes[0][col]
        xs, ys = zip(*r0["front"]["joint"])
        ax.step(xs, ys, where="post", color="tab:red", label="weight + activation (joint)")
        for b in a.abits:
            xs, ys = zip(*r0["front"][b])
            ax.step(xs, ys, where="post", color="k" if b == max(a.abits) else str(0.35 + 0.15 * a.abits.index(b)),
                    lw=1.8 if b == max(a.abits) else 0.8, ls="-" if b == max(a.abits) else ":",
                    label=f"weight only, A{b}")
        for alpha, g in zip(ALPHAS, r0["budgets"]):
            ax.axvline(g, color="grey", ls="--", lw=0.8)
            for m in METHODS[:3]:
                x = r0["rows"][(alpha, m)]
                ax.plot([x["bops_high"]], [x["omega"]], marks[m][0], color=marks[m][1], ms=11 if m == "joint" else 7,
                        mfc="none" if m == "weight-only*" else marks[m][1],
                        label=LABELS[m] if alpha == ALPHAS[0] else None)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("BOPs / BOPs(all W8A8)")
        ax.set_ylabel("ΣΩ (weights + activations)")
        ax.set_title(f"{MODELS[k]}: ΣΩ–BOPs frontiers (seed {S[0]})\nchosen points at α = 0.25/0.5/0.75 "
                     "(dashed: budgets)", fontsize=10)
        ax.legend(fontsize=7)
        ax = axes[1][col]
        for j, m in enumerate(METHODS):
            pts = [method_rows(rs, al, m, a) for al in ALPHAS]
            x = [statistics.mean(y["bops_high"] for y in p) for p in pts]
            y = [100 * statistics.mean(z["acc"] for z in p) for p in pts]
            e = [100 * statistics.stdev([z["acc"] for z in p]) if len(p) > 1 else 0 for p in pts]
            ax.errorbar(np.array(x) * (1 + 0.01 * (j - 1.5)), y, yerr=e, marker=marks[m][0], color=marks[m][1],
                        capsize=3, label=LABELS[m])
        ax.axhline(100 * statistics.mean(r["fp"]["acc"] for r in rs), color="k", ls="--", lw=1, label="full precision")
        ax.set_xlabel("BOPs / BOPs(all W8A8)")
        ax.set_ylabel("PTQ test accuracy %")
        ax.set_title(f"{MODELS[k]}: PTQ test accuracy at α = 0.25/0.5/0.75\n(mean ± std, {len(S)} seeds)",
                     fontsize=10)
        ax.legend(fontsize=7)
        for row, (pred, lab) in enumerate((("omega", "ΣΩ_act"), ("mse", "Σ ‖Q(a)−a‖² (curvature-blind)")), start=2):
            ax = axes[row][col]
            for s, r in zip(S, rs):
                ax.scatter([c[pred] for c in r["configs"]], [c["d_test"] for c in r["configs"]], s=12,
                           label=f"seed {s}: ρ = {r['corr'][(pred, 'd_test')]:.2f}")
            ax.set_xscale("log")
            d = [c["d_test"] for r in rs for c in r["configs"]]
            if min(d) > 0:
                ax.set_yscale("log")
                ax.set_ylim(min(d) / 1.5, max(d) * 1.5)
            else:
                lt = max(1e-4, min(abs(x) for x in d if x) if any(d) else 1e-3)
                ax.set_yscale("symlog", linthresh=lt)
                ax.set_ylim(min(1.5 * min(d), -lt), 1.5 * max(d))
            ax.set_xlabel(lab)
            ax.set_ylabel("test-loss increase (weights FP)")
            ax.set_title(f"{MODELS[k]}: {lab.split(' (')[0]} vs damage\n({a.configs} random activation "
                         "configurations per seed)", fontsize=10)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=100)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--wbits", type=int, nargs="+", default=[2, 3, 4, 8], help="weight candidates")
    ap.add_argument("--abits", type=int, nargs="+", default=[3, 4, 6, 8], help="activation candidates")
    ap.add_argument("--probes", type=int, default=60, help="Hutch++ products per trace (default 60)")
    ap.add_argument("--configs", type=int, default=30, help="random activation configurations per seed")
    ap.add_argument("--calib", type=int, default=None, help="calibration samples (default: the whole training set)")
    ap.add_argument("--quick", action="store_true",
                    help="1 seed, 20 probes, 10 configs, the first 1000 calibration samples (writes quant_activations_quick.*)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="default experiments/results/quant_activations (+ '_quick')")
    a = ap.parse_args()
    a.wbits, a.abits = tuple(sorted(set(a.wbits))), tuple(sorted(set(a.abits)))
    if a.quick:
        a.seeds, a.probes, a.configs, a.calib = a.seeds[:1], 20, 10, a.calib or 1000
    if a.out is None:
        a.out = str(RESULTS / ("quant_activations_quick" if a.quick else "quant_activations"))
    torch.set_num_threads(a.threads)
    run_quant_experiment(a, "quant_activations.py", lambda k, seed, d: run_case(k, seed, d, a, a.seeds[0]), report, figure)


if __name__ == "__main__":
    main()
