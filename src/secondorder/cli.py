"""The ``secondorder`` command line.

``secondorder summary`` trains the embedded default problem (a small tanh MLP on a synthetic
Gaussian-mixture classification set, see :mod:`secondorder.datasets.default`) and prints the
Hessian summary of its data-set loss: the trace with its standard error (Hutch++), the top-k
eigenvalues with their certified residuals (thick-restart Lanczos), per-layer traces, and a
spectral-density plot (stochastic Lanczos quadrature).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

from secondorder.datasets import default_problem
from secondorder.linalg import eigenvalues, spectral_density, trace
from secondorder.operators import GGNOperator, HessianOperator

EPILOG = """\
examples:
  secondorder summary                       Hessian summary of the embedded default model
  secondorder summary --top-k 10 --probes 90 --out results/
  secondorder summary --curvature ggn --json    Gauss-Newton instead; JSON on stdout

what the numbers mean:
  trace      Hutch++ estimate of tr(H) with its standard error and a 95% interval
  top-k      largest (algebraic) eigenvalues; 'residual' = ||Hv - lambda v|| certifies each
  per-layer  trace of each layer's diagonal block, from the same probes
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="secondorder",
        description="Second-order analysis of PyTorch models: Hessian traces, spectra and densities.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    summary = sub.add_parser(
        "summary",
        help="Hessian summary (trace, top eigenvalues, spectral density) of the embedded default model",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__.split("\n\n")[1],
        epilog=EPILOG,
    )
    summary.add_argument("--curvature", choices=["hessian", "ggn"], default="hessian",
                         help="Hessian or generalized Gauss-Newton matrix (default: hessian)")
    summary.add_argument("--probes", type=int, default=90, help="matvec budget of the trace estimate (default: 90)")
    summary.add_argument("--top-k", type=int, default=5, help="number of top eigenvalues (default: 5)")
    summary.add_argument("--slq-probes", type=int, default=8, help="probes of the spectral density (default: 8)")
    summary.add_argument("--slq-steps", type=int, default=80, help="Lanczos steps per density probe (default: 80)")
    summary.add_argument("--seed", type=int, default=0, help="seed of the model, the data and the probes (default: 0)")
    summary.add_argument("--out", type=Path, default=Path("secondorder-out"),
                         help="directory for spectral_density.png and summary.json (default: ./secondorder-out)")
    summary.add_argument("--json", action="store_true", help="print the summary as JSON instead of a table")
    summary.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def _summary(args: argparse.Namespace) -> dict:
    for name in ("probes", "top_k", "slq_probes", "slq_steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    stages = tqdm(total=4, disable=args.quiet, desc="summary", unit="stage", file=sys.stderr)
    stages.set_postfix_str("training the default model")
    problem = default_problem(args.seed)
    stages.update()
    operator = (HessianOperator if args.curvature == "hessian" else GGNOperator)(
        problem.model, problem.loss_fn, problem.data, seed=args.seed
    )
    stages.set_postfix_str("trace")
    tr = trace(operator, args.probes, seed=args.seed, progress=not args.quiet)
    stages.update()
    stages.set_postfix_str("top eigenvalues")
    eig = eigenvalues(operator, args.top_k, seed=args.seed, progress=not args.quiet)
    stages.update()
    stages.set_postfix_str("spectral density")
    density = spectral_density(operator, args.slq_probes, args.slq_steps, seed=args.seed, progress=not args.quiet)
    stages.update()
    stages.close()
    with torch.no_grad():
        n = sum(len(y) for _, y in problem.data)
        loss = sum(float(problem.loss_fn(problem.model(X), y)) * len(y) for X, y in problem.data) / n
    low, high = tr.confidence_interval(0.95)
    return {
        "curvature": args.curvature,
        "model": str(problem.model).replace("\n", " "),
        "num_parameters": operator.shape[0],
        "num_samples": n,
        "loss": loss,
        "trace": {"value": tr.value, "stderr": tr.stderr, "ci95": [low, high], "method": tr.method,
                  "num_matvecs": tr.num_matvecs},
        "top_eigenvalues": [
            {"value": float(v), "residual": float(r), "converged": bool(c)}
            for v, r, c in zip(eig.eigenvalues, eig.residuals, eig.converged)
        ],
        "eigen_num_matvecs": eig.num_matvecs,
        "layers": [{"name": b.name, "size": b.size, "trace": b.value, "stderr": b.stderr} for b in tr.blocks],
        "density": {"num_probes": args.slq_probes, "num_steps": density.nodes.shape[1],
                    "trace_estimate": density.trace()[0]},
    }, density


def _print_table(s: dict, out: Path) -> None:
    t = s["trace"]
    print(f"secondorder summary: {s['curvature']} of the default model ({s['num_parameters']} parameters, "
          f"{s['num_samples']} samples, loss {s['loss']:.4g})")
    print(f"  trace     {t['value']:.6g} +- {t['stderr']:.2g} (95% CI [{t['ci95'][0]:.6g}, {t['ci95'][1]:.6g}], "
          f"{t['method']}, {t['num_matvecs']} matvecs)")
    print(f"  top-{len(s['top_eigenvalues'])} eigenvalues ({s['eigen_num_matvecs']} matvecs, thick-restart Lanczos):")
    for i, e in enumerate(s["top_eigenvalues"], 1):
        flag = "" if e["converged"] else "  (not converged)"
        print(f"    {i}. {e['value']:.8g}   residual {e['residual']:.1e}{flag}")
    print("  per-layer trace:")
    for layer in s["layers"]:
        print(f"    {layer['name']:<10} {layer['trace']:.6g} +- {layer['stderr']:.2g}  ({layer['size']} parameters)")
    print(f"  spectral density: {out / 'spectral_density.png'}   summary: {out / 'summary.json'}")


def _write(out: Path, summary: dict, density) -> None:
    """Write into a temporary directory and move it into place: never a half-written output."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        density.plot(tmp / "spectral_density.png")
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2))
        if out.exists():
            if not out.is_dir():
                raise ValueError(f"--out {out} exists and is not a directory")
            for item in tmp.iterdir():
                item.replace(out / item.name)
            tmp.rmdir()
        else:
            tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``secondorder`` command."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    start = time.perf_counter()
    try:
        summary, density = _summary(args)
        summary["seconds"] = time.perf_counter() - start
        _write(args.out, summary, density)
    except (ValueError, OSError) as err:
        print(f"secondorder: error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        _print_table(summary, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
