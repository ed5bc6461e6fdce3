"""Writing the report: ``report.html`` (self-contained, images embedded), ``report.md``, ``summary.json`` and PNGs.

The files go straight into the directory given; the ``secondorder`` command writes into a
temporary one and moves it into place when complete (:func:`secondorder.cli.common.atomic_directory`).
"""

from __future__ import annotations

import base64
import html
import json
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

from secondorder.analysis import plots
from secondorder.analysis.evolution import EvolutionPoint
from secondorder.analysis.hessian_report import HessianAnalysis
from secondorder.analysis.kfac_comparison import KFACComparison
from secondorder.analysis.stability import BoundCheck, StabilityCheck

__all__ = ["summary_table", "write_report"]

Table = tuple[list[str], list[list[str]]]


def _g(x: float, digits: int = 6) -> str:
    return f"{x:.{digits}g}"


def _tables(a: HessianAnalysis, evolution: Sequence[EvolutionPoint] | None) -> list[tuple[str, Table]]:
    t = a.trace
    low, high = t.confidence_interval(0.95)
    top = a.top.eigenvalues.tolist()
    tables = [("Summary", (["quantity", "value"], [
        ["curvature", "ggn, compared with its K-FAC" if a.curvature == "kfac" else a.curvature],
        ["parameters", str(a.num_parameters)],
        ["samples", str(a.num_samples)],
        ["loss", _g(a.loss)],
        ["gradient norm", _g(a.gradient_norm, 3)],
        ["trace", f"{_g(t.value)} ± {_g(t.stderr, 2)} (95% CI [{_g(low)}, {_g(high)}]; {t.method}, "
                  f"{t.num_matvecs} products)"],
        ["top eigenvalue", f"{_g(top[0], 8)} (residual {float(a.top.residuals[0]):.1e})"],
        ["λ_max / mean eigenvalue (tr/P)",
         _g(top[0] / (t.value / a.num_parameters), 3) if t.value > 0 else "n/a (trace ≤ 0)"],
        ["Hessian-vector products", str(a.num_matvecs)],
        ["seconds", f"{a.seconds:.1f}"],
    ]))]
    for eig in (a.top, a.bottom):
        if eig is not None:
            rows = [[str(i + 1), _g(v, 8), f"{r:.1e}", "yes" if c else "NO"]
                    for i, (v, r, c) in enumerate(zip(eig.eigenvalues.tolist(), eig.residuals.tolist(), eig.converged.tolist()))]
            tables.append((f"{'Top' if eig.which == 'largest' else 'Bottom'} eigenvalues "
                           f"(thick-restart Lanczos, {eig.num_matvecs} products)",
                           (["#", "eigenvalue", "residual ‖Cv − θv‖", "converged"], rows)))
    tables.append(("Per layer (diagonal blocks; trace from the same probes)", (
        ["layer", "parameters", "trace ± stderr", "trace / parameter", "top eigenvalue", "residual"],
        [[x.name, str(x.size), f"{_g(x.trace, 4)} ± {_g(x.trace_stderr, 2)}", _g(x.trace_per_parameter, 3),
          _g(x.top_eigenvalue, 5), f"{x.top_residual:.1e}" + ("" if x.top_converged else " (not converged)")]
         for x in a.layers])))
    if a.stability is not None:
        tables.append(_stability_table(a.stability))
    if a.kfac is not None:
        tables += _kfac_tables(a.kfac)
    if a.landscape_1d is not None:
        land = a.landscape_1d
        tables.append(("1-D landscape (quadratic-fit curvature of the loss along each unit direction)", (
            ["direction", "fit curvature", "loss at ±radius"],
            [[n, _g(land.sharpness(n), 4), f"{_g(ls[0], 4)} / {_g(ls[-1], 4)}"]
             for n, ls in zip(land.names, land.losses)])))
    if evolution:
        checked = any(p.stability is not None for p in evolution)
        tables.append(("Evolution over training", (
            ["step", "loss", "top eigenvalue", "trace ± stderr"] + (["bound", "verdict"] if checked else []),
            [[str(p.step), _g(p.loss, 4), _g(p.top_eigenvalue, 5), f"{_g(p.trace, 4)} ± {_g(p.trace_stderr, 2)}"]
             + (_evolution_verdict(p) if checked else []) for p in evolution])))
    return tables


STABILITY_TITLE = "Linear stability at the training learning rate"


def _stability_table(s: StabilityCheck) -> tuple[str, Table]:
    def row(c: BoundCheck, interval: str) -> list[str]:
        return [c.quantity, f"{_g(c.value, 6)} ({interval} [{_g(c.low, 6)}, {_g(c.high, 6)}])", _g(c.threshold, 6),
                _g(c.ratio, 3), c.verdict]

    rows = [row(s.sharpness, "Ritz value, + residual")]
    if s.trace is not None:
        rows.append(row(s.trace, "95% CI"))
    if s.preconditioned is not None:
        rows.append(row(s.preconditioned, "Ritz value, + residual"))
    title = f"{STABILITY_TITLE} ({s.rule}, lr {_g(s.lr, 4)}, momentum {_g(s.momentum, 4)})"
    return title, (["quantity", "value", "bound", "value / bound", "verdict"], rows)


def _evolution_verdict(p: EvolutionPoint) -> list[str]:
    if p.stability is None:
        return ["", ""]
    c = p.stability.preconditioned or p.stability.sharpness
    return [f"{c.quantity} ≤ {_g(c.threshold, 4)}", f"{c.verdict} ({_g(c.ratio, 3)})"]


KFAC_TITLE = "K-FAC against the Gauss-Newton matrix"


def _kfac_tables(c: KFACComparison) -> list[tuple[str, Table]]:
    rows = [["trace", _g(c.trace), f"{_g(c.ggn_trace)} ± {_g(c.ggn_trace_stderr, 2)}"]]
    rows += [[f"eigenvalue {i + 1}", _g(k, 8), _g(g, 8)] for i, (k, g) in enumerate(zip(c.top, c.ggn_top))]
    rows.append(["‖G − K‖_F / ‖G‖_F", f"{_g(c.distance, 4)} ± {_g(c.distance_stderr, 2)} ({c.num_probes} probes)", ""])
    layers = [[x.name, str(x.size), _g(x.trace, 5), f"{_g(x.ggn_trace, 5)} ± {_g(x.ggn_trace_stderr, 2)}",
               _g(x.top_eigenvalue, 5), _g(x.ggn_top_eigenvalue, 5)] for x in c.layers]
    return [(f"{KFAC_TITLE} (K-FAC exact from its factors; GGN by Hutch++ and Lanczos)",
             (["quantity", "K-FAC", "GGN"], rows)),
            ("K-FAC per layer", (["layer", "parameters", "K-FAC trace", "GGN trace ± stderr", "K-FAC top eigenvalue",
                                  "GGN top eigenvalue"], layers))]


def summary_table(analysis: HessianAnalysis) -> str:
    """The summary and eigenvalue tables (and K-FAC's comparison) as plain text, for the terminal."""
    lines = []
    tables = _tables(analysis, None)
    wanted = (KFAC_TITLE, STABILITY_TITLE)
    for title, (head, rows) in tables[:3] + [t for t in tables if t[0].startswith(wanted)]:
        lines.append(title)
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        for r in rows:
            lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return "\n".join(lines)


def _figures(a: HessianAnalysis, evolution: Sequence[EvolutionPoint] | None, tmp: Path) -> list[tuple[str, str]]:
    figs = [("density.png", "Spectral density"), ("layers.png", "Per-layer sensitivity"),
            ("convergence.png", "Eigenvalue convergence")]
    plots.plot_density(a, tmp / "density.png")
    plots.plot_layers(a, tmp / "layers.png")
    plots.plot_convergence(a, tmp / "convergence.png")
    if a.landscape_1d is not None:
        plots.plot_landscape_1d([("loss along unit directions", a.landscape_1d)], tmp / "landscape_1d.png")
        figs.append(("landscape_1d.png", "1-D loss landscape"))
    if a.landscape_2d is not None:
        plots.plot_landscape_2d(a.landscape_2d, tmp / "landscape_2d.png")
        figs.append(("landscape_2d.png", "2-D loss landscape"))
    if evolution:
        plots.plot_evolution(evolution, tmp / "evolution.png")
        figs.append(("evolution.png", "Evolution over training"))
    return figs


def _markdown(title: str, context: dict, tables, figs) -> str:
    out = [f"# {title}", ""]
    out += [f"- **{k}**: {v}" for k, v in context.items()] + [""]
    for name, (head, rows) in tables:
        out += [f"## {name}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        out += ["| " + " | ".join(r) + " |" for r in rows] + [""]
    out += ["## Figures", ""] + [f"### {caption}\n\n![{caption}]({name})\n" for name, caption in figs]
    return "\n".join(out)


def _html(title: str, context: dict, tables, figs, tmp: Path) -> str:
    e = html.escape
    body = [f"<h1>{e(title)}</h1>", "<ul>"] + [f"<li><b>{e(k)}</b>: {e(str(v))}</li>" for k, v in context.items()]
    body.append("</ul>")
    for name, (head, rows) in tables:
        body.append(f"<h2>{e(name)}</h2><table><tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr>")
        body += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in rows]
        body.append("</table>")
    body.append("<h2>Figures</h2>")
    for name, caption in figs:
        data = base64.b64encode((tmp / name).read_bytes()).decode()
        body.append(f"<figure><img alt='{e(caption)}' src='data:image/png;base64,{data}'>"
                    f"<figcaption>{e(caption)}</figcaption></figure>")
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;"
             "text-align:left}th{background:#f3f3f3}img{max-width:100%}figure{margin:1.5em 0}")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{e(title)}</title>"
            f"<style>{style}</style></head><body>{''.join(body)}</body></html>")


def write_report(analysis: HessianAnalysis, out: str | Path, title: str = "Hessian analysis",
                 context: dict | None = None, evolution: Sequence[EvolutionPoint] | None = None) -> dict:
    """Write the report's files into the directory ``out`` (created if missing; files of the same names
    are replaced); returns the summary.

    ``summary.json`` (the returned dict) holds the analysis (:meth:`HessianAnalysis.to_dict`,
    loadable with :meth:`HessianAnalysis.from_dict` from its ``"analysis"`` entry), the context
    and the evolution.
    """
    context = dict(context or {})
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tables = _tables(analysis, evolution)
    figs = _figures(analysis, evolution, out)
    summary = {"context": context, "analysis": analysis.to_dict(), "evolution": [asdict(p) for p in evolution or ()]}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "report.md").write_text(_markdown(title, context, tables, figs))
    (out / "report.html").write_text(_html(title, context, tables, figs, out))
    return summary
