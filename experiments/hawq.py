"""Hessian-aware mixed-precision quantization (HAWQ-V1/V2/V3) at small scale: issue 5's reproductions.

Two networks, each trained from scratch for every seed (the seed fixes the initialisation, the
batch order, the Hutch++/Lanczos probes, the random allocations and the QAT batch order):

* digits: scikit-learn ``load_digits`` (8x8, 1797 samples), a seeded stratified 80/20 split
  (``random_state=0``, the same for every seed), standardised with the train statistics
  (``StandardScaler``); an MLP 64-128-128-64-10 with ReLU and exactly 4 Linear layers
  (``fc1..fc4``, 33,408 weights), Adam lr 1e-3, 400 steps of batch 64. Sensitivities on the
  whole train set (1437 samples).
* MNIST-1D: ``train_mnist1d(seed, epochs=20)`` (Conv1d 1-16-32 + Linear, 3 quantizable layers
  ``conv1, conv2, fc``, 2960 weights). Sensitivities on the first 2000 of the 4000 training
  sequences.

Weights only are quantized (per-channel symmetric, the library default); biases and activations
stay in full precision. Sensitivities: ``layer_sensitivities(..., bits=(2, 3, 4, 8),
trace_matvecs=90)`` (Hutch++ traces from one probe set and Lanczos top eigenvalues per layer).
Losses and accuracies are on the test set (360 / 1000 samples); Δℓ = test cross-entropy of the
quantized model minus that of the full-precision one.

Q1 ("Ω predicts damage", HAWQ-V2): every configuration in {2,3,4,8}^L (256 / 64), post-training
quantization (PTQ) only; Spearman correlation of Δℓ with ΣΩ for the three variants
``hawq_v2`` (Tr(H_i)/n_i ||ΔW_i||^2), ``eigenvalue_weighted`` (λmax(H_i) ||ΔW_i||^2) and
``unweighted`` (||ΔW_i||^2). Two references that are not HAWQ variants: the exact block-diagonal
quadratic Σ_i ΔW_iᵀ H_ii ΔW_i (L x 4 Hessian-vector products) and the full second-order Taylor
prediction gᵀΔ + ½ ΔᵀHΔ (one HVP per configuration, cross-layer terms included), both on the
sensitivity data. Also: is Δℓ monotone along the min-ΣΩ Pareto frontier?

Q2 (ordering ablation, HAWQ-V1/V2) at a size budget of an average of 3 bits (3 Σ n_i bits),
candidates {2,3,4,8}:
* Hessian: ``allocate_bits(hawq_v2, sizes, budget)`` (exact DP; checked against brute force);
* uniform: all layers at 3 bits;
* random: 20 draws (with replacement) uniformly from the *budget-filling* configurations, i.e.
  those within the budget where no single layer can be raised to its next candidate width
  without exceeding it (so random allocations use the budget as fully as the others; the
  number of such configurations is reported); the row is the mean over the 20 draws;
* reverse: the same DP with the curvature factor inverted, Ω_rev_i(b) = (n_i / Tr(H_i)) ||ΔW_i(b)||^2,
  so the ranking of the layers by per-weight curvature Tr(H_i)/n_i is exactly reversed (the most
  sensitive layer is treated as the least), same budget;
* extra row "adversarial": the budget-filling configuration with the largest ΣΩ (hawq_v2).
Each is evaluated after PTQ and after a short QAT (``finetune``: SGD momentum 0.9, lr 1e-2,
2 epochs over the train set, batch 64 / 128, same batches for every configuration of a seed).

Q3 (HAWQ-V3's ILP) with bits {4,8}: budgets interpolated between all-4 and all-8 at α = 0.25,
0.5, 0.75, on the size (Σ n_i b_i) and, separately, on the BOPs (Σ MACs_i b_i a_i with a_i = b_i
as in HAWQ-V3, MACs per sample from forward hooks); ``allocate_bits_ilp`` vs ``brute_force``
(asserted equal), the constraint margins, and the accuracy / Δℓ of FP32, W8, the mixed
configurations and W4, after PTQ and after QAT. Mixed vs uniform at equal size: candidates
{2,3,4,8}, DP at b Σ n_i bits vs uniform b, for b = 3 and 4.

Run:  .venv/bin/python experiments/hawq.py          (10 seeds, about 4 min on one thread)
Writes experiments/results/hawq_repro.md and experiments/results/hawq_repro.png.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_line, write_markdown  # noqa: E402

from secondorder.datasets.mnist1d import load_mnist1d, train_mnist1d  # noqa: E402
from secondorder.quant import (  # noqa: E402
    allocate_bits,
    allocate_bits_ilp,
    brute_force,
    enumerate_configurations,
    finetune,
    interpolated_budget,
    layer_macs,
    layer_sensitivities,
    pareto_frontier,
    quantizable_layers,
    quantize,
    uniform_cost,
)
from secondorder.quant.quantizers import quantize_weight  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
BITS = (2, 3, 4, 8)
ALPHAS = (0.25, 0.5, 0.75)
VARIANTS = {"trace (HAWQ-V2)": "hawq_v2", "top eigenvalue": "eigenvalue_weighted", "unweighted ||ΔW||²": "unweighted"}
REFERENCES = ("block-diag ΔᵀHΔ (exact)", "Taylor gᵀΔ+½ΔᵀHΔ (full)")
Q2_METHODS = ("Hessian", "uniform", "random", "reverse", "reverse (inverted-Ω DP)", "adversarial")
SHORT = {"reverse (inverted-Ω DP)": "rev. DP", "adversarial": "advers."}


# --------------------------------------------------------------------------- data and models


class DigitsMLP(nn.Module):
    """64-128-128-64-10 with ReLU: exactly 4 Linear layers (4^4 = 256 bit configurations)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3, self.fc4 = nn.Linear(64, 128), nn.Linear(128, 128), nn.Linear(128, 64), nn.Linear(64, 10)

    def forward(self, x):
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc4(F.relu(self.fc3(x)))


def digits_data():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    d = load_digits()
    xtr, xte, ytr, yte = train_test_split(d.data, d.target, test_size=0.2, random_state=0, stratify=d.target)
    scaler = StandardScaler().fit(xtr)  # zero-variance pixels get scale 1
    f = lambda a: torch.tensor(scaler.transform(a), dtype=torch.float32)
    return (f(xtr), torch.tensor(ytr)), (f(xte), torch.tensor(yte))


def train_digits(seed, train, steps=400, batch=64, lr=1e-3):
    torch.manual_seed(seed)
    model = DigitsMLP()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    x, y = train
    for _ in range(steps):
        idx = torch.randint(len(x), (batch,), generator=gen)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    return model.eval()


def shuffled_batches(data, batch, seed):
    x, y = data
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(1000 + seed))
    return [(x[order[i:i + batch]], y[order[i:i + batch]]) for i in range(0, len(x), batch)]


@torch.no_grad()
def evaluate(model, data):
    x, y = data
    out = model(x)
    return float(F.cross_entropy(out, y)), float((out.argmax(-1) == y).float().mean())


@dataclass
class Case:
    """One trained network of one seed, with everything the three reproductions share."""

    dataset: str
    seed: int
    model: nn.Module
    train: tuple
    test: tuple
    sens_data: tuple
    qat_batches: list
    sens: object
    layers: list
    sizes: dict
    macs: dict
    fp_loss: float
    fp_acc: float
    fp_sens_loss: float
    ptq: dict = field(default_factory=dict)
    ptq_sens: dict = field(default_factory=dict)
    qat: dict = field(default_factory=dict)

    def key(self, bits):
        return tuple(bits[n] for n in self.layers)

    def ptq_eval(self, bits):
        k = self.key(bits)
        if k not in self.ptq:
            self.ptq[k] = evaluate(quantize(self.model, dict(bits)), self.test)
        return self.ptq[k]

    def ptq_sens_eval(self, bits):
        """Loss of the PTQ model on the sensitivity (train) data."""
        k = self.key(bits)
        if k not in self.ptq_sens:
            self.ptq_sens[k] = evaluate(quantize(self.model, dict(bits)), self.sens_data)[0]
        return self.ptq_sens[k]

    def qat_eval(self, bits, epochs, lr):
        k = self.key(bits)
        if k not in self.qat:  # bits None everywhere: the same fine-tuning in full precision
            qm = quantize(self.model, dict(bits))
            finetune(qm, F.cross_entropy, self.qat_batches, epochs=epochs, lr=lr)
            self.qat[k] = evaluate(qm.eval(), self.test)
        return self.qat[k]


def make_case(dataset, seed, digits, mnist, a):
    t0 = time.perf_counter()
    if dataset == "digits":
        train, test = digits
        model = train_digits(seed, train)
        sens_data, batch = train, 64
    else:
        r = train_mnist1d(seed=seed, epochs=20, data=mnist)
        model, train, test = r.model, r.train, r.test
        sens_data, batch = (train[0][:2000], train[1][:2000]), 128
    t_train = time.perf_counter() - t0
    sens = layer_sensitivities(model, F.cross_entropy, sens_data, bits=BITS, trace_matvecs=a.trace_matvecs, seed=seed)
    layers = [x.name for x in sens.layers]
    fp_loss, fp_acc = evaluate(model, test)
    fp_sens_loss = evaluate(model, sens_data)[0]
    print(f"{dataset} seed {seed}: trained in {t_train:.1f} s, test acc {fp_acc:.4f}, loss {fp_loss:.4f}; "
          f"sensitivities {time.perf_counter() - t0 - t_train:.1f} s ({sens.num_matvecs} matvecs)", flush=True)
    return Case(dataset, seed, model, train, test, sens_data, shuffled_batches(train, batch, seed), sens, layers,
                sens.sizes(), layer_macs(model, test[0]), fp_loss, fp_acc, fp_sens_loss)


# --------------------------------------------------------------------------- second-order references


def taylor_references(case, configs):
    """Per configuration: Σ_i ΔW_iᵀ H_ii ΔW_i (block-diagonal, exact) and gᵀΔ + ½ΔᵀHΔ (full), on the sensitivity data."""
    model = case.model
    mods = dict(quantizable_layers(model))
    params = [mods[n].weight for n in case.layers]
    x, y = case.sens_data
    loss = F.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    delta = {(n, b): (quantize_weight(mods[n].weight.detach(), b) - mods[n].weight.detach()) for n in case.layers
             for b in BITS}

    def hvp(vs):
        return torch.autograd.grad(grads, params, grad_outputs=vs, retain_graph=True)

    block = {}
    for i, n in enumerate(case.layers):
        for b in BITS:
            vs = [delta[(n, b)] if j == i else torch.zeros_like(p) for j, p in enumerate(params)]
            block[(n, b)] = float((hvp(vs)[i] * delta[(n, b)]).sum())
    out_block, out_full = [], []
    for c in configs:
        vs = [delta[(n, c.bits[n])] for n in case.layers]
        hv = hvp(vs)
        g = sum(float((gi.detach() * v).sum()) for gi, v in zip(grads, vs))
        out_full.append(g + 0.5 * sum(float((h * v).sum()) for h, v in zip(hv, vs)))
        out_block.append(sum(block[(n, c.bits[n])] for n in case.layers))
    return out_block, out_full


# --------------------------------------------------------------------------- Q1


def q1(case):
    omegas = {label: getattr(case.sens, meth)() for label, meth in VARIANTS.items()}
    configs = enumerate_configurations(omegas["trace (HAWQ-V2)"], case.sizes)
    dl = [case.ptq_eval(c.bits)[0] - case.fp_loss for c in configs]
    scores = {label: [sum(om[n][c.bits[n]] for n in case.layers) for c in configs] for label, om in omegas.items()}
    scores.update(zip(REFERENCES, taylor_references(case, configs)))
    rho = {label: float(spearmanr(s, dl).statistic) for label, s in scores.items()}
    dl_sens = [case.ptq_sens_eval(c.bits) - case.fp_sens_loss for c in configs]
    rho_sens = {label: float(spearmanr(s, dl_sens).statistic) for label, s in scores.items()}
    frontier = pareto_frontier(omegas["trace (HAWQ-V2)"], case.sizes)
    fdl = [case.ptq_eval(f.bits)[0] - case.fp_loss for f in frontier]
    rises = sum(1 for u, v in zip(fdl, fdl[1:]) if v > u)
    return dict(configs=configs, dl=dl, dl_sens=dl_sens, scores=scores, rho=rho, rho_sens=rho_sens, frontier=frontier, frontier_dl=fdl,
                frontier_rises=rises)


# --------------------------------------------------------------------------- Q2


def budget_filling(configs, sizes, budget):
    """Configurations within the budget where no single layer can go to its next candidate width."""
    out = []
    for c in configs:
        if c.size_bits > budget:
            continue
        room = budget - c.size_bits
        if all(c.bits[n] == BITS[-1] or sizes[n] * (BITS[BITS.index(c.bits[n]) + 1] - c.bits[n]) > room
               for n in c.bits):
            out.append(c)
    return out


def reverse_greedy(case, budget):
    """Layers by increasing Tr(H_i)/n_i (least sensitive first) each take the most bits that still fit,
    starting from every layer at the fewest: the most sensitive layers get what is left."""
    per_weight = {x.name: x.trace / x.size for x in case.sens.layers}
    bits = {n: BITS[0] for n in case.layers}
    room = budget - sum(case.sizes[n] * BITS[0] for n in case.layers)
    for n in sorted(case.layers, key=per_weight.get):
        for b in sorted(BITS, reverse=True):
            if b > bits[n] and case.sizes[n] * (b - bits[n]) <= room:
                room -= case.sizes[n] * (b - bits[n])
                bits[n] = b
                break
    return bits


def q2(case, a, avg_bits):
    om = case.sens.hawq_v2()
    n_total = sum(case.sizes.values())
    budget = avg_bits * n_total
    hess = allocate_bits(om, case.sizes, budget)
    bf = brute_force(om, case.sizes, size_budget_bits=budget)
    assert hess.bits == bf.bits, (hess, bf)
    rev_om = {x.name: {b: x.size / max(x.trace, 1e-12) * e for b, e in x.errors.items()} for x in case.sens.layers}
    rev = allocate_bits(rev_om, case.sizes, budget)
    assert rev.bits == brute_force(rev_om, case.sizes, size_budget_bits=budget).bits
    configs = enumerate_configurations(om, case.sizes)
    filling = budget_filling(configs, case.sizes, budget)
    rng = np.random.default_rng(case.seed)
    draws = [filling[i] for i in rng.integers(len(filling), size=a.random_draws)]
    adversarial = max(filling, key=lambda c: c.sensitivity)
    uniform = {n: max(b for b in BITS if b <= avg_bits) for n in case.layers}  # avg_bits itself if a candidate
    picks = {"Hessian": [hess.bits], "uniform": [uniform], "random": [c.bits for c in draws],
             "reverse": [reverse_greedy(case, budget)], "reverse (inverted-Ω DP)": [rev.bits],
             "adversarial": [adversarial.bits]}
    rows = {}
    for method, cfgs in picks.items():
        ptq = [case.ptq_eval(b) for b in cfgs]
        qat = [case.qat_eval(b, a.qat_epochs, a.qat_lr) for b in cfgs]
        size = [sum(case.sizes[n] * b[n] for n in case.layers) / n_total for b in cfgs]
        omega = [sum(om[n][b[n]] for n in case.layers) for b in cfgs]
        rows[method] = dict(bits=cfgs, avg_bits=statistics.mean(size), omega=statistics.mean(omega),
                            ptq_acc=statistics.mean(p[1] for p in ptq), ptq_dl=statistics.mean(p[0] - case.fp_loss for p in ptq),
                            qat_acc=statistics.mean(q[1] for q in qat), qat_loss=statistics.mean(q[0] for q in qat),
                            spread_ptq=statistics.stdev(p[1] for p in ptq) if len(ptq) > 1 else 0.0,
                            spread_qat=statistics.stdev(q[1] for q in qat) if len(qat) > 1 else 0.0)
    return dict(rows=rows, n_filling=len(filling), n_distinct=len({case.key(c.bits) for c in draws}), budget=budget)


# --------------------------------------------------------------------------- Q3


def q3(case, a):
    om = {n: {b: v[b] for b in (4, 8)} for n, v in case.sens.hawq_v2().items()}
    n_total = sum(case.sizes.values())
    lo, hi = uniform_cost(case.sizes, 4, case.macs), uniform_cost(case.sizes, 8, case.macs)
    ilp_rows = []
    for kind, idx in (("size", 0), ("BOPs", 1)):
        for alpha in ALPHAS:
            budget = interpolated_budget(lo[idx], hi[idx], alpha)
            kw = dict(macs=case.macs, **({"size_budget_bits": budget} if kind == "size" else {"bops_budget": budget}))
            t0 = time.perf_counter()
            ilp = allocate_bits_ilp(om, case.sizes, **kw)
            t_ilp = time.perf_counter() - t0
            bf = brute_force(om, case.sizes, **kw)
            used = ilp.size_bits if kind == "size" else ilp.bops
            ilp_rows.append(dict(kind=kind, alpha=alpha, budget=budget, used=used, bits=ilp.bits,
                                 equal=(ilp.bits == bf.bits and ilp.sensitivity == bf.sensitivity),
                                 holds=used <= budget, avg_bits=ilp.size_bits / n_total, bops=ilp.bops,
                                 size_bits=ilp.size_bits, t_ilp=t_ilp))
            assert ilp_rows[-1]["equal"] and ilp_rows[-1]["holds"], (ilp, bf, budget)
    evals = {}
    named = [("W8", {n: 8 for n in case.layers})]
    named += [(f"mixed size α={r['alpha']:g}", r["bits"]) for r in ilp_rows if r["kind"] == "size"][::-1]
    named += [(f"mixed BOPs α={r['alpha']:g}", r["bits"]) for r in ilp_rows if r["kind"] == "BOPs"][::-1]
    named += [("W4", {n: 4 for n in case.layers})]
    for label, bits in named:
        ptq, qat = case.ptq_eval(bits), case.qat_eval(bits, a.qat_epochs, a.qat_lr)
        evals[label] = dict(bits=bits, avg_bits=sum(case.sizes[n] * bits[n] for n in case.layers) / n_total,
                            bops=sum(case.macs[n] * bits[n] ** 2 for n in case.layers),
                            ptq_acc=ptq[1], ptq_dl=ptq[0] - case.fp_loss, qat_acc=qat[1], qat_loss=qat[0])
    equal = {}
    full = case.sens.hawq_v2()
    for b in (3, 4):
        mixed = allocate_bits(full, case.sizes, b * n_total)
        assert mixed.bits == brute_force(full, case.sizes, size_budget_bits=b * n_total).bits
        for label, bits in ((f"uniform {b}", {n: b for n in case.layers}), (f"mixed ≤ {b} avg", mixed.bits)):
            ptq, qat = case.ptq_eval(bits), case.qat_eval(bits, a.qat_epochs, a.qat_lr)
            equal[label] = dict(bits=bits, avg_bits=sum(case.sizes[n] * bits[n] for n in case.layers) / n_total,
                                ptq_acc=ptq[1], ptq_dl=ptq[0] - case.fp_loss, qat_acc=qat[1], qat_loss=qat[0])
    fp_ft = case.qat_eval({n: None for n in case.layers}, a.qat_epochs, a.qat_lr)
    return dict(ilp=ilp_rows, evals=evals, equal=equal, lo=lo, hi=hi, fp_ft=fp_ft)


# --------------------------------------------------------------------------- report helpers


def mean_std(xs):
    xs = list(xs)
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def ms(xs, scale=1.0, fmt=".2f"):
    m, s = mean_std(x * scale for x in xs)
    return f"{m:{fmt}} ± {s:{fmt}}"


def bitstr(case, bits):
    return "/".join(str(bits[n]) for n in case.layers)


def tally(cases, bits_list):
    """The distinct configurations over seeds, most frequent first: ``4/2/3/8 ×3, 3/3/3/3 ×2``."""
    counts = {}
    for c, b in zip(cases, bits_list):
        counts[bitstr(c, b)] = counts.get(bitstr(c, b), 0) + 1
    return ", ".join(f"{k} ×{v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))


def layer_table(cases):
    lines = ["| dataset | layer | n weights | MACs/sample | Tr(H)/n | Tr stderr (rel.) | λmax | ||ΔW||² at 2 / 3 / 4 / 8 bits |",
             "|---|---|---|---|---|---|---|---|"]
    for c in cases:
        for x in c.sens.layers:
            errs = " / ".join(f"{x.errors[b]:.3g}" for b in BITS)
            lines.append(f"| {c.dataset} | {x.name} | {x.size} | {c.macs[x.name]} | {x.trace / x.size:.3g} | "
                         f"{x.trace_stderr / abs(x.trace):.1%} | {x.top_eigenvalue:.3g} | {errs} |")
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=list(range(10)))
    ap.add_argument("--datasets", nargs="+", default=["digits", "mnist1d"], choices=["digits", "mnist1d"])
    ap.add_argument("--avg-bits", type=float, nargs="+", default=[3.0, 4.0],
                    help="Q2's size budgets in average bits per weight (the first is the main one, plotted)")
    ap.add_argument("--random-draws", type=int, default=20)
    ap.add_argument("--qat-epochs", type=int, default=2)
    ap.add_argument("--qat-lr", type=float, default=1e-2)
    ap.add_argument("--trace-matvecs", type=int, default=90)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS / "hawq_repro"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    t_start = time.perf_counter()
    digits = digits_data() if "digits" in a.datasets else None
    mnist = load_mnist1d() if "mnist1d" in a.datasets else None
    res = {}
    for ds in a.datasets:
        for seed in a.seeds:
            case = make_case(ds, seed, digits, mnist, a)
            t0 = time.perf_counter()
            r1 = q1(case)
            t1 = time.perf_counter()
            r2 = {ab: q2(case, a, ab) for ab in a.avg_bits}
            t2 = time.perf_counter()
            r3 = q3(case, a)
            print(f"  Q1 {t1 - t0:.1f} s (Spearman " + ", ".join(f"{k}: {v:.3f}" for k, v in r1["rho"].items())
                  + f"); Q2 {t2 - t1:.1f} s (PTQ acc at {a.avg_bits[0]:g} bits " + ", ".join(
                      f"{m} {r2[a.avg_bits[0]]['rows'][m]['ptq_acc']:.3f}" for m in Q2_METHODS)
                  + f"); Q3 {time.perf_counter() - t2:.1f} s", flush=True)
            res[(ds, seed)] = (case, r1, r2, r3)
    total = time.perf_counter() - t_start
    cmd = ".venv/bin/python experiments/hawq.py" + "".join(f" {x}" for x in sys.argv[1:])
    lines = report(a, res, total, cmd)
    png, plt = write_markdown(lines, a.out)
    figure(a, res, plt, png)
    print(f"wrote {a.out}.md and {png}; total {total:.0f} s")


# --------------------------------------------------------------------------- report


def report(a, res, total, cmd):
    S = a.seeds
    L = ["# Hessian-aware mixed-precision quantization (HAWQ-V1/V2/V3) at small scale", "",
         f"Command: `{cmd}`  ", machine_line(), f"Total runtime: {total:.0f} s  ",
         f"Seeds: {', '.join(map(str, S))} (each seed retrains the network; its init, batch order, Hutch++/Lanczos "
         f"probes, random allocations and QAT batch order). Weights only, per-channel symmetric; biases and "
         f"activations in full precision. Δℓ = test cross-entropy after quantization minus full precision. "
         f"QAT = `finetune`, SGD momentum 0.9, lr {a.qat_lr:g}, {a.qat_epochs} epochs over the train set. "
         f"Sensitivities: `layer_sensitivities(bits=(2,3,4,8), trace_matvecs={a.trace_matvecs})`.", ""]
    L += ["## Networks", "", "| dataset | seed | test acc (FP32) | test loss (FP32) |", "|---|---|---|---|"]
    for (ds, s), (c, *_ ) in res.items():
        L.append(f"| {ds} | {s} | {c.fp_acc:.2%} | {c.fp_loss:.4f} |")
    L += ["", f"Per-layer sensitivities (seed {S[0]}):", ""]
    L += layer_table([res[(ds, S[0])][0] for ds in a.datasets]) + [""]

    # Q1
    L += ["## Q1 — does ΣΩ predict the PTQ loss increase? (all configurations)", "",
          "Spearman ρ(ΣΩ, Δℓ) over all 4^L configurations, mean ± std over seeds (per seed in brackets). The last two "
          "columns are second-order references, not HAWQ variants (exact block-diagonal quadratic and the full "
          "Taylor prediction with cross-layer terms, both on the sensitivity data). First table: Δℓ on the test set "
          "(the reproduction); second table: Δℓ on the sensitivity (train) data, on which Ω is computed "
          "(a diagnostic: it separates 'Ω mis-ranks the damage' from 'train and test damage differ').", ""]
    labels = list(VARIANTS) + list(REFERENCES)
    q1s = {}
    for key, what in (("rho", "test"), ("rho_sens", "sensitivity (train) data")):
        L += [f"Δℓ on the {what}:", "", "| dataset | configs | " + " | ".join(labels) + " |",
              "|---|---|" + "---|" * len(labels)]
        for ds in a.datasets:
            rs = [res[(ds, s)][1] for s in S]
            vals = {lab: [r[key][lab] for r in rs] for lab in labels}
            if key == "rho":
                q1s[ds] = vals
            else:
                q1s[ds + " train"] = vals
            cells = [f"{ms(vals[lab], fmt='.3f')} ({', '.join(f'{v:.2f}' for v in vals[lab])})" for lab in labels]
            L.append(f"| {ds} | {len(rs[0]['configs'])} | " + " | ".join(cells) + " |")
        L.append("")
    L += ["Range of the test Δℓ over all configurations (seed %d): " % S[0]
          + "; ".join(f"{ds} {min(res[(ds, S[0])][1]['dl']):.3g} to {max(res[(ds, S[0])][1]['dl']):.3g} "
                      f"(median {statistics.median(res[(ds, S[0])][1]['dl']):.3g}; "
                      f"{sum(v < 0 for v in res[(ds, S[0])][1]['dl'])} configurations with Δℓ < 0)"
                      for ds in a.datasets) + ".", ""]
    L += ["Min-ΣΩ (trace) Pareto frontier: the number of frontier points and how often the *measured* test Δℓ "
          "goes up when moving to the next larger frontier point (ΣΩ falls strictly along it by construction):", "",
          "| dataset | seed | frontier points | Δℓ rises along frontier | Δℓ of the frontier points (smallest → largest) |",
          "|---|---|---|---|---|"]
    for (ds, s), (_, r1, _, _) in res.items():
        L.append(f"| {ds} | {s} | {len(r1['frontier'])} | {r1['frontier_rises']} | "
                 + ", ".join(f"{v:.3g}" for v in r1["frontier_dl"]) + " |")
    L.append("")

    # Q2
    L += ["## Q2 — ordering ablation under a size budget (candidates 2/3/4/8)", "",
          "Accuracy in % (test), mean ± std over seeds; random = mean of the 20 draws per seed, then over seeds "
          "(the within-seed std of the 20 draws, averaged over seeds, in brackets). 'bits' lists the configurations "
          "chosen over the seeds (layer order), with how many seeds chose each. reverse = least sensitive layers "
          "(by Tr(H)/n) filled first with as many bits as fit; reverse (inverted-Ω DP) = the DP with "
          "(n/Tr(H))·||ΔW||²; adversarial = the budget-filling configuration with the largest ΣΩ.", ""]
    q2s = {}
    for ab in a.avg_bits:
        for ds in a.datasets:
            cs = [res[(ds, s)][0] for s in S]
            r2s = [res[(ds, s)][2][ab] for s in S]
            q2s[(ds, ab)] = r2s
            L += [f"**{ds}, average {ab:g} bits** (layers {', '.join(cs[0].layers)}; budget-filling configurations "
                  f"per seed: {', '.join(str(r['n_filling']) for r in r2s)}; distinct random draws: "
                  f"{', '.join(str(r['n_distinct']) for r in r2s)}; FP32 {ms([c.fp_acc for c in cs], 100, '.1f')} %, "
                  f"FP32 after the same fine-tuning {ms([res[(ds, s)][3]['fp_ft'][1] for s in S], 100, '.1f')} %)", "",
                  "| allocation | bits (seeds) | avg bits | ΣΩ (trace) | PTQ acc % | PTQ Δℓ | QAT acc % | QAT test loss |",
                  "|---|---|---|---|---|---|---|---|"]
            for m in Q2_METHODS:
                rows = [r["rows"][m] for r in r2s]
                bits = "20 draws" if m == "random" else tally(cs, [r["bits"][0] for r in rows])
                extra = lambda k: f" ({statistics.mean(r[k] for r in rows) * 100:.1f})" if m == "random" else ""
                L.append(f"| {m} | {bits} | {ms([r['avg_bits'] for r in rows])} | "
                         f"{ms([r['omega'] for r in rows], fmt='.3g')} | "
                         f"{ms([r['ptq_acc'] for r in rows], 100, '.1f')}{extra('spread_ptq')} | "
                         f"{ms([r['ptq_dl'] for r in rows], fmt='.3f')} | "
                         f"{ms([r['qat_acc'] for r in rows], 100, '.1f')}{extra('spread_qat')} | "
                         f"{ms([r['qat_loss'] for r in rows], fmt='.3f')} |")
            L.append("")

    # Q3
    L += ["## Q3 — HAWQ-V3's ILP with bits {4, 8}", "",
          "ILP (`allocate_bits_ilp`, scipy HiGHS) vs brute force (`brute_force`, all 2^L configurations), per seed; "
          "margin = (budget − used) / budget. Bits per layer in layer order.", "",
          "| dataset | constraint | α | budget | used (distinct over seeds) | margin (distinct) | ILP bits (seeds) | ILP == brute force | "
          "ILP time (ms) |", "|---|---|---|---|---|---|---|---|---|"]
    all_equal, all_hold, n_checks = True, True, 0
    for ds in a.datasets:
        for i, row in enumerate(res[(ds, S[0])][3]["ilp"]):
            per = [res[(ds, s)][3]["ilp"][i] for s in S]
            all_equal &= all(p["equal"] for p in per)
            all_hold &= all(p["holds"] for p in per)
            n_checks += len(per)
            used = ", ".join(dict.fromkeys(f"{p['used']:.6g}" for p in per))  # distinct values, in seed order
            margin = ", ".join(dict.fromkeys(f"{(p['budget'] - p['used']) / p['budget']:.2%}" for p in per))
            L.append(f"| {ds} | {row['kind']} | {row['alpha']:g} | {row['budget']:.6g} | {used} | {margin} | "
                     f"{tally([res[(ds, s)][0] for s in S], [p['bits'] for p in per])} | "
                     f"{'yes' if all(p['equal'] for p in per) else 'NO'} | "
                     f"{ms([p['t_ilp'] * 1e3 for p in per], fmt='.0f')} |")
    L += ["", "Accuracy (test %, mean ± std over seeds) of the model-zoo rows; 'BOPs (rel.)' = BOPs / BOPs of W8.", ""]
    for ds in a.datasets:
        r3s = [res[(ds, s)][3] for s in S]
        cs = [res[(ds, s)][0] for s in S]
        L += [f"**{ds}**", "", "| row | bits (seeds) | avg bits | BOPs (rel.) | PTQ acc % | PTQ Δℓ | QAT acc % | QAT test loss |",
              "|---|---|---|---|---|---|---|---|",
              f"| FP32 | 32 | 32 | – | {ms([c.fp_acc for c in cs], 100, '.1f')} | 0 | "
              f"{ms([r['fp_ft'][1] for r in r3s], 100, '.1f')} (same fine-tuning, FP) | "
              f"{ms([r['fp_ft'][0] for r in r3s], fmt='.3f')} |"]
        for label in r3s[0]["evals"]:
            es = [r["evals"][label] for r in r3s]
            w8 = [r["evals"]["W8"]["bops"] for r in r3s]
            L.append(f"| {label} | {tally(cs, [e['bits'] for e in es])} | "
                     f"{ms([e['avg_bits'] for e in es])} | {ms([e['bops'] / w for e, w in zip(es, w8)], fmt='.3f')} | "
                     f"{ms([e['ptq_acc'] for e in es], 100, '.1f')} | {ms([e['ptq_dl'] for e in es], fmt='.4f')} | "
                     f"{ms([e['qat_acc'] for e in es], 100, '.1f')} | {ms([e['qat_loss'] for e in es], fmt='.3f')} |")
        L.append("")
    L += ["Mixed vs uniform precision at equal size (candidates 2/3/4/8; mixed = DP at the uniform model's size, "
          "checked against brute force):", "",
          "| dataset | row | bits (seeds) | avg bits | PTQ acc % | PTQ Δℓ | QAT acc % | QAT test loss |",
          "|---|---|---|---|---|---|---|---|"]
    for ds in a.datasets:
        r3s = [res[(ds, s)][3] for s in S]
        cs = [res[(ds, s)][0] for s in S]
        for label in r3s[0]["equal"]:
            es = [r["equal"][label] for r in r3s]
            L.append(f"| {ds} | {label} | {tally(cs, [e['bits'] for e in es])} | "
                     f"{ms([e['avg_bits'] for e in es])} | {ms([e['ptq_acc'] for e in es], 100, '.1f')} | "
                     f"{ms([e['ptq_dl'] for e in es], fmt='.4f')} | {ms([e['qat_acc'] for e in es], 100, '.1f')} | "
                     f"{ms([e['qat_loss'] for e in es], fmt='.3f')} |")
    L += [""] + verdicts(a, res, q1s, q2s, all_equal, all_hold, n_checks)
    return L


def verdicts(a, res, q1s, q2s, all_equal, all_hold, n_checks):
    S = a.seeds
    tr, ev, uw = list(VARIANTS)
    L = ["## Comparison with the papers' claims (computed from this run)", ""]
    L.append("**Q1 (HAWQ-V2: ΣΩ_trace predicts damage; expected ρ ≳ 0.8 and ≥ the top-eigenvalue and unweighted "
             "variants).**")
    for ds in a.datasets:
        m = {k: statistics.mean(v) for k, v in q1s[ds].items()}
        wins_ev = sum(x >= y for x, y in zip(q1s[ds][tr], q1s[ds][ev]))
        wins_uw = sum(x >= y for x, y in zip(q1s[ds][tr], q1s[ds][uw]))
        L.append(f"* {ds}: ρ_trace = {m[tr]:.3f} ({'≥' if m[tr] >= 0.8 else '<'} 0.8), ρ_top-eig = {m[ev]:.3f}, "
                 f"ρ_unweighted = {m[uw]:.3f}; trace ≥ top-eig in {wins_ev}/{len(S)} seeds, trace ≥ unweighted in "
                 f"{wins_uw}/{len(S)} seeds. References: block-diagonal ΔᵀHΔ {m[REFERENCES[0]]:.3f}, full Taylor "
                 f"{m[REFERENCES[1]]:.3f}.")
    metrics = (("PTQ acc", "ptq_acc", 100, True, ".2f"), ("QAT acc", "qat_acc", 100, True, ".2f"),
               ("PTQ Δℓ", "ptq_dl", 1, False, ".3f"))
    L += ["", "**Q2 (expected Hessian ≥ uniform ≥ random > reverse, gap largest at 2–3 bits).** Means over seeds; "
          "'k/n seeds' counts the seeds where the expected inequality holds (ties count for ≥, not for >); "
          "for Δℓ 'better' means lower."]
    for ab in a.avg_bits:
        for ds in a.datasets:
            for label, key, scale, up, fmt in metrics:
                v = {m: [r["rows"][m][key] * scale * (1 if up else -1) for r in q2s[(ds, ab)]] for m in Q2_METHODS}
                mean = {m: statistics.mean(x) for m, x in v.items()}
                shown = lambda m: f"{mean[m] * (1 if up else -1):{fmt}}"
                parts = []
                for x, y, strict in (("Hessian", "uniform", False), ("uniform", "random", False),
                                     ("random", "reverse", True)):
                    ok = mean[x] > mean[y] if strict else mean[x] >= mean[y]
                    seeds_ok = sum((p > q) if strict else (p >= q) for p, q in zip(v[x], v[y]))
                    rel = (">" if strict else "≥") if ok else ("≤" if strict else "<")
                    rel = rel if up else {">": "<", "≥": "≤", "<": ">", "≤": "≥"}[rel]
                    parts.append(f"{x} {shown(x)} {rel} {y} {shown(y)} ({'holds' if ok else 'FAILS'}; "
                                 f"{seeds_ok}/{len(S)} seeds)")
                gap = (mean["Hessian"] - mean["reverse"]) * (1 if up else -1)
                L.append(f"* {ds}, {ab:g} bits, {label}: " + "; ".join(parts) + f"; Hessian − reverse = {gap:+{fmt}}.")
    L += ["", "**Q3 (HAWQ-V3: constraints hold, ILP = brute force, FP32 ≳ W8 ≥ 0.75 ≥ 0.5 ≥ 0.25 ≥ W4, mixed beats "
          "uniform at equal size).**",
          f"* ILP == brute force in {'all' if all_equal else 'NOT all'} {n_checks} (dataset, constraint, α, seed) cases; "
          f"every budget {'holds' if all_hold else 'does NOT hold'}."]
    for ds in a.datasets:
        for label, key, scale, up, fmt in metrics:
            for kind in ("size", "BOPs"):
                order = ["W8"] + [f"mixed {kind} α={x:g}" for x in sorted(ALPHAS, reverse=True)] + ["W4"]
                vals = [statistics.mean(res[(ds, s)][3]["evals"][o][key] for s in S) * scale for o in order]
                mono = all((x >= y) if up else (x <= y) for x, y in zip(vals, vals[1:]))
                L.append(f"* {ds}, {label}, {kind} budgets: W8 → 0.75 → 0.5 → 0.25 → W4 = "
                         + " → ".join(f"{v:{fmt}}" for v in vals) + f" ({'monotone' if mono else 'NOT monotone'}; "
                         f"spread {max(vals) - min(vals):{fmt}}).")
        for b in (3, 4):
            u = [res[(ds, s)][3]["equal"][f"uniform {b}"] for s in S]
            mx = [res[(ds, s)][3]["equal"][f"mixed ≤ {b} avg"] for s in S]
            same = sum(res[(ds, s)][0].key(x["bits"]) == res[(ds, s)][0].key(y["bits"]) for s, x, y in zip(S, u, mx))
            for label, key, scale, up, fmt in metrics:
                mu, mm = statistics.mean(x[key] for x in u) * scale, statistics.mean(x[key] for x in mx) * scale
                tie = f"{mm:{fmt}}" == f"{mu:{fmt}}"
                better = (mm > mu) if up else (mm < mu)
                verdict = "tie at this precision" if tie else ("mixed better" if better else "mixed NOT better")
                wins = sum(((y[key] > x[key]) if up else (y[key] < x[key])) for x, y in zip(u, mx))
                L.append(f"* {ds}, {b} bits, {label}: mixed {mm:{fmt}} vs uniform {mu:{fmt}} "
                         f"({verdict}; mixed strictly better in "
                         f"{wins}/{len(S)} seeds; the DP picked the uniform configuration itself in {same}/{len(S)}).")
    L.append("")
    return L


# --------------------------------------------------------------------------- figure


def figure(a, res, plt, png):
    S = a.seeds
    fig, axes = plt.subplots(len(a.datasets), 4, figsize=(20, 4.6 * len(a.datasets)), squeeze=False)
    for row, ds in enumerate(a.datasets):
        ab0 = a.avg_bits[0]
        # Q1/Q2 panels: the seed with the median Spearman ρ of the trace variant (a representative one)
        seed = sorted(S, key=lambda s: res[(ds, s)][1]["rho"]["trace (HAWQ-V2)"])[(len(S) - 1) // 2]
        case, r1, r2, r3 = res[(ds, seed)]
        r2 = r2[ab0]
        ax = axes[row][0]
        for (lab, sc), mk in zip(r1["scores"].items(), "osD^v"):
            if lab in REFERENCES[1:]:
                continue
            x = np.asarray(sc) / max(sc)
            ax.scatter(x, r1["dl"], s=10, marker=mk, alpha=0.6, label=f"{lab} (ρ={r1['rho'][lab]:.2f})")
        ax.set_xscale("log")
        ax.set_yscale("symlog", linthresh=1e-3)
        ax.set_xlabel("ΣΩ / max ΣΩ (per variant)")
        ax.set_ylabel("PTQ test Δℓ")
        ax.set_title(f"{ds}, seed {seed} (median ρ): Q1 Δℓ vs ΣΩ ({len(r1['dl'])} configs)")
        ax.legend(fontsize=7)
        ax = axes[row][1]
        n_total = sum(case.sizes.values())
        ax.scatter([c.average_bits for c in r1["configs"]], [c.sensitivity for c in r1["configs"]], s=8, color="grey",
                   alpha=0.5, label="all configurations")
        ax.plot([f.average_bits for f in r1["frontier"]], [f.sensitivity for f in r1["frontier"]], "-o", ms=3,
                color="C0", label="min-ΣΩ frontier")
        om = case.sens.hawq_v2()
        for (m, mk, col) in (("Hessian", "*", "C2"), ("uniform", "s", "C1"), ("reverse", "v", "C3"),
                             ("adversarial", "x", "C4")):
            b = r2["rows"][m]["bits"][0]
            ax.scatter([sum(case.sizes[n] * b[n] for n in case.layers) / n_total],
                       [sum(om[n][b[n]] for n in case.layers)], s=80, marker=mk, color=col, zorder=5,
                       label=f"Q2 {m} ({ab0:g} bits)")
        ax.set_yscale("log")
        ax.set_xlabel("average bits")
        ax.set_ylabel("ΣΩ (trace)")
        ax.set_title(f"{ds}, seed {seed}: Pareto frontier, chosen points")
        ax.legend(fontsize=7)
        ax = axes[row][2]
        xs = np.arange(len(Q2_METHODS))
        for j, (key, lab) in enumerate((("ptq_acc", "PTQ"), ("qat_acc", f"QAT {a.qat_epochs} ep"))):
            vals = [[res[(ds, s)][2][ab0]["rows"][m][key] * 100 for s in S] for m in Q2_METHODS]
            ax.errorbar(xs + (j - 0.5) * 0.2, [statistics.mean(v) for v in vals],
                        yerr=[statistics.stdev(v) if len(v) > 1 else 0 for v in vals], fmt="o", capsize=3, label=lab)
        ax.axhline(statistics.mean(res[(ds, s)][0].fp_acc for s in S) * 100, color="k", ls="--", lw=1, label="FP32")
        ax.set_xticks(xs, [SHORT.get(m, m) for m in Q2_METHODS], fontsize=8)
        ax.set_ylabel("test accuracy %")
        ax.set_title(f"{ds}: Q2 at {ab0:g} avg bits (mean ± std, {len(S)} seeds)")
        ax.legend(fontsize=7)
        ax = axes[row][3]
        for key, lab, mk in (("ptq_dl", "PTQ Δℓ", "o"),):
            for kind, col in (("mixed size", "C0"), ("mixed BOPs", "C1"), ("W", "k")):
                pts = [(e["avg_bits"], e[key]) for s in S for lab2, e in res[(ds, s)][3]["evals"].items()
                       if lab2.startswith(kind)]
                ax.scatter([p[0] for p in pts], [p[1] for p in pts], color=col, marker=mk,
                           label=f"{kind if kind != 'W' else 'W8 / W4'} ({lab})")
            for b, col in ((3, "C2"), (4, "C3")):
                for kind2, mk2 in (("uniform", "s"), ("mixed ≤", "*")):
                    pts = [(e["avg_bits"], e[key]) for s in S for lab2, e in res[(ds, s)][3]["equal"].items()
                           if lab2.startswith(kind2) and lab2.endswith(f"{b}" if kind2 == "uniform" else f"{b} avg")]
                    ax.scatter([p[0] for p in pts], [p[1] for p in pts], color=col, marker=mk2, s=60,
                               alpha=0.7, label=f"{kind2} {b} bits (2/3/4/8)")
        ax.set_yscale("symlog", linthresh=1e-3)
        ax.set_xlabel("average bits")
        ax.set_ylabel("PTQ test Δℓ")
        ax.set_title(f"{ds}: Q3 rows, all seeds (size = BOPs choices)")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


if __name__ == "__main__":
    main()
