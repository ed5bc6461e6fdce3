"""The Hessian report of a trained network: spectrum, per-layer sensitivity, loss landscape, evolution.

``analyze`` is the API behind ``secondorder analyze``; ``write_report`` turns its result into
``report.html`` / ``report.md`` / ``summary.json`` and PNGs.
"""

from secondorder.analysis.evolution import EvolutionPoint, HessianTracker, hessian_evolution
from secondorder.analysis.hessian_report import HessianAnalysis, LayerStats, analyze
from secondorder.analysis.landscape import Landscape1D, Landscape2D, landscape_1d, landscape_2d, random_directions
from secondorder.analysis.report import summary_table, write_report

__all__ = [
    "EvolutionPoint",
    "HessianAnalysis",
    "HessianTracker",
    "Landscape1D",
    "Landscape2D",
    "LayerStats",
    "analyze",
    "hessian_evolution",
    "landscape_1d",
    "landscape_2d",
    "random_directions",
    "summary_table",
    "write_report",
]
