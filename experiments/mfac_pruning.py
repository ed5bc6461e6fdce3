r"""One-shot pruning of the trained default model (issue 17, experiment 3 of the research note): M-FAC
optimal brain surgeon against global magnitude and the diagonal-curvature optimal brain damage (OBD).

The model and data are those of ``secondorder prune`` without ``--model``: the MNIST-1D CNN
(3018 parameters, 2960 of them prunable Conv/Linear weights) trained 20 epochs by
``train_mnist1d(seed)``; curvature data 64 batches of 32 training samples drawn with ``seed`` (OBD: the
same 2048 samples as one batch); evaluation on the 1000 test samples. Each (method, sparsity) prunes
the dense model once to 50/70/90 % (global over the prunable weights) with the CLI's defaults
(M-FAC: lambda 1e-5, block 128, 16 recomputations; OBD: XDiag with 100 Hessian-vector products),
then fine-tunes it for ``--fine-tune-epochs`` epochs (SGD lr 0.01, momentum 0.9, batches of 128 of the
4000 training samples, masks kept).

The OBD investigation (why it was worse than magnitude in the CLI run): OBD's saliency
:math:`\tfrac12 w_q^2 H_{qq}` is also run with

* the **exact** Hessian diagonal. This network is piecewise linear in every single weight (ReLU,
  mean pooling, linear layers), so :math:`\partial^2 f/\partial w_q^2 = 0` almost everywhere and
  :math:`H_{qq}` equals the Gauss-Newton diagonal
  :math:`\frac1N\sum_n J_{nq}^\top(\mathrm{diag}\,p_n - p_np_n^\top)J_{nq} \ge 0`, computed exactly from
  per-sample Jacobians (checked here against exact Hessian-vector products with unit vectors);
* optionally XDiag with ``--more-probes`` products (less estimator noise; off by default, the exact
  diagonal being the limit);
* the XDiag estimate clamped at 0 and its absolute value (the negative entries are pure noise,
  since the exact diagonal is nonnegative);
* the exact diagonal recomputed at the partly pruned weights in ``--obd-steps`` increments (16, as
  M-FAC's recomputations; masks kept between them), to separate OBD's saliency from the one-shot step.

For each pruning, the loss change on the curvature samples is compared with its Taylor model at the
dense weights (first-order term, OBD's diagonal quadratic, and the full quadratic by one exact
Hessian-vector product), which shows where OBD's prediction fails.

Seeds 0..``--seeds``-1 change the training (initialisation and batch order), the curvature samples,
the XDiag probes and the fine-tuning; tables give the mean and the min-max range over seeds.
Writes ``experiments/results/mfac_pruning.md`` and ``.png``.

    .venv/bin/python experiments/mfac_pruning.py --quiet     # about 7 minutes on 2 busy cores
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F
from common import machine_line, write_markdown

from secondorder import HessianOperator
from secondorder.datasets import batches, train_mnist1d
from secondorder.linalg import diagonal
from secondorder.prune import finetune, prunable_parameters, prune

SPARSITIES = (0.5, 0.7, 0.9)
MAIN = ("magnitude", "mfac", "obd")
LABELS = {"magnitude": "magnitude", "mfac": "M-FAC OBS", "obd": "OBD (XDiag 100)",
          "obd_more": "OBD (XDiag {n})", "obd_clamp": "OBD (XDiag 100, clamped at 0)",
          "obd_abs": "OBD (XDiag 100, |H_qq|)", "obd_exact": "OBD (exact diagonal)",
          "obd_steps": "OBD (exact diagonal, recomputed {n}x)"}


def evaluate(model, x, y) -> dict:
    with torch.no_grad():
        out = model(x)
        return {"loss": float(F.cross_entropy(out, y)), "accuracy": float((out.argmax(-1) == y).float().mean())}


def exact_diagonal(model, names, x, y) -> torch.Tensor:
    r"""The exact Gauss-Newton diagonal of the mean cross-entropy over ``(x, y)`` for the ``names``
    parameters, flattened in order; equal to the Hessian diagonal for a network that is piecewise
    linear in each single weight (ReLU, pooling, linear layers)."""
    from torch.func import functional_call, jacrev, vmap

    params = {n: p.detach() for n, p in model.named_parameters()}
    pruned = {n: params[n] for n in names}
    rest = {n: p for n, p in params.items() if n not in pruned}

    def logits(w, xi):
        return functional_call(model, {**rest, **w}, (xi.unsqueeze(0),)).squeeze(0)

    total = torch.zeros(sum(p.numel() for p in pruned.values()), dtype=torch.float64)
    for lo in range(0, len(x), 256):
        xb = x[lo:lo + 256]
        jac = vmap(jacrev(logits), in_dims=(None, 0))(pruned, xb)  # {name: [n, 10, *shape]}
        J = torch.cat([jac[n].reshape(len(xb), 10, -1) for n in names], -1).double()  # [n, 10, d]
        with torch.no_grad():
            p = torch.softmax(model(xb), -1).double()  # [n, 10]
        total += (torch.einsum("nc,ncd->d", p, J.square()) - torch.einsum("nc,ncd->nd", p, J).square().sum(0))
    return total / len(x)


def flat(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for _, p in prunable_parameters(model)]).double()


def taylor(model, net, local) -> dict:
    r"""The weight change :math:`\delta` of the pruning against its Taylor model on the curvature
    samples: the first-order term :math:`g^\top\delta`, the diagonal quadratic
    :math:`\tfrac12\sum_q H_{qq}\delta_q^2` (OBD's prediction), the full quadratic
    :math:`\tfrac12\delta^\top H\delta` (one exact Hessian-vector product), and the actual change."""
    op, grad, exact, (x, y) = local
    delta = flat(net) - flat(model)
    hd = (op @ delta.float()[:, None])[:, 0].double()
    with torch.no_grad():
        actual = float(F.cross_entropy(net(x), y)) - float(F.cross_entropy(model(x), y))
    return {"first": float(grad @ delta), "diag": float(0.5 * (exact * delta.square()).sum()),
            "full": float(0.5 * delta @ hd), "actual": actual}


def prune_eval(model, method, data, target, seed, fine, test, epochs, hdiag=None, local=None,
               obd_steps=16) -> dict:
    net = copy.deepcopy(model)
    kind = "diagonal" if method.startswith("obd") else method
    start = time.perf_counter()
    if method == "obd_steps":  # the exact diagonal recomputed at the partly pruned weights, obd_steps increments
        names, (x, y), mask = [n for n, _ in prunable_parameters(model)], data[0], None
        for i in range(1, obd_steps + 1):
            h = exact_diagonal(net, names, x, y).float()
            result = prune(net, F.cross_entropy, data, target * i / obd_steps, method="diagonal", mask=mask,
                           hessian_diagonal=h, seed=seed)
            mask = result.mask
    else:
        result = prune(net, F.cross_entropy, data, target, method=kind, steps=16 if kind == "mfac" else 1,
                       damping=1e-5, block_size=128, rows="batch", hessian_diagonal=hdiag, seed=seed)
    seconds = time.perf_counter() - start
    pruned = evaluate(net, *test)
    model_terms = taylor(model, net, local) if local is not None else None
    tuned = None
    if epochs:
        finetune(net, result.mask, F.cross_entropy, fine, epochs=epochs, lr=1e-2, seed=seed)
        tuned = evaluate(net, *test)
    return {"pruned": pruned, "tuned": tuned, "seconds": seconds, "sparsity": result.sparsity, "taylor": model_terms,
            "layers": {x.name: x.sparsity for x in result.layers}}


def one_seed(seed: int, a, say) -> dict:
    trained = train_mnist1d(seed, 20)
    model = trained.model
    (xtr, ytr), test = trained.train, trained.test
    count = 64 * 32
    pick = torch.randperm(len(xtr), generator=torch.Generator().manual_seed(seed))[:count]
    xs, ys = xtr[pick], ytr[pick]
    grads = [(xs[i:i + 32], ys[i:i + 32]) for i in range(0, count, 32)]
    fine = batches(xtr, ytr, 128)
    names = [n for n, _ in prunable_parameters(model)]
    out = {"dense": evaluate(model, *test), "runs": {}, "diag": {}}

    # the Hessian diagonals: XDiag as the CLI estimates it (prune's own code path), more probes, exact
    t = time.perf_counter()
    op = HessianOperator(model, F.cross_entropy, [(xs, ys)], names, seed=seed)
    xdiag = diagonal(op, 100, method="xdiag", seed=seed).value.double()
    out["diag"]["xdiag_s"] = time.perf_counter() - t
    t = time.perf_counter()
    more = diagonal(op, a.more_probes, method="xdiag", seed=seed).value.double() if a.more_probes else None
    out["diag"]["more_s"] = time.perf_counter() - t
    t = time.perf_counter()
    exact = exact_diagonal(model, names, xs, ys)
    out["diag"]["exact_s"] = time.perf_counter() - t
    if a.check_coords:  # the exact diagonal against exact Hessian-vector products with unit vectors
        idx = torch.randperm(exact.numel(), generator=torch.Generator().manual_seed(seed))[:a.check_coords]
        E = torch.zeros(exact.numel(), len(idx))
        E[idx, torch.arange(len(idx))] = 1
        hvp = (op @ E)[idx, torch.arange(len(idx))].double()
        out["diag"]["check_rel"] = float((hvp - exact[idx]).norm() / exact[idx].norm())
        out["diag"]["check_n"] = len(idx)

    def stats(h):
        neg = h < 0
        w = torch.cat([p.detach().reshape(-1) for _, p in prunable_parameters(model)]).double()
        return {"neg": int(neg.sum()), "neg_frac": float(neg.double().mean()),
                "rel_err": float((h - exact).norm() / exact.norm()),
                "spearman_sal": spearman(w.square() * h, w.square() * exact)}

    out["diag"]["xdiag"] = stats(xdiag)
    if more is not None:
        out["diag"]["more"] = stats(more)
    out["diag"]["exact"] = {"neg": int((exact < 0).sum()), "min": float(exact.min()), "max": float(exact.max()),
                            "zero": int((exact == 0).sum())}
    named = prunable_parameters(model)
    loss = F.cross_entropy(model(xs), ys)
    grad = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, [p for _, p in named])]).double()
    local = (op, grad, exact, (xs, ys))
    diags = {"obd": xdiag, "obd_more": more, "obd_clamp": xdiag.clamp_min(0), "obd_abs": xdiag.abs(),
             "obd_exact": exact}
    methods = ["magnitude", "mfac", "obd"] + (["obd_more"] if more is not None else []) + \
              ["obd_clamp", "obd_abs", "obd_exact"] + (["obd_steps"] if a.obd_steps > 1 else [])
    for m in methods:
        for s in SPARSITIES:
            hdiag = diags.get(m)
            data = [(xs, ys)] if m.startswith("obd") else grads
            r = prune_eval(model, m, data, s, seed, fine, test, a.fine_tune_epochs,
                           hdiag.float() if hdiag is not None else None, local, a.obd_steps)
            out["runs"][m, s] = r
            say(f"seed {seed} {m:10s} {s:.0%}: one-shot {100 * r['pruned']['accuracy']:.1f}% "
                f"({r['pruned']['loss']:.3f}), fine-tuned "
                f"{100 * r['tuned']['accuracy']:.1f}% ({r['tuned']['loss']:.3f}), prune {r['seconds']:.1f} s"
                if r["tuned"] else f"seed {seed} {m} {s}: {r['pruned']}")
    return out


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra @ rb) / (ra.norm() * rb.norm()))


def cell(values: list[float], scale: float = 100, digits: int = 1) -> str:
    m = sum(values) / len(values)
    if len(values) == 1:
        return f"{scale * m:.{digits}f}"
    return f"{scale * m:.{digits}f} [{scale * min(values):.{digits}f}, {scale * max(values):.{digits}f}]"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..n-1 (training, curvature data, probes; 3)")
    p.add_argument("--fine-tune-epochs", type=int, default=2, help="masked fine-tuning epochs (2)")
    p.add_argument("--more-probes", type=int, default=0,
                   help="XDiag products of a less noisy OBD variant (0: skip it; the exact diagonal is the limit)")
    p.add_argument("--obd-steps", type=int, default=16,
                   help="increments of the recomputed exact-diagonal OBD variant, as M-FAC's 16 (16; 1: skip it)")
    p.add_argument("--check-coords", type=int, default=64,
                   help="coordinates of the exact diagonal checked against exact Hessian-vector products (64)")
    p.add_argument("--out", default="experiments/results/mfac_pruning", help="output path without .md/.png")
    p.add_argument("--quiet", action="store_true", help="no per-run lines")
    a = p.parse_args()
    torch.set_num_threads(1)
    say = (lambda *x: None) if a.quiet else (lambda *x: print(*x, flush=True))
    start = time.perf_counter()
    seeds = list(range(a.seeds))
    res = [one_seed(s, a, say) for s in seeds]
    wall = time.perf_counter() - start
    LABELS["obd_more"] = LABELS["obd_more"].format(n=a.more_probes)
    LABELS["obd_steps"] = LABELS["obd_steps"].format(n=a.obd_steps)
    methods = list(dict.fromkeys(m for m, _ in res[0]["runs"]))
    tuned = a.fine_tune_epochs > 0

    def vals(m, s, when, key="accuracy"):
        return [r["runs"][m, s][when][key] for r in res]

    dense_acc = [r["dense"]["accuracy"] for r in res]
    dense_loss = [r["dense"]["loss"] for r in res]
    cmd = "python experiments/mfac_pruning.py" + (" --quiet" if a.quiet else "")
    for flag, default in (("seeds", 3), ("fine_tune_epochs", 2), ("more_probes", 0), ("obd_steps", 16),
                          ("check_coords", 64)):
        if getattr(a, flag) != default:
            cmd += f" --{flag.replace('_', '-')} {getattr(a, flag)}"
    lines = ["# One-shot pruning of the MNIST-1D CNN: M-FAC OBS vs magnitude vs OBD (issue 17, experiment 3)", "",
             machine_line(), "",
             f"Command: `.venv/bin/{cmd}` (wall time {wall / 60:.1f} min).", "",
             f"Model: the `secondorder prune` default, `train_mnist1d(seed, 20)` (Mnist1dCNN, 2960 prunable weights "
             f"of 3018), seeds {', '.join(map(str, seeds))}; dense test accuracy {cell(dense_acc)} %, loss "
             f"{cell(dense_loss, 1, 3)}. Global unstructured sparsity over the Conv/Linear weights, each target "
             f"one-shot from the dense model. M-FAC: 64 gradients of batches of 32, lambda 1e-5, block 128, "
             f"16 recomputations. OBD: w^2 H_qq / 2 with H_qq from XDiag (100 Hessian-vector products on the "
             f"same 2048 samples, as the CLI) and the variants below. Fine-tuning: {a.fine_tune_epochs} epochs "
             f"SGD lr 0.01 momentum 0.9 on the 4000 training samples, masks kept. Test accuracy on 1000 samples, "
             f"mean [min, max] over {len(seeds)} seeds.", "",
             "## Test accuracy (%), one-shot" + (" and after fine-tuning" if tuned else ""), "",
             "| method | " + " | ".join(f"{s:.0%} one-shot" for s in SPARSITIES)
             + ("".join(f" | {s:.0%} fine-tuned" for s in SPARSITIES) if tuned else "") + " |",
             "|---|" + "---:|" * (len(SPARSITIES) * (2 if tuned else 1))]
    for m in methods:
        row = [cell(vals(m, s, "pruned")) for s in SPARSITIES]
        if tuned:
            row += [cell(vals(m, s, "tuned")) for s in SPARSITIES]
        lines.append(f"| {LABELS[m]} | " + " | ".join(row) + " |")
    lines += ["", "## Test loss, one-shot" + (" and after fine-tuning" if tuned else ""), "",
              lines[-len(methods) - 2], lines[-len(methods) - 1]]
    for m in methods:
        row = [cell(vals(m, s, "pruned", "loss"), 1, 3) for s in SPARSITIES]
        if tuned:
            row += [cell(vals(m, s, "tuned", "loss"), 1, 3) for s in SPARSITIES]
        lines.append(f"| {LABELS[m]} | " + " | ".join(row) + " |")

    # per-layer sparsity at 70 %, seed 0
    layer_names = list(res[0]["runs"]["magnitude", 0.7]["layers"])
    lines += ["", "## Where each method prunes (seed 0, 70 %): per-tensor sparsity", "",
              "| method | " + " | ".join(f"{n} ({sz})" for n, sz in zip(layer_names, (80, 2560, 320))) + " |",
              "|---|" + "---:|" * len(layer_names)]
    for m in methods:
        lay = res[0]["runs"][m, 0.7]["layers"]
        lines.append(f"| {LABELS[m]} | " + " | ".join(f"{100 * lay[n]:.1f}%" for n in layer_names) + " |")

    # the diagonal estimates
    lines += ["", "## The Hessian diagonal: XDiag against the exact diagonal", "",
              "| seed | exact: min, max | exact: negatives | XDiag 100: negatives | rel. error | "
              "Spearman of w²H_qq vs exact"
              + (f" | XDiag {a.more_probes}: negatives | rel. error | Spearman" if a.more_probes else "")
              + " | check vs exact HVPs | time: XDiag 100 / "
              + (f"{a.more_probes} / " if a.more_probes else "") + "exact (s) |",
              "|---:|---:|---:|---:|---:|---:|" + ("---:|---:|---:|" if a.more_probes else "") + "---:|---:|"]
    for s, r in zip(seeds, res):
        d = r["diag"]
        x = d["xdiag"]
        row = [str(s), f"{d['exact']['min']:.1e}, {d['exact']['max']:.1e}", str(d["exact"]["neg"]),
               f"{x['neg']} ({100 * x['neg_frac']:.0f}%)", f"{x['rel_err']:.2f}", f"{x['spearman_sal']:.3f}"]
        if a.more_probes:
            y = d["more"]
            row += [f"{y['neg']} ({100 * y['neg_frac']:.0f}%)", f"{y['rel_err']:.2f}", f"{y['spearman_sal']:.3f}"]
        row.append(f"{d['check_rel']:.1e} ({d['check_n']} coords)" if "check_rel" in d else "-")
        row.append(" / ".join(f"{d[k]:.0f}" for k in (["xdiag_s"] + (["more_s"] if a.more_probes else []))) +
                   f" / {d['exact_s']:.1f}")
        lines.append("| " + " | ".join(row) + " |")

    # the Taylor model of the loss change on the curvature samples
    lines += ["", "## Why OBD loses: the loss change on the 2048 curvature samples against its Taylor model", "",
              "delta = the pruned minus the dense weights (M-FAC: with its compensating update); g and H the exact "
              "gradient and Hessian at the dense weights on the curvature samples. OBD minimises the diagonal "
              "term over the pruned set (exactly, with the exact diagonal). Mean over seeds.", "",
              "| sparsity | method | g·δ | ½ Σ H_qq δ_q² (OBD's model) | ½ δᵀHδ (full quadratic) | actual change |",
              "|---:|---|---:|---:|---:|---:|"]
    for s in SPARSITIES:
        for m in [m for m in ("magnitude", "mfac", "obd", "obd_exact", "obd_steps") if m in methods]:
            t = [r["runs"][m, s]["taylor"] for r in res]
            lines.append(f"| {s:.0%} | {LABELS[m]} | " + " | ".join(
                f"{sum(x[k] for x in t) / len(t):.3f}" for k in ("first", "diag", "full", "actual")) + " |")

    # verdict
    def mean(m, s, when="pruned"):
        v = vals(m, s, when)
        return 100 * sum(v) / len(v)

    gap = {s: mean("mfac", s) - mean("magnitude", s) for s in SPARSITIES}
    worst_gap = {s: min(100 * (x - y) for x, y in zip(vals("mfac", s, "pruned"), vals("magnitude", s, "pruned")))
                 for s in SPARSITIES}
    holds = all(gap[s] >= -0.5 for s in SPARSITIES) and all(worst_gap[s] > 2 for s in (0.7, 0.9))
    lines += ["", "## Verdict", "",
              f"- **Note's expectation (M-FAC ≥ magnitude, with a clear gap at 70–90%): "
              f"{'holds' if holds else 'does not fully hold'}.** One-shot M-FAC minus magnitude, mean over seeds "
              f"(smallest per-seed gap): " + ", ".join(f"{s:.0%}: {gap[s]:+.1f} ({worst_gap[s]:+.1f}) points"
                                                       for s in SPARSITIES) + "."]
    if tuned:
        lines.append("- After fine-tuning: M-FAC minus magnitude " + ", ".join(
            f"{s:.0%}: {mean('mfac', s, 'tuned') - mean('magnitude', s, 'tuned'):+.1f}" for s in SPARSITIES)
            + " points; OBD (XDiag 100) minus magnitude " + ", ".join(
            f"{s:.0%}: {mean('obd', s, 'tuned') - mean('magnitude', s, 'tuned'):+.1f}" for s in SPARSITIES)
            + " points.")
    obd_variants = [m for m in methods if m.startswith("obd")]
    lines.append("- OBD one-shot minus magnitude at 70% / 90%: " + "; ".join(
        f"{LABELS[m]} {mean(m, 0.7) - mean('magnitude', 0.7):+.1f} / {mean(m, 0.9) - mean('magnitude', 0.9):+.1f}"
        for m in obd_variants) + " points.")
    neg = [r["diag"]["xdiag"]["neg"] for r in res]
    rel = [r["diag"]["xdiag"]["rel_err"] for r in res]
    sp = [r["diag"]["xdiag"]["spearman_sal"] for r in res]
    lines.append(f"- OBD's diagonal: the exact Hessian diagonal has {max(r['diag']['exact']['neg'] for r in res)} "
                 f"negative entries (it is the Gauss-Newton diagonal here); XDiag 100 has {min(neg)}-{max(neg)} of "
                 f"2960, relative error {min(rel):.2f}-{max(rel):.2f}, Spearman correlation of its OBD saliency "
                 f"with the exact one {min(sp):.3f}-{max(sp):.3f}. Clamping at 0 "
                 + ("changes no accuracy (negative and zero saliencies are both pruned first)"
                    if all(vals("obd", s, "pruned") == vals("obd_clamp", s, "pruned") for s in SPARSITIES)
                    else "changes the accuracies") + "; OBD with the exact diagonal minus OBD with XDiag 100: "
                 + ", ".join(f"{s:.0%}: {mean('obd_exact', s) - mean('obd', s):+.1f}" for s in SPARSITIES)
                 + " points.")
    if "obd_steps" in methods:
        lines.append(f"- Recomputing the exact diagonal {a.obd_steps} times on the way (no other change) minus "
                     "one-shot exact OBD: " + ", ".join(
                         f"{s:.0%}: {mean('obd_steps', s) - mean('obd_exact', s):+.1f}" for s in SPARSITIES)
                     + " points; minus magnitude: " + ", ".join(
                         f"{s:.0%}: {mean('obd_steps', s) - mean('magnitude', s):+.1f}" for s in SPARSITIES)
                     + " points.")
    lines += ["", "![accuracy against sparsity](mfac_pruning.png)", ""]
    png, plt = write_markdown(lines, a.out)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    xs = [100 * s for s in SPARSITIES]

    def curve(ax, m, when, style, color, label):
        ys = [mean(m, s, when) for s in SPARSITIES]
        lo = [100 * min(vals(m, s, when)) for s in SPARSITIES]
        hi = [100 * max(vals(m, s, when)) for s in SPARSITIES]
        ax.errorbar(xs, ys, yerr=[[y - v for y, v in zip(ys, lo)], [v - y for y, v in zip(ys, hi)]], fmt=style,
                    color=color, capsize=3, label=label)

    for i, m in enumerate(MAIN):
        curve(axes[0], m, "pruned", "o-", f"C{i}", f"{LABELS[m]}, one-shot")
        if tuned:
            curve(axes[0], m, "tuned", "s--", f"C{i}", f"{LABELS[m]} + {a.fine_tune_epochs} ep. fine-tuning")
    for i, m in enumerate(["magnitude", "mfac"] + obd_variants):
        curve(axes[1], m, "pruned", "o-", f"C{i}", LABELS[m])
    for ax, title in zip(axes, ("M-FAC vs magnitude vs OBD", "one-shot: the OBD variants")):
        ax.axhline(100 * sum(dense_acc) / len(dense_acc), color="gray", lw=0.8, ls=":", label="dense")
        ax.set_xlabel("sparsity of the prunable weights (%)")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"test accuracy (%), mean and range over {len(seeds)} seeds")
    fig.savefig(png, dpi=110, bbox_inches="tight")
    plt.close(fig)


if __name__ == "__main__":
    main()
