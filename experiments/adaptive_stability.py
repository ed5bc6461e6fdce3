r"""Adaptive edge of stability on MNIST-1D (issue 18): full-batch Adam's preconditioned sharpness.

The claim (Cohen et al., "Adaptive gradient methods at the edge of stability", 2022): full-batch
Adam with learning rate :math:`\eta` and :math:`\beta_1` trains with its **preconditioned**
sharpness :math:`\lambda_{\max}(P^{-1}H)` rising to and hovering at the bound
:math:`(2+2\beta_1)/((1-\beta_1)\eta)` (38/η at :math:`\beta_1 = 0.9`), while the raw sharpness
:math:`\lambda_{\max}(H)` is free to grow far past GD's 2/η.

Protocol: the MLP of ``stability.py`` (40-64-64-10, tanh) on the 4,000 MNIST-1D training samples,
full-batch ``torch.optim.Adam`` (betas 0.9, 0.999, eps 1e-8) at each ``lr``, ``--steps`` steps from
seed 0; :class:`~secondorder.analysis.HessianTracker` with ``optimizer=adam`` every ``--every``
steps reads Adam's live state (:math:`P = (1-\beta_1^t)(\sqrt{v_t/(1-\beta_2^t)} + \epsilon)`) and
records :math:`\lambda_{\max}(H)`, :math:`\lambda_{\max}(P^{-1}H)` and the verdicts.
Writes ``experiments/results/adaptive_stability.md`` and ``.png``.

    OMP_NUM_THREADS=1 .venv/bin/python experiments/adaptive_stability.py --quiet   # about 4 minutes on 1 core
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from common import machine_line, write_markdown
from stability import make_model
from tqdm import tqdm

from secondorder.analysis import HessianTracker
from secondorder.datasets import load_mnist1d

LRS = (1e-3, 3e-3, 1e-2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--every", type=int, default=25)
    ap.add_argument("--out", default="experiments/results/adaptive_stability")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    X, y = load_mnist1d()[:2]
    curves = {}
    for lr in LRS:
        model = make_model(0)
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        tracker = HessianTracker(F.cross_entropy, (X, y), optimizer=opt, trace_matvecs=6, every=args.every)
        for step in tqdm(range(1, args.steps + 1), desc=f"Adam lr {lr}", disable=args.quiet, leave=False):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(X), y).backward()
            opt.step()
            tracker(step, model)
        curves[lr] = tracker.points
    lines = ["# Adaptive edge of stability: full-batch Adam's preconditioned sharpness (MNIST-1D)", "",
             machine_line(), "",
             f"MLP 40-64-64-10 (tanh), 4000 samples, full-batch Adam, {args.steps} steps, seed 0, records every "
             f"{args.every} steps. λ_max(P⁻¹H) against 38/lr (λ_max(H) against GD's 2/lr for reference): its peak, "
             "how many records lie within [0.8, 1.1] of the bound (the edge), and its value at the end.", "",
             "| lr | 38/lr | peak λ_max(P⁻¹H) (ratio) | records at the edge | final λ_max(P⁻¹H) (ratio) | "
             "peak λ_max(H) | 2/lr | final loss |",
             "|---|---|---|---|---|---|---|---|"]
    for lr, points in curves.items():
        pre = [p.stability.preconditioned.value for p in points]
        bound = points[-1].stability.preconditioned.threshold
        edge = sum(0.8 <= v / bound <= 1.1 for v in pre)
        lines.append(f"| {lr:g} | {bound:.4g} | {max(pre):.4g} ({max(pre) / bound:.2f}) | {edge} of {len(pre)} | "
                     f"{pre[-1]:.4g} ({pre[-1] / bound:.2f}) | {max(p.top_eigenvalue for p in points):.4g} | "
                     f"{2 / lr:.4g} | {points[-1].loss:.3g} |")
    lines += ["", f"Total {time.perf_counter() - start:.0f} s.", ""]
    png, plt = write_markdown(lines, args.out)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for i, (lr, points) in enumerate(curves.items()):
        c = f"C{i}"
        steps = [p.step for p in points]
        axes[0].semilogy(steps, [p.stability.preconditioned.value for p in points], color=c, label=f"lr {lr:g}")
        axes[0].axhline(38 / lr, color=c, ls="--", lw=0.8)
        axes[1].semilogy(steps, [p.top_eigenvalue for p in points], color=c, label=f"lr {lr:g}")
        axes[1].axhline(2 / lr, color=c, ls="--", lw=0.8)
    axes[0].set_title("λ_max(P⁻¹H) (dashed: 38/lr)")
    axes[1].set_title("λ_max(H) (dashed: GD's 2/lr)")
    for ax in axes:
        ax.set_xlabel("Adam step")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    print(f"wrote {args.out}.md and {png}")


if __name__ == "__main__":
    main()
