"""The report's figures, each a function ``(result, path)`` writing one PNG (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from secondorder.analysis.evolution import EvolutionPoint
from secondorder.analysis.hessian_report import HessianAnalysis
from secondorder.analysis.landscape import Landscape1D, Landscape2D

__all__ = ["plot_convergence", "plot_density", "plot_evolution", "plot_landscape_1d", "plot_landscape_2d",
           "plot_layers"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> None:
    fig.savefig(path, dpi=110, bbox_inches="tight")
    _pyplot().close(fig)


def plot_density(analysis: HessianAnalysis, path: str | Path) -> None:
    """The SLQ spectral density on a log scale (Ghorbani et al. 2019), with the top eigenvalues marked."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4))
    analysis.density.plot(ax=ax)
    top = analysis.top.eigenvalues.tolist()
    for value in top:
        ax.axvline(value, color="tab:red", lw=0.8, ls=":")
    ax.set_title(f"{analysis.curvature} spectral density (SLQ); dotted: top-{len(top)} (Lanczos)")
    _save(fig, path)


def plot_layers(analysis: HessianAnalysis, path: str | Path) -> None:
    """Per-layer trace (with 2 standard errors) and top eigenvalue, as horizontal bars."""
    plt = _pyplot()
    layers = analysis.layers
    names = [layer.name for layer in layers]
    fig, axes = plt.subplots(1, 3, figsize=(12, 0.45 * len(layers) + 1.6), sharey=True)
    axes[0].barh(names, [x.trace for x in layers], xerr=[2 * x.trace_stderr for x in layers], color="tab:blue")
    axes[0].set_title("trace (±2 stderr)")
    axes[1].barh(names, [x.trace_per_parameter for x in layers], color="tab:green")
    axes[1].set_title("trace / #parameters (HAWQ-V2)")
    axes[2].barh(names, [x.top_eigenvalue for x in layers], color="tab:orange")
    axes[2].set_title("top eigenvalue (HAWQ-V1)")
    axes[0].invert_yaxis()
    for ax in axes:
        ax.axvline(0, color="k", lw=0.5)
    _save(fig, path)


def plot_landscape_1d(landscapes: Sequence[tuple[str, Landscape1D]], path: str | Path) -> None:
    """1-D loss curves, one panel per landscape (e.g. one per model), one line per direction."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(landscapes), figsize=(5 * len(landscapes), 3.6), squeeze=False)
    for ax, (title, land) in zip(axes[0], landscapes):
        for name, losses in zip(land.names, land.losses):
            ax.plot(land.alphas, losses, label=f"{name} (fit curvature {land.sharpness(name):.3g})")
        ax.set_xlabel("alpha (step along a unit direction)")
        ax.set_ylabel("loss")
        ax.set_title(title)
        ax.legend(fontsize=8)
    _save(fig, path)


def plot_landscape_2d(land: Landscape2D, path: str | Path) -> None:
    """Contours of the loss on the plane of two directions."""
    import numpy as np

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 4.4))
    losses = np.array(land.losses, dtype=float)
    finite = np.isfinite(losses)
    losses = np.where(finite, losses, np.nanmax(np.where(finite, losses, np.nan)))
    cs = ax.contourf(land.betas, land.alphas, losses, levels=30, cmap="viridis")
    fig.colorbar(cs, ax=ax, label="loss")
    ax.plot([0], [0], "r+", ms=12)
    ax.set_xlabel(f"beta ({land.names[1]})")
    ax.set_ylabel(f"alpha ({land.names[0]})")
    ax.set_title("loss surface")
    _save(fig, path)


def plot_convergence(analysis: HessianAnalysis, path: str | Path) -> None:
    """Lanczos residual ``||Cv - theta v||`` of every wanted eigenvalue against the check index."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for label, eig in (("top", analysis.top), ("bottom", analysis.bottom)):
        if eig is None or not eig.residual_history:
            continue
        for i in range(len(eig.residual_history[0])):
            ax.semilogy([max(h[i], 1e-300) for h in eig.residual_history], label=f"{label} {i + 1}")
    ax.set_xlabel("convergence check (Lanczos step)")
    ax.set_ylabel("residual")
    ax.set_title("eigenvalue convergence")
    ax.legend(fontsize=7, ncol=2)
    _save(fig, path)


def plot_evolution(points: Sequence[EvolutionPoint], path: str | Path) -> None:
    """Top eigenvalue and trace (±2 stderr) against the training step, with the stability bounds
    of the learning rate as dashed lines when they were recorded, and the preconditioned
    sharpness against its bound in a third panel for adaptive optimizers.
    """
    plt = _pyplot()
    checked = [(p.step, p.stability) for p in points if p.stability is not None]
    preconditioned = [(step, c.rule, c.preconditioned) for step, c in checked if c.preconditioned is not None]
    fig, axes = plt.subplots(1, 3 if preconditioned else 2, figsize=(15 if preconditioned else 10, 3.6))
    steps = [p.step for p in points]
    axes[0].plot(steps, [p.top_eigenvalue for p in points], "o-", label="λ_max(H)")
    axes[0].set_title("top eigenvalue")
    axes[1].errorbar(steps, [p.trace for p in points], yerr=[2 * p.trace_stderr for p in points], fmt="o-",
                     label="tr(H)")
    axes[1].set_title("trace (±2 stderr)")
    if checked:
        rule = "gd" if preconditioned else checked[-1][1].rule
        axes[0].step([t for t, _ in checked], [c.sharpness.threshold for _, c in checked], "k--", where="post",
                     label=f"{rule} bound at the lr")
        traced = [(t, c.trace.threshold) for t, c in checked if c.trace is not None]
        if traced:
            axes[1].step([t for t, _ in traced], [b for _, b in traced], "k--", where="post", label="SGD bound on tr(H)")
    if preconditioned:
        ax = axes[2]
        ax.plot([t for t, _, _ in preconditioned], [c.value for _, _, c in preconditioned], "o-", label="λ_max(P⁻¹H)")
        ax.step([t for t, _, _ in preconditioned], [c.threshold for _, _, c in preconditioned], "k--", where="post",
                label=f"{preconditioned[-1][1]} bound")
        ax.set_title("preconditioned sharpness")
    for ax in axes:
        ax.set_xlabel("training step")
        if checked:
            ax.legend(fontsize=7)
    _save(fig, path)
