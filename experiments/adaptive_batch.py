"""Adaptive batch size from the top Hessian eigenvalue (ABS/ABSA) on MNIST-1D, small-scale reproduction.

Yao, Gholami, Arfeen, Liaw, Gonzalez, Keutzer, Mahoney ("Large batch size training of neural networks
with adversarial training and second-order information", arXiv:1810.01021) grow the batch size when
the top Hessian eigenvalue has halved since the last increase (or after 10 epochs without one), scale
the learning rate linearly with it, and (ABSA) replace a fraction of every batch by FGSM examples.
They report that this keeps the small-batch accuracy with several times fewer SGD iterations, while
plain large-batch training loses accuracy.

Here: the MNIST-1D CNN of ``secondorder.datasets.mnist1d`` (3018 parameters, 4000 training / 1000
test sequences), SGD with momentum 0.9, 90 epochs, learning rate x0.2 after epochs 30, 60 and 80 (the
paper's ResNet schedule), seeds 0, 1, 2 (a seed fixes the initialisation, the data order and the
eigenvalue batches; same seed = same initial network in every row). Rows:

* baseline: batch 128, lr 0.1;
* plain large batch with the learning rate scaled linearly (0.1 x B / 128) and a 5-epoch linear
  warm-up (Goyal et al.): batch 2048 (lr 1.6) and the full batch 4000 (lr 3.125). The paper's 8192
  cannot be a real batch of a 4000-sample training set: an 8192-sample step would hold every
  sample about twice, i.e. the full-batch gradient, with the learning rate of 8192 and one step
  every two epochs. So the full batch (the largest real batch) stands for "8192" here;
* the same two batches with the learning rate capped at 0.4 instead (the best learning rate for
  batch 1024 in experiments/large_batch.py's scan, not re-tuned here): a fairer large-batch baseline;
* ABS from batch 128 (lr 0.1), growing up to the full batch 4000 (lr up to 3.125 before decay),
  HessianFlow's rule and defaults: eigenvalue on 128 fresh training samples after every epoch
  (Lanczos, at most 20 products, eval mode), ratio 2, patience 10;
* ABSA: ABS plus FGSM on a fraction 0.2 of every batch (halved at each increase, none from epoch 45
  on), epsilon 0.05 = 0.005 x the range of the inputs (HessianFlow: 0.005 on [0, 1] images), clipped
  to the inputs' range;
* control "ABS, eigenvalue rule only": ABS without the patience rule, to see what the eigenvalue
  test does on its own.

The top eigenvalue is tracked after every epoch in every row (the same 128-sample estimate the
controller uses); after training the top eigenvalue of the full training loss (all 4000 samples) is
measured too. Iterations = optimizer steps (an epoch at batch B takes ceil(4000 / B) steps, the last
one ragged).

Run:  .venv/bin/python experiments/adaptive_batch.py
Writes experiments/results/adaptive_batch.md and experiments/results/adaptive_batch.png.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_line, write_markdown  # noqa: E402

from secondorder.datasets import Mnist1dCNN, batches, load_mnist1d  # noqa: E402
from secondorder.schedules import AdaptiveBatchSize, AdaptiveBatchTrainer, top_eigenvalue  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
N_TRAIN = 4000
FULL_EIG_ROWS = ("base", "c2048", "abs", "absa", "eigonly")  # full-data eigenvalue after training (2-3 s each)


def configs(a):
    lin = lambda b: a.lr * b / 128  # noqa: E731
    return [
        dict(key="base", label=f"baseline: batch 128, lr {a.lr:g}", batch=128, lr=a.lr, adaptive=False),
        dict(key="l2048", label=f"large 2048, lr {lin(2048):g} (linear) + {a.warmup}-epoch warm-up", batch=2048,
             lr=lin(2048), adaptive=False, warmup=a.warmup),
        dict(key="l4000", label=f"large 4000 = full batch ('8192'), lr {lin(4000):g} (linear) + {a.warmup}-epoch "
             "warm-up", batch=4000, lr=lin(4000), adaptive=False, warmup=a.warmup),
        dict(key="c2048", label=f"large 2048, lr {a.capped_lr:g} (capped)", batch=2048, lr=a.capped_lr,
             adaptive=False),
        dict(key="c4000", label=f"large 4000 = full batch, lr {a.capped_lr:g} (capped)", batch=4000,
             lr=a.capped_lr, adaptive=False),
        dict(key="abs", label="ABS from 128 (max 4000)", batch=128, lr=a.lr, adaptive=True),
        dict(key="absa", label=f"ABSA from 128 (max 4000, FGSM 0.2, eps {a.epsilon:g})", batch=128, lr=a.lr,
             adaptive=True, fraction=0.2),
        dict(key="eigonly", label="control: ABS, eigenvalue rule only (no patience)", batch=128, lr=a.lr,
             adaptive=True, patience=None),
    ]


def run(cfg, seed, data, a):
    xtr, ytr, xte, yte = data
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Mnist1dCNN()
    controller = AdaptiveBatchSize(
        cfg["batch"], cfg["lr"], max_batch_size=N_TRAIN if cfg["adaptive"] else cfg["batch"],
        patience=cfg.get("patience", 10), adversarial_fraction=cfg.get("fraction", 0.0),
        adversarial_epochs=a.epochs // 2, lr_milestones=a.milestones, lr_decay=0.2,
        warmup_epochs=cfg.get("warmup", 0), adaptive=cfg["adaptive"])
    trainer = AdaptiveBatchTrainer(model, F.cross_entropy, (xtr, ytr), controller, test_data=(xte, yte),
                                   epsilon=a.epsilon, seed=seed)
    t0 = time.perf_counter()
    diverged = None
    try:
        history = trainer.train(a.epochs)
    except FloatingPointError as err:
        history, diverged = trainer.history, str(err)
    seconds = time.perf_counter() - t0
    full_eig = None
    if diverged is None and cfg["key"] in FULL_EIG_ROWS:
        full_eig = top_eigenvalue(model, F.cross_entropy, batches(xtr, ytr, 1000), seed=seed)
    last = history[-1]
    return dict(history=history, acc=last.test_accuracy, loss=last.train_loss, iters=last.iterations,
                full_eig=full_eig, seconds=seconds, diverged=diverged,
                eig_last=statistics.mean(r.top_eigenvalue for r in history[-10:]),
                eig_first=statistics.mean(r.top_eigenvalue for r in history[:10]),
                by_eig=sum(r.batch_increase == "eigenvalue" for r in history),
                by_pat=sum(r.batch_increase == "patience" for r in history),
                reached=next((r.epoch for r in history if r.batch_size >= N_TRAIN), None),
                best=max(r.test_accuracy for r in history))


def mean_std(xs):
    xs = list(xs)
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def pm(xs, fmt=".3f", scale=1.0):
    m, s = mean_std(x * scale for x in xs)
    return f"{m:{fmt}} ± {s:{fmt}}"


def comparison(a, cs, res):
    S = a.seeds
    m = lambda key, f: statistics.mean(f(res[key][s]) for s in S)  # noqa: E731
    acc = lambda key: m(key, lambda r: r["acc"])  # noqa: E731
    it = lambda key: m(key, lambda r: r["iters"])  # noqa: E731
    base = acc("base")
    out = ["## Comparison with the paper (stated plainly)", ""]
    for key, name in (("abs", "ABS"), ("absa", "ABSA")):
        d = [res[key][s]["acc"] - res["base"][s]["acc"] for s in S]
        out.append(
            f"* **{name} keeps the small-batch accuracy with fewer iterations: "
            f"{'holds' if abs(statistics.mean(d)) <= 0.005 or statistics.mean(d) > 0 else 'does not hold'}.** "
            f"Test accuracy {100 * acc(key):.1f} % vs {100 * base:.1f} % for batch 128 (paired difference "
            f"{100 * statistics.mean(d):+.2f} points, per seed {', '.join(f'{100 * x:+.1f}' for x in d)}) with "
            f"{it(key):.0f} instead of {it('base'):.0f} SGD iterations ({it('base') / it(key):.1f}x fewer; the paper "
            f"reports up to 5x fewer at equal or up to 1 % better accuracy).")
    for key in ("l2048", "l4000", "c2048", "c4000"):
        rs = [res[key][s] for s in S]
        div = sum(r["diverged"] is not None for r in rs)
        out.append(f"* {next(c['label'] for c in cs if c['key'] == key)}: test accuracy {100 * acc(key):.1f} % "
                   f"({100 * (acc(key) - base):+.1f} points vs batch 128) with {it(key):.0f} iterations"
                   + (f"; diverged on {div}/{len(S)} seeds" if div else "") + ".")
    worst = max(base - acc(k) for k in ("l2048", "l4000", "c2048", "c4000"))
    best = min(base - acc(k) for k in ("l2048", "l4000", "c2048", "c4000"))
    out.append(f"  **Plain large batches lose accuracy: {'holds' if best > 0.005 else 'does not hold'}** (by "
               f"{100 * best:.1f} to {100 * worst:.1f} points). The paper's large-batch baselines lose a few points; "
               f"the loss here is larger because {a.epochs} epochs at batch 2048 / 4000 are only "
               f"{a.epochs * 2} / {a.epochs} SGD steps, and this network does not train fast at the linearly "
               f"scaled learning rates from its initialisation (warm-up included).")
    by_eig = sum(res[k][s]["by_eig"] for k in ("abs", "absa") for s in S)
    by_pat = sum(res[k][s]["by_pat"] for k in ("abs", "absa") for s in S)
    only = [res["eigonly"][s] for s in S]
    ratios = [r.top_eigenvalue / res[k][s]["history"][0].top_eigenvalue
              for k in ("abs", "absa") for s in S for r in res[k][s]["history"][1:] if r.batch_size < N_TRAIN]
    first10, last10 = m("abs", lambda r: r["eig_first"]), m("abs", lambda r: r["eig_last"])
    ref1 = m("abs", lambda r: r["history"][0].top_eigenvalue)
    curve = [statistics.mean(res["abs"][s]["history"][i].top_eigenvalue for s in S) for i in range(10)]
    peak = max(curve)
    peak_epoch = curve.index(peak) + 1
    out.append(
        f"* **The batch grows because the eigenvalue halved: does not hold here.** Of the {by_eig + by_pat} batch "
        f"increases in the ABS and ABSA runs, {by_eig} came from the eigenvalue test and {by_pat} from the patience "
        f"(duration) rule. The 128-sample top eigenvalue changes little during training (ABS: mean "
        f"{first10:.2f} over epochs 1-10, {last10:.2f} over the last 10, {100 * (last10 / first10 - 1):+.0f} %; "
        f"batch 128: {m('base', lambda r: r['eig_first']):.2f} and {m('base', lambda r: r['eig_last']):.2f}), "
        f"while the paper's rule asks for a halving relative to the first measurement (HessianFlow keeps that "
        f"reference through forced increases): the lowest measurement before the cap was "
        f"{min(ratios):.2f} x the reference, and one 128-sample batch to the next varies by about a factor 2. "
        f"The reference is taken after epoch 1 (ABS mean {ref1:.2f}), while the eigenvalue is still rising "
        f"(progressive sharpening: the mean peaks at {peak:.2f} in epoch {peak_epoch}), so the threshold "
        f"{ref1 / 2:.2f} lies far below the values the eigenvalue then settles at. "
        f"Without the patience rule (control) the batch grew {sum(r['by_eig'] for r in only)} times in {len(S)} "
        f"runs, reaching batch {', '.join(str(r['history'][-1].batch_size) for r in only)}: the control is the "
        f"batch-128 baseline ({100 * acc('eigonly'):.1f} %, {it('eigonly'):.0f} iterations). So ABS here was the "
        f"fixed schedule 'double the batch and the learning rate every 10 epochs', and the Hessian computation did "
        f"not contribute to its result. The paper's schedule figure (ResNets with BatchNorm on CIFAR) shows the "
        f"eigenvalue falling early in training; this small CNN without normalisation does not.")
    fe = lambda key: [res[key][s]["full_eig"] for s in S]  # noqa: E731
    if all(v is not None for k in ("abs", "absa", "base") for v in fe(k)):
        lower = sum(res["absa"][s]["full_eig"] <= res["abs"][s]["full_eig"] for s in S)
        verdict = "holds" if lower == len(S) else "mixed" if lower else "does not hold"
        out.append(
            f"* **ABSA ends flatter than ABS: {verdict}.** Full-data top eigenvalue after training: ABSA "
            f"{statistics.mean(fe('absa')):.2f} vs ABS {statistics.mean(fe('abs')):.2f} (batch 128: "
            f"{statistics.mean(fe('base')):.2f}), lower for ABSA on {lower}/{len(S)} seeds; the two share the "
            f"batch schedule, so the difference is the FGSM examples. Test accuracy: ABSA "
            f"{100 * acc('absa'):.1f} % vs ABS {100 * acc('abs'):.1f} % (the paper finds ABSA slightly better; "
            f"here the difference is within the seed spread).")
    out.append("* No hyper-parameter was tuned for ABS/ABSA: HessianFlow's defaults (ratio 2, patience 10, FGSM "
               "0.2, epsilon 0.005 of the input range, eigenvalue batch 128) and the baseline's learning rate and "
               "decay schedule. What made ABS/ABSA work here is the decay schedule: without it the linearly scaled "
               "learning rate reaches 3.125 at the full batch, and in a trial run while writing this script "
               "(60 epochs, constant lr 0.1 x batch/128, seed 0) ABS and ABSA collapsed to 10 % test accuracy "
               "after reaching batch 4000, where batch 128 reached 96.7 %. The paper's 'no additional tuning' "
               "thus relies on the base schedule decaying the learning rate by the time the batch is large.")
    out.append("")
    return out


def figure(a, cs, res, png, plt):
    S = a.seeds
    colors = {"base": "C0", "l2048": "C3", "l4000": "C5", "c2048": "C1", "c4000": "C8", "abs": "C2", "absa": "C4",
              "eigonly": "C7"}
    styles = {"absa": "--", "eigonly": ":"}  # ABSA shares ABS's schedule, the control the baseline's
    fig, axes = plt.subplots(1, 3, figsize=(18, 4.6))
    ax = axes[0]
    for c in cs:
        for j, s in enumerate(S):
            h = res[c["key"]][s]["history"]
            ax.step([r.epoch for r in h], [r.batch_size for r in h], where="post", color=colors[c["key"]],
                    ls=styles.get(c["key"], "-"), lw=1.8 if j == 0 else 0.8, alpha=1.0 if j == 0 else 0.6,
                    label=c["label"] if j == 0 else None)
    ax.set_yscale("log", base=2)
    ticks = [128, 256, 512, 1024, 2048, 4000]
    ax.set_yticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("epoch")
    ax.set_ylabel("batch size (samples per SGD step)")
    ax.set_title("(a) batch size over epochs (seed 0 thick; ABS and ABSA coincide,\n"
                 "as do the eigenvalue-only control and batch 128)", fontsize=9)
    ax.legend(fontsize=6, loc="center right", framealpha=0.9)
    ax = axes[1]
    for key in [k for k in ("base", "c2048", "abs", "absa") if k in res]:
        c = next(c for c in cs if c["key"] == key)
        hs = [res[key][s]["history"] for s in S]
        n = min(len(h) for h in hs)
        mean = [statistics.mean(h[i].top_eigenvalue for h in hs) for i in range(n)]
        ax.plot(range(1, n + 1), mean, color=colors[key], lw=1.3, ls=styles.get(key, "-"),
                label=f"{c['label']} (mean of {len(S)} seeds)")
        for r in res[key][S[0]]["history"] if key in ("abs", "absa") else ():
            if r.batch_increase:
                ax.axvline(r.epoch, color=colors[key], lw=0.6, ls="-" if r.batch_increase == "eigenvalue" else ":")
    if "abs" in res:
        threshold = statistics.mean(res["abs"][s]["history"][0].top_eigenvalue for s in S) / 2
        ax.axhline(threshold, color=colors["abs"], lw=1.0, ls="--",
                   label=f"ABS halving threshold λ_ref / 2 (mean of seeds: {threshold:.2f})")
    ax.set_xlabel("epoch")
    ax.set_ylabel("top Hessian eigenvalue (128 fresh training samples)")
    ax.set_title("(b) top eigenvalue after every epoch; vertical lines: ABS/ABSA batch increases (seed 0;\n"
                 "solid: eigenvalue halved, dotted: patience)", fontsize=9)
    ax.legend(fontsize=6.5)
    ax = axes[2]
    for c in cs:
        hs = [res[c["key"]][s]["history"] for s in S]
        n = min(len(h) for h in hs)
        its = [statistics.mean(h[i].iterations for h in hs) for i in range(n)]
        accs = [statistics.mean(h[i].test_accuracy for h in hs) for i in range(n)]
        ax.plot(its, accs, color=colors[c["key"]], lw=1.3, ls=styles.get(c["key"], "-"), label=c["label"])
    ax.set_xscale("log")
    ax.set_xlabel("SGD iterations (optimizer steps)")
    ax.set_ylabel("test accuracy (mean of seeds)")
    ax.set_title("(c) test accuracy against iterations", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=6.5)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=90)
    ap.add_argument("--milestones", type=int, nargs="*", default=[30, 60, 80])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--capped-lr", type=float, default=0.4)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--epsilon", type=float, default=0.05)
    ap.add_argument("--rows", nargs="*", help="keys of the rows to run (default: all)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS / "adaptive_batch"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    t_start = time.perf_counter()
    data = load_mnist1d()
    cs = [c for c in configs(a) if not a.rows or c["key"] in a.rows]
    res = {c["key"]: {} for c in cs}
    for c in cs:
        for s in a.seeds:
            r = res[c["key"]][s] = run(c, s, data, a)
            h = r["history"]
            print(f"{c['label']}, seed {s}: test acc {r['acc']:.3f} (best {r['best']:.3f}), train loss "
                  f"{r['loss']:.3f}, {r['iters']} iterations, final batch {h[-1].batch_size}, increases "
                  f"{r['by_eig']} eigenvalue / {r['by_pat']} patience, full-data λ1 {r['full_eig']}, "
                  f"{r['seconds']:.1f} s" + (f", DIVERGED: {r['diverged']}" if r["diverged"] else ""), flush=True)
    total = time.perf_counter() - t_start
    cmd = ".venv/bin/python experiments/adaptive_batch.py" + "".join(f" {x}" for x in sys.argv[1:])
    S = a.seeds
    rows, seed_rows = [], []
    for c in cs:
        rs = [res[c["key"]][s] for s in S]
        full = [r["full_eig"] for r in rs if r["full_eig"] is not None]
        rows.append(
            f"| {c['label']} | {pm((r['acc'] for r in rs), '.1f', 100)} | {pm((r['best'] for r in rs), '.1f', 100)} "
            f"| {statistics.mean(r['iters'] for r in rs):.0f} | {pm((r['loss'] for r in rs), '.3f')} "
            f"| {' / '.join(str(r['history'][-1].batch_size) for r in rs)} "
            f"| {sum(r['by_eig'] for r in rs)} / {sum(r['by_pat'] for r in rs)} "
            f"| {pm((r['eig_last'] for r in rs), '.2f')} | {pm(full, '.2f') if full else '-'} "
            f"| {statistics.mean(r['seconds'] for r in rs):.1f} |")
        for s in S:
            r = res[c["key"]][s]
            sched = ", ".join(f"{x.batch_size}@{x.epoch - 1}" for i, x in enumerate(r["history"])
                              if i == 0 or x.batch_size != r["history"][i - 1].batch_size)
            seed_rows.append(f"| {c['label']} | {s} | {100 * r['acc']:.1f} | {r['iters']} | {r['loss']:.3f} "
                             f"| {sched} | {'-' if r['full_eig'] is None else format(r['full_eig'], '.2f')} |")
    lines = [
        "# Adaptive batch size from the Hessian (ABS/ABSA) on MNIST-1D (small-scale reproduction)", "",
        f"Command: `{cmd}`  ", machine_line(),
        f"Setup: MNIST-1D ({N_TRAIN} train / 1000 test), `Mnist1dCNN` (3018 parameters), SGD momentum 0.9, "
        f"{a.epochs} epochs, lr × 0.2 after epochs {', '.join(map(str, a.milestones))}, seeds "
        f"{', '.join(map(str, S))} (same seed = same initial network, data order and eigenvalue batches in every "
        f"row). `secondorder.schedules.AdaptiveBatchTrainer` with `AdaptiveBatchSize` (HessianFlow's rule: ratio 2, "
        f"patience 10, lr linear in the batch, FGSM fraction 0.2 halved per increase and none from epoch "
        f"{a.epochs // 2}, epsilon {a.epsilon:g} = 0.005 × the input range, clipped to it), micro-batches of 128 "
        f"accumulated. Largest batch = the full training set (4000): a batch of 8192 would hold every sample twice "
        f"(the full-batch gradient with the step size of 8192), so '8192' is represented by the full batch with "
        f"its linearly scaled lr (0.1 × 4000/128). Top eigenvalue: Lanczos (≤ 20 Hessian-vector products) on 128 "
        f"fresh training samples after every epoch, model in eval mode; 'full-data λ1' is measured after training "
        f"on all 4000 samples.  ",
        f"Total runtime: {total:.0f} s", "",
        f"Mean ± std over {len(S)} seeds. 'increases' = batch increases by the eigenvalue test / by the patience "
        "rule (summed over seeds); 'λ1 last 10' = mean 128-sample top eigenvalue over the last 10 epochs.  ", "",
        "| run | test acc. % (final) | best epoch test acc. % | iterations | train loss | final batch (per seed) "
        "| increases eig / patience | λ1 last 10 | full-data λ1 | seconds |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ] + rows + ["", "Per seed (schedule: batch@first epoch, 0-based):", "",
                "| run | seed | test acc. % | iterations | train loss | schedule | full-data λ1 |",
                "|---|---|---|---|---|---|---|"] + seed_rows + [""]
    if {"base", "abs", "absa", "eigonly", "l2048", "l4000", "c2048", "c4000"} <= set(res):
        lines += comparison(a, cs, res)
    png, plt = write_markdown(lines, a.out)
    figure(a, cs, res, png, plt)
    print(f"wrote {png.with_suffix('.md')} and {png} in {total:.0f} s")


if __name__ == "__main__":
    main()
