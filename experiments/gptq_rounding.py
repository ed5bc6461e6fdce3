"""Second-order rounding (GPTQ, Frantar et al. ICLR 2023) vs round-to-nearest, without fine-tuning: issue 19.

GPTQ's claim: rounding each layer's weights to keep the layer's output on calibration data
(OBQ's error compensation with the layer Hessian H = 2/n XᵀX, layer after layer) keeps a
network usable at 3-4 bits where round-to-nearest (RTN) breaks it, with no fine-tuning at all.
Here at small scale, on two networks retrained for every seed (the seed fixes the initialisation
and the batch order; the data and the split are the same for every seed):

* MNIST-1D CNN: ``train_mnist1d(seed, epochs=20)`` (Conv1d 1-16-32 + Linear; layers ``conv1``
  (5 columns), ``conv2`` (80), ``fc`` (32); 2960 weights), the default model of
  ``secondorder quantize``. Calibration = the 4000 training sequences in batches of 1000, as the
  CLI does.
* digit transformer: ``train_digit_transformer(seed)`` (scikit-learn's 8x8 digits as 8 row-tokens,
  d = 32, 4 heads, 2 pre-LN blocks, mean pooling; 14 Linear layers, 25,152 weights; Adam, 30
  epochs). Calibration = the 1437 training images (11,496 tokens).

Every quantizable layer (first and last included) at the same bit width, weights only,
per-channel symmetric (the library's grid: codes in [-2^(b-1), 2^(b-1)-1], scale max|w| / (2^(b-1)-1)
per output row); biases, LayerNorms, the position embedding and the activations stay in full precision.
Three roundings on that same grid: RTN (``quantize``), GPTQ (``gptq_quantize``, sequential, natural
column order, percdamp 0.01, block 128) and GPTQ with activation order (``act_order=True``). Test
accuracy and test cross-entropy (360 / 1000 test samples), the loss on the calibration (train) set,
and GPTQ's own report: the layer output errors tr(ΔW H ΔWᵀ) of GPTQ and of RTN on the same inputs
(summed over layers), the damping raises. Sanity checks run on every GPTQ model: its weights lie on
the RTN grid, everything but the rounded weights is unchanged, and the first layer's reported
errors match a recomputation from ``layer_hessians``.

Run:  OMP_NUM_THREADS=1 .venv/bin/python experiments/gptq_rounding.py          (10 seeds, about 3-4 min)
      OMP_NUM_THREADS=1 .venv/bin/python experiments/gptq_rounding.py --quick  (3 seeds, 4 and 3 bits)
Writes experiments/results/gptq_rounding.md and experiments/results/gptq_rounding.png.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import QUANT_MODELS as MODELS  # noqa: E402
from common import machine_line, ms, run_quant_experiment, train_quant_model  # noqa: E402

from secondorder.quant import gptq_quantize, layer_hessians, quantizable_layers, quantize  # noqa: E402
from secondorder.quant.quantizers import quantize_weight, symmetric_scale  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
ROUNDINGS = ("nearest", "GPTQ", "GPTQ act-order")


@torch.no_grad()
def evaluate(model, data):
    x, y = data
    out = model(x)
    return float(F.cross_entropy(out, y)), float((out.argmax(-1) == y).float().mean())


def check_gptq(model, result, calib, names, b):
    """GPTQ's weights on the RTN grid, nothing else changed, first layer's errors recomputed."""
    q = result.model
    rounded = {f"{n}.weight" for n in names}
    before, after = model.state_dict(), q.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k not in rounded), "GPTQ changed other tensors"
    qmax = 2 ** (b - 1) - 1
    for n in names:
        w0, w = model.get_submodule(n).weight.detach(), q.get_submodule(n).weight.detach()
        codes = w / symmetric_scale(w0, b, "channel")
        assert torch.allclose(codes, codes.round(), atol=1e-3), f"{n}: GPTQ weight off the RTN grid"
        assert codes.round().min() >= -qmax - 1 and codes.round().max() <= qmax, f"{n}: codes out of range"
    first = next(iter(result.layers))  # its inputs are the model's inputs in both modes
    h = layer_hessians(model, calib, [first])[first]
    w0 = model.get_submodule(first).weight.detach()
    for got, w in ((result.layers[first].error, q.get_submodule(first).weight.detach()),
                   (result.layers[first].nearest_error, quantize_weight(w0, b, "channel"))):
        d = (w0 - w).flatten(1).double()
        want = float(((d @ h) * d).sum())
        assert abs(got - want) <= 1e-6 * max(1.0, abs(want)), (first, got, want)


def run_case(kind, seed, data, bits_list):
    t0 = time.perf_counter()
    trained, calib = train_quant_model(kind, seed, data)
    model = trained.model
    t_train = time.perf_counter() - t0
    names = [n for n, _ in quantizable_layers(model)]
    out = {"fp": (*evaluate(model, trained.test), evaluate(model, trained.train)[0]),
           "t_train": t_train, "names": names, "rows": {}, "layers": {},
           "n_weights": sum(m.weight.numel() for _, m in quantizable_layers(model))}
    for b in bits_list:
        bits = {n: b for n in names}
        qm = quantize(model, bits)
        out["rows"][(b, "nearest")] = dict(zip(("loss", "acc"), evaluate(qm, trained.test)),
                                           train_loss=evaluate(qm, trained.train)[0])
        for label, act in (("GPTQ", False), ("GPTQ act-order", True)):
            t1 = time.perf_counter()
            r = gptq_quantize(model, bits, calib, act_order=act)
            t_gptq = time.perf_counter() - t1
            check_gptq(model, r, calib, names, b)
            L = list(r.layers.values())
            loss, acc = evaluate(r.model, trained.test)
            out["rows"][(b, label)] = dict(
                loss=loss, acc=acc, train_loss=evaluate(r.model, trained.train)[0], time=t_gptq,
                error=sum(x.error for x in L), nearest_error=sum(x.nearest_error for x in L),
                raises=sum(x.damping_raises for x in L), max_rel_damping=max(x.relative_damping for x in L),
                dead=sum(x.dead_inputs for x in L))
            out["layers"][(b, label)] = {x.name: (x.columns, x.samples, x.error, x.nearest_error) for x in L}
    fp = out["fp"]
    print(f"{kind} seed {seed}: trained in {t_train:.1f} s, FP test acc {fp[1]:.4f} loss {fp[0]:.4f}; "
          + "; ".join(f"{b} bits " + " / ".join(f"{out['rows'][(b, m)]['acc']:.3f}" for m in ROUNDINGS)
                      for b in bits_list)
          + f" (nearest / GPTQ / act-order); {time.perf_counter() - t0:.1f} s", flush=True)
    return out


# --------------------------------------------------------------------------- report helpers


def wins(a, b, key, higher):
    """Seeds where a is strictly better than b (and the ties)."""
    better = sum((x[key] > y[key]) if higher else (x[key] < y[key]) for x, y in zip(a, b))
    ties = sum(x[key] == y[key] for x, y in zip(a, b))
    return better, ties


def report(a, res, total, cmd):
    S = a.seeds
    L = ["# Second-order rounding: GPTQ vs round-to-nearest, no fine-tuning (issue 19)", "",
         f"Command: `{cmd}`  ", machine_line(), f"Total runtime: {total:.0f} s  ",
         f"Seeds: {', '.join(map(str, S))} (each retrains both networks: initialisation and batch order; data, "
         "split and calibration set fixed). Every quantizable layer at the same bits, weights only, per-channel "
         "symmetric; biases, LayerNorms, position embedding and activations in full precision. GPTQ: "
         "`gptq_quantize(model, bits, calibration, act_order=...)`, sequential, percdamp 0.01, block 128; "
         "calibration = the training set (MNIST-1D: 4000 sequences; digits: 1437 images = 11,496 tokens). "
         "Mean ± std over seeds. 'train loss' is on the calibration data. 'better than nearest' counts the seeds "
         "where the row is strictly better than round-to-nearest at the same bits (accuracy / test loss). "
         "'Σ error / Σ RTN error' = GPTQ's summed layer output errors tr(ΔW H ΔWᵀ) over the summed errors of "
         "round-to-nearest of the same layers on the same inputs (GPTQ's `error` / `nearest_error`; sequential, "
         "so a layer's inputs come through the already GPTQ-rounded layers before it).", ""]
    L += ["## Networks (full precision)", "", "| model | layers | weights | test acc % | test loss | train loss | "
          "training time (s) |", "|---|---|---|---|---|---|---|"]
    for k in a.models:
        rs = [res[(k, s)] for s in S]
        names = rs[0]["names"]
        L.append(f"| {MODELS[k]} | {len(names)} | {rs[0]['n_weights']} | {ms([r['fp'][1] for r in rs], 100)} | "
                 f"{ms([r['fp'][0] for r in rs], fmt='.3f')} | {ms([r['fp'][2] for r in rs], fmt='.3f')} | "
                 f"{ms([r['t_train'] for r in rs], fmt='.1f')} |")
    L += ["", "## Test accuracy and loss", "",
          "| model | bits | rounding | test acc % | test loss | train loss | better than nearest (acc / loss, seeds) | "
          "Σ error / Σ RTN error | damping raises (max rel. damping) | GPTQ time (s) |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    for k in a.models:
        rs = [res[(k, s)] for s in S]
        L.append(f"| {MODELS[k]} | 32 | full precision | {ms([r['fp'][1] for r in rs], 100)} | "
                 f"{ms([r['fp'][0] for r in rs], fmt='.3f')} | {ms([r['fp'][2] for r in rs], fmt='.3f')} | – | – | – | – |")
        for b in a.bits:
            near = [r["rows"][(b, "nearest")] for r in rs]
            for m in ROUNDINGS:
                rows = [r["rows"][(b, m)] for r in rs]
                cells = [f"{MODELS[k]}", f"{b}", m, ms([x["acc"] for x in rows], 100),
                         ms([x["loss"] for x in rows], fmt=".3f"), ms([x["train_loss"] for x in rows], fmt=".3f")]
                if m == "nearest":
                    cells += ["–", "1", "–", "–"]
                else:
                    wa, wl = wins(rows, near, "acc", True)[0], wins(rows, near, "loss", False)[0]
                    cells += [f"acc {wa}/{len(S)}, loss {wl}/{len(S)}",
                              ms([x["error"] / x["nearest_error"] for x in rows], fmt=".3f"),
                              f"{sum(x['raises'] for x in rows)} ({max(x['max_rel_damping'] for x in rows):.2g})",
                              ms([x["time"] for x in rows], fmt=".2f")]
                L.append("| " + " | ".join(cells) + " |")
    L += ["", "Dead inputs (H_ii = 0) over all runs: "
          f"{sum(r['rows'][(b, m)]['dead'] for r in res.values() for b in a.bits for m in ROUNDINGS[1:])}. "
          f"Sanity checks passed on all {len(res) * len(a.bits) * 2} GPTQ models: weights on the RTN grid, every "
          "other tensor unchanged, first layer's reported errors = tr(ΔW H ΔWᵀ) from `layer_hessians`.", ""]
    b0 = 3 if 3 in a.bits else a.bits[0]
    L += [f"## Per layer at {b0} bits: GPTQ's layer output error / RTN's (mean over seeds)", "",
          "| model | layer | columns | samples | GPTQ / RTN | act-order / RTN |", "|---|---|---|---|---|---|"]
    for k in a.models:
        rs = [res[(k, s)] for s in S]
        for n in rs[0]["names"]:
            cols, samples = rs[0]["layers"][(b0, "GPTQ")][n][:2]
            ratio = lambda m, n=n: ms([r["layers"][(b0, m)][n][2] / r["layers"][(b0, m)][n][3] for r in rs],
                                      fmt=".3f")
            L.append(f"| {MODELS[k]} | {n} | {cols} | {samples} | {ratio('GPTQ')} | {ratio('GPTQ act-order')} |")
    L += ["", "## Comparison with the paper's claim (computed from this run)", ""]
    for k in a.models:
        rs = [res[(k, s)] for s in S]
        fp = statistics.mean(r["fp"][1] for r in rs) * 100
        for b in a.bits:
            mean = {m: statistics.mean(r["rows"][(b, m)]["acc"] for r in rs) * 100 for m in ROUNDINGS}
            loss = {m: statistics.mean(r["rows"][(b, m)]["loss"] for r in rs) for m in ROUNDINGS}
            n, g, ao = ([r["rows"][(b, m)] for r in rs] for m in ROUNDINGS)
            L.append(f"* {MODELS[k]}, {b} bits: FP {fp:.1f} %, nearest {mean['nearest']:.1f} % (loss "
                     f"{loss['nearest']:.3f}), GPTQ {mean['GPTQ']:.1f} % ({loss['GPTQ']:.3f}; "
                     f"{mean['GPTQ'] - mean['nearest']:+.1f} pts, better acc in {wins(g, n, 'acc', True)[0]}/"
                     f"{len(S)}, lower loss in {wins(g, n, 'loss', False)[0]}/{len(S)} seeds), act-order "
                     f"{mean['GPTQ act-order']:.1f} % ({loss['GPTQ act-order']:.3f}; vs GPTQ "
                     f"{mean['GPTQ act-order'] - mean['GPTQ']:+.1f} pts, better acc in {wins(ao, g, 'acc', True)[0]}/"
                     f"{len(S)}, lower loss in {wins(ao, g, 'loss', False)[0]}/{len(S)} seeds).")
    L.append("")
    return L


def figure(a, res, plt, png):
    S = a.seeds
    fig, axes = plt.subplots(2, len(a.models), figsize=(6.2 * len(a.models), 8), squeeze=False)
    xs = sorted(a.bits)
    for col, k in enumerate(a.models):
        rs = [res[(k, s)] for s in S]
        for row, (key, lab, scale) in enumerate((("acc", "test accuracy %", 100), ("loss", "test loss", 1))):
            ax = axes[row][col]
            for j, (m, mk) in enumerate(zip(ROUNDINGS, "osD")):
                vals = [[r["rows"][(b, m)][key] * scale for r in rs] for b in xs]
                ax.errorbar(np.array(xs) + (j - 1) * 0.06, [statistics.mean(v) for v in vals],
                            yerr=[statistics.stdev(v) if len(v) > 1 else 0 for v in vals], marker=mk, capsize=3,
                            label=m)
            fp = statistics.mean(r["fp"][0 if key == "loss" else 1] for r in rs) * scale
            ax.axhline(fp, color="k", ls="--", lw=1, label="full precision")
            ax.set_xticks(xs)
            ax.set_xlabel("bits (every layer, per-channel)")
            ax.set_ylabel(lab)
            if key == "loss":
                ax.set_yscale("log")
            ax.set_title(f"{MODELS[k]}: {lab} (mean ± std, {len(S)} seeds)")
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=list(range(10)))
    ap.add_argument("--bits", type=int, nargs="+", default=[8, 4, 3, 2])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--quick", action="store_true", help="3 seeds, 4 and 3 bits (writes gptq_rounding_quick.*)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="default experiments/results/gptq_rounding (+ '_quick')")
    a = ap.parse_args()
    if a.quick:
        a.seeds, a.bits = a.seeds[:3], [4, 3]
    if a.out is None:
        a.out = str(RESULTS / ("gptq_rounding_quick" if a.quick else "gptq_rounding"))
    torch.set_num_threads(a.threads)
    run_quant_experiment(a, "gptq_rounding.py", lambda k, seed, d: run_case(k, seed, d, a.bits), report, figure)


if __name__ == "__main__":
    main()
