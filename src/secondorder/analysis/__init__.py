"""The Hessian report of a trained network: spectrum, per-layer sensitivity, loss landscape, evolution,
linear stability at the training learning rate, and the batch-size scaling of the sharpness.

``analyze`` is the API behind ``secondorder analyze``; ``write_report`` turns its result into
``report.html`` / ``report.md`` / ``summary.json`` and PNGs.
"""

from secondorder.analysis.batch_scaling import (
    BatchEigenvalue,
    BatchScaling,
    InverseBatchFit,
    LRScaling,
    PowerLawFit,
    StableLR,
    batch_scaling,
    fit_inverse_batch,
    fit_power_law,
    lr_scaling,
    max_stable_lr,
)
from secondorder.analysis.batch_scaling_plots import batch_scaling_table, plot_batch_scaling
from secondorder.analysis.evolution import EvolutionPoint, HessianTracker, hessian_evolution
from secondorder.analysis.hessian_report import HessianAnalysis, LayerStats, analyze
from secondorder.analysis.landscape import Landscape1D, Landscape2D, landscape_1d, landscape_2d, random_directions
from secondorder.analysis.report import summary_table, write_report
from secondorder.analysis.stability import (
    BoundCheck,
    Preconditioner,
    StabilityCheck,
    optimizer_preconditioner,
    preconditioned_top,
    stability_check,
)

__all__ = [
    "BatchEigenvalue",
    "BatchScaling",
    "BoundCheck",
    "EvolutionPoint",
    "HessianAnalysis",
    "HessianTracker",
    "InverseBatchFit",
    "LRScaling",
    "Landscape1D",
    "Landscape2D",
    "LayerStats",
    "PowerLawFit",
    "Preconditioner",
    "StabilityCheck",
    "StableLR",
    "analyze",
    "batch_scaling",
    "batch_scaling_table",
    "fit_inverse_batch",
    "fit_power_law",
    "hessian_evolution",
    "landscape_1d",
    "landscape_2d",
    "lr_scaling",
    "max_stable_lr",
    "optimizer_preconditioner",
    "plot_batch_scaling",
    "preconditioned_top",
    "random_directions",
    "stability_check",
    "summary_table",
    "write_report",
]
