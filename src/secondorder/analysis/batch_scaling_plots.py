r"""The figure and the markdown table of a :class:`~secondorder.analysis.batch_scaling.BatchScaling`.

The figure (matplotlib, Agg):

Left: the mean top eigenvalue :math:`\bar\lambda_B` of the mini-batch Hessians +- its standard
error against :math:`B` (log axis), the two :math:`c + a(1/B - 1/n)` fits (intercept free and fixed
at the full-data value) and the full-data eigenvalue as a horizontal line. Right (when learning
rates were measured): the maximal stable learning rate of each optimizer against :math:`B` on
log-log axes with its fitted power :math:`B^p`, and SGD's prediction :math:`2/\bar\lambda_B`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from secondorder.analysis.batch_scaling import BatchScaling

__all__ = ["batch_scaling_table", "plot_batch_scaling"]


def _lr_cell(point: Any) -> str:
    if point.bracketed:
        return f"{point.lr:.3g}"
    return f"> {point.lr:.3g}" if point.lr_diverged == float("inf") else f"< {point.lr_diverged:.3g}"


def _power(fit: Any) -> str:
    return "-" if fit is None else f"{fit.exponent:.2f} ± {fit.exponent_stderr:.2f} (R² {fit.r_squared:.2f})"


def batch_scaling_table(result: BatchScaling) -> str:
    """Markdown: one row per batch size (mean top eigenvalue +- stderr, the two fits' values, the maximal
    stable learning rates and SGD's ``2 / lambda_B``), then the fits' parameters.
    """
    lrs = list(result.lr)
    head = ["B", "batches", "λ_B (mean ± stderr)", "fit, c free", "fit, c = λ_full"]
    head += [f"lr_max {s.optimizer}" for s in lrs] + (["2 / λ_B"] if lrs else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for i, p in enumerate(result.eigenvalues):
        cells = [str(p.batch_size), str(p.num_batches), f"{p.mean:.4g} ± {p.stderr:.2g}",
                 f"{result.fit.predict(p.batch_size):.4g}", f"{result.fit_fixed.predict(p.batch_size):.4g}"]
        cells += [_lr_cell(s.points[i]) for s in lrs] + ([f"{2 / p.mean:.3g}" if p.mean > 0 else "-"] if lrs else [])
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("| full | " + " | ".join([str(result.num_samples) + " samples", f"{result.full:.4g}", "", ""]
                                         + [""] * len(lrs) + ([f"{2 / result.full:.3g}" if result.full > 0 else "-"]
                                                              if lrs else [])) + " |")
    free, fixed = result.fit, result.fit_fixed
    lines += ["", f"Fit λ_B = c + a (1/B - 1/n), n = {result.num_samples}, weights 1/stderr²:", "",
              f"- c free: c = {free.intercept:.4g} ± {free.intercept_stderr:.2g} (full data: {result.full:.4g}, "
              f"z = {result.intercept_z:.2f}), a = {free.slope:.4g} ± {free.slope_stderr:.2g}, "
              f"R² = {free.r_squared:.3f}, χ²/dof = {free.chi2:.3g}/{free.dof}",
              f"- c fixed at λ_full: a = {fixed.slope:.4g} ± {fixed.slope_stderr:.2g}, R² = {fixed.r_squared:.3f}, "
              f"χ²/dof = {fixed.chi2:.3g}/{fixed.dof}"]
    if lrs:
        steps = lrs[0].points[0].steps
        lines += ["", f"Maximal stable learning rate ({steps} steps from the same state; diverged = a non-finite loss "
                      f"or the data-set loss above {lrs[0].points[0].threshold_loss / lrs[0].points[0].initial_loss:g}"
                      " x its initial value); fit lr_max ∝ B^p:", ""]
        lines += [f"- {s.optimizer}: p = {_power(s.fit)} over all B; small B "
                  f"({', '.join(map(str, s.fit_small.batch_sizes)) if s.fit_small else '-'}): {_power(s.fit_small)}"
                  for s in lrs]
    lines += ["", f"{result.num_parameters} parameters, {result.num_matvecs} Hessian-vector products, "
                  f"{result.seconds:.1f} s, seed {result.seed}."]
    return "\n".join(lines)


def plot_batch_scaling(result: BatchScaling, path: str | Path | None = None, title: str | None = None) -> Any:
    """Draw ``result``; save it to ``path`` (PNG by its suffix) if given. Returns the figure (closed when saved)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np

    panels = 2 if result.lr else 1
    fig, axes = plt.subplots(1, panels, figsize=(6.0 * panels, 4.2), squeeze=False)
    ax = axes[0][0]
    sizes = [p.batch_size for p in result.eigenvalues]
    ax.errorbar(sizes, [p.mean for p in result.eigenvalues], yerr=[p.stderr for p in result.eigenvalues],
                fmt="o", color="C0", capsize=3, label=f"mini-batch mean ± stderr ({result.eigenvalues[0].num_batches} "
                                                     "batches)")
    grid = np.geomspace(min(sizes), max(sizes), 200)
    free, fixed = result.fit, result.fit_fixed
    ax.plot(grid, [free.predict(b) for b in grid], "-", color="C1",
            label=f"fit c + a(1/B - 1/n): c = {free.intercept:.4g}, a = {free.slope:.3g}, R² = {free.r_squared:.3f}")
    ax.plot(grid, [fixed.predict(b) for b in grid], "--", color="C2",
            label=f"c fixed at full: a = {fixed.slope:.3g}, R² = {fixed.r_squared:.3f}")
    ax.axhline(result.full, color="gray", ls=":", lw=1, label=f"full data ({result.num_samples}): {result.full:.4g}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size B")
    ax.set_ylabel("top Hessian eigenvalue")
    ax.legend(fontsize=7)
    ax.set_title("top eigenvalue of the mini-batch Hessian", fontsize=10)
    if result.lr:
        ax = axes[0][1]
        for i, s in enumerate(result.lr):
            good = [p for p in s.points if p.bracketed]
            if not good:
                continue
            label = s.optimizer if s.fit is None else f"{s.optimizer}: p = {s.fit.exponent:.2f}"
            if s.fit_small is not None:
                label += f" (small B: {s.fit_small.exponent:.2f})"
            ax.plot([p.batch_size for p in good], [p.lr for p in good], "o", color=f"C{i}", label=label)
            if s.fit is not None:
                ax.plot(grid, [s.fit.predict(b) for b in grid], "-", color=f"C{i}", lw=1)
            if s.fit_small is not None:
                small = np.geomspace(min(s.fit_small.batch_sizes), max(s.fit_small.batch_sizes), 50)
                ax.plot(small, [s.fit_small.predict(b) for b in small], ":", color=f"C{i}", lw=1.5)
        if any(s.optimizer == "sgd" for s in result.lr) and all(p.mean > 0 for p in result.eigenvalues):
            ax.plot(sizes, [2 / p.mean for p in result.eigenvalues], "x--", color="gray", lw=0.8,
                    label="2 / mean top eigenvalue (SGD's edge)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size B")
        ax.set_ylabel("max stable learning rate")
        ax.legend(fontsize=7)
        ax.set_title(f"max stable lr ({result.lr[0].points[0].steps} steps; lines: fits over all B, "
                     "dotted: small B)", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
        plt.close(fig)
    return fig
