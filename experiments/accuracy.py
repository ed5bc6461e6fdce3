"""Final test accuracy of AdaHessian vs SGD / Adam / AdamW, at small scale (CPU).

A small-scale analogue of the AdaHessian paper's (Yao et al., AAAI 2021) Table 2 (image
classification accuracy of SGD, Adam, AdamW and AdaHessian): two tiny datasets with tiny CNNs,
(a) MNIST-1D (4000 train / 1000 test, length 40; generated offline) with a 1-D CNN and
(b) scikit-learn's ``load_digits`` (8x8 images, 1797 samples, fixed seeded 80/20 train/test
split) with a 2-D CNN.

Protocol (identical for every optimizer): batch 128, the same number of epochs, a per-step cosine
learning-rate decay to 0. The learning rate of each optimizer is picked from a 3-value grid on a
held-out validation split (20 %) of the TRAIN data with one seed (seed 0); then 3 seeds are trained
at the selected lr on the full train split and TEST accuracy is reported (mean +- std). AdamW uses
decoupled weight decay 1e-2; all others use none.

Run:  .venv/bin/python experiments/accuracy.py
Writes experiments/results/accuracy.md and experiments/results/accuracy.png.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_line, train_step, write_markdown  # noqa: E402
from update_frequency import Net as Net1D  # noqa: E402
from update_frequency import load_data as load_mnist1d

from secondorder.optim.adahessian import AdaHessian  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
OPTS = ["SGD", "Adam", "AdamW", "AdaHessian"]
GRID = {"SGD": [0.03, 0.1, 0.3], "Adam": [3e-4, 1e-3, 3e-3], "AdamW": [3e-4, 1e-3, 3e-3],
        "AdaHessian": [0.05, 0.15, 0.3]}
WIDE = {"SGD": [1.0], "Adam": [1e-2], "AdamW": [1e-2], "AdaHessian": [1.0]}  # --wide: one larger lr each


def load_digits_split(seed: int = 0):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.as_tensor(d.images / 16.0, dtype=torch.float32).unsqueeze(1)  # [N, 1, 8, 8]
    y = torch.as_tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_tr = int(0.8 * len(x))
    tr, te = perm[:n_tr], perm[n_tr:]
    return x[tr], y[tr], x[te], y[te]


class Net2D(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.c1(x)), 2)  # 8x8 -> 4x4
        x = F.relu(self.c2(x))
        return self.fc(x.mean((-2, -1)))  # global average pool


DATASETS = {"MNIST-1D": (load_mnist1d, Net1D), "digits (sklearn)": (load_digits_split, Net2D)}


def make_opt(name: str, params, lr: float, seed: int):
    if name == "SGD":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    if name == "Adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "AdamW":
        return torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    return AdaHessian(params, lr=lr, weight_decay=0.0, seed=seed)


def train_eval(name, lr, seed, net_cls, xtr, ytr, xev, yev, epochs, batch):
    """Train from scratch; return (accuracy on (xev, yev), diverged)."""
    torch.manual_seed(seed)
    model = net_cls()
    opt = make_opt(name, model.parameters(), lr, seed)
    second_order = isinstance(opt, AdaHessian)
    gen = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(len(xtr) / batch)
    total, t = epochs * steps_per_epoch, 0
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(xtr), generator=gen)
        for i in range(0, len(xtr), batch):
            for g in opt.param_groups:  # per-step cosine decay to 0, identical for all optimizers
                g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * t / total))
            t += 1
            idx = perm[i : i + batch]
            xb, yb = xtr[idx], ytr[idx]
            try:
                loss = train_step(opt, second_order, lambda: F.cross_entropy(model(xb), yb))
            except FloatingPointError:
                return float("nan"), True
            if not math.isfinite(float(loss.detach())):
                return float("nan"), True
    model.eval()
    with torch.no_grad():
        return (model(xev).argmax(1) == yev).float().mean().item(), False


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs-mnist1d", type=int, default=30)
    ap.add_argument("--epochs-digits", type=int, default=40)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--wide", action="store_true",
                    help="append one larger lr to each grid (SGD 1.0, Adam/AdamW 1e-2, AdaHessian 1.0)")
    ap.add_argument("--out", default=str(RESULTS / "accuracy"))
    a = ap.parse_args()
    if a.wide:
        for k, v in WIDE.items():
            GRID[k] = GRID[k] + v
    torch.set_num_threads(a.threads)
    epochs = {"MNIST-1D": a.epochs_mnist1d, "digits (sklearn)": a.epochs_digits}
    t_start = time.perf_counter()
    sel, res, val = {}, {}, {}
    for ds, (loader, net_cls) in DATASETS.items():
        xtr, ytr, xte, yte = loader()
        # validation split of TRAIN data for the lr selection (fixed seed, 20 %)
        perm = torch.randperm(len(xtr), generator=torch.Generator().manual_seed(1234))
        n_val = len(xtr) // 5
        vi, ti = perm[:n_val], perm[n_val:]
        for name in OPTS:
            scores = {}
            for lr in GRID[name]:
                acc, div = train_eval(name, lr, 0, net_cls, xtr[ti], ytr[ti], xtr[vi], ytr[vi], epochs[ds], a.batch)
                scores[lr] = acc
                print(f"[select] {ds:16s} {name:10s} lr {lr:<7g} val acc {acc:.4f}{' DIVERGED' if div else ''}",
                      flush=True)
            finite = {k: v for k, v in scores.items() if math.isfinite(v)}
            best = max(finite, key=finite.get) if finite else GRID[name][0]
            sel[ds, name], val[ds, name] = best, scores
            accs, ndiv = [], 0
            for seed in range(a.seeds):
                acc, div = train_eval(name, best, seed, net_cls, xtr, ytr, xte, yte, epochs[ds], a.batch)
                ndiv += div
                if not div:
                    accs.append(acc)
                print(f"[test]   {ds:16s} {name:10s} lr {best:<7g} seed {seed} test acc {acc:.4f}"
                      f"{' DIVERGED' if div else ''}", flush=True)
            res[ds, name] = dict(mean=statistics.mean(accs) if accs else float("nan"),
                                 std=statistics.stdev(accs) if len(accs) > 1 else 0.0, div=ndiv, accs=accs)
    total = time.perf_counter() - t_start

    cmd = ".venv/bin/python experiments/accuracy.py" + "".join(f" {x}" for x in sys.argv[1:])
    lines = [
        "# Final test accuracy: AdaHessian vs SGD / Adam / AdamW (small-scale analogue of the paper's Table 2)",
        "",
        f"Command: `{cmd}`  ",
        machine_line(),
        f"Setup: batch {a.batch}; per-step cosine lr decay to 0 for every optimizer; "
        f"MNIST-1D (4000 train / 1000 test) {a.epochs_mnist1d} epochs, "
        "Conv1d(1,16,5)-ReLU-Conv1d(16,32,5)-ReLU-GAP-Linear(32,10); "
        f"digits (sklearn load_digits, seeded 80/20 split: 1437 train / 360 test, pixels / 16) {a.epochs_digits} epochs, "
        "Conv2d(1,16,3)-ReLU-MaxPool2-Conv2d(16,32,3)-ReLU-GAP-Linear(32,10). "
        "SGD momentum 0.9; Adam/AdamW betas (0.9, 0.999); AdamW weight decay 1e-2 (decoupled); "
        "AdaHessian defaults (betas (0.9, 0.999), eps 1e-4, Hessian power 1, update_each 1), weight decay 0.  ",
        "LR selection: grid per optimizer (" + "; ".join(f"{k} {{{', '.join(f'{x:g}' for x in v)}}}" for k, v in GRID.items())
        + "), seed 0, trained on 80 % of the train split and scored on the held-out "
        f"20 %; then {a.seeds} seeds (0..{a.seeds - 1}) at the selected lr on the full train split, TEST accuracy reported.  ",
        f"Total runtime: {total:.0f} s",
        "",
        "| dataset | optimizer | selected lr | val acc per lr (selection, seed 0) | test acc % (mean ± std) |",
        "|---|---|---|---|---|",
    ]
    for ds in DATASETS:
        for name in OPTS:
            r = res[ds, name]
            vs = ", ".join(f"{lr:g}: {100 * v:.1f}" for lr, v in val[ds, name].items())
            div = f" ({r['div']} diverged)" if r["div"] else ""
            lines.append(f"| {ds} | {name} | {sel[ds, name]:g} | {vs} | {100 * r['mean']:.1f} ± {100 * r['std']:.1f}{div} |")
    lines += ["", "std = sample standard deviation over seeds; nan = diverged (non-finite loss).", ""]
    png, plt = write_markdown(lines, a.out)

    fig, axes = plt.subplots(1, len(DATASETS), figsize=(10, 4))
    colors = ["tab:green", "tab:red", "tab:orange", "tab:blue"]
    for ax, ds in zip(axes, DATASETS):
        means = [100 * res[ds, n]["mean"] for n in OPTS]
        stds = [100 * res[ds, n]["std"] for n in OPTS]
        bars = ax.bar(range(len(OPTS)), means, yerr=stds, capsize=4, color=colors)
        for b, m, s in zip(bars, means, stds):
            ax.text(b.get_x() + b.get_width() / 2, m + s + 0.3, f"{m:.1f}", ha="center", va="bottom", fontsize=8)
        lo = min(m - s for m, s in zip(means, stds) if math.isfinite(m))
        ax.set_ylim(max(0, lo - 5), min(100, max(m + s for m, s in zip(means, stds)) + 3))
        ax.set_xticks(range(len(OPTS)), [f"{n}\nlr {sel[ds, n]:g}" for n in OPTS], fontsize=8)
        ax.set(ylabel="test accuracy (%)", title=f"{ds}, {epochs[ds]} epochs, {a.seeds} seeds")
    fig.suptitle("Final test accuracy (mean ± std), lr chosen on a validation split")
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    print(f"wrote {png.with_suffix('.md')} and {png} in {total:.0f} s")


if __name__ == "__main__":
    main()
