"""The ``secondorder`` command line: ``secondorder analyze`` writes the Hessian report of a network.

With no arguments it trains the embedded default (a small 1-D CNN on MNIST-1D, generated
offline by the ``mnist1d`` package, 20 epochs of SGD, recording the Hessian's evolution on the
way) and analyzes it. With ``--model`` and ``--data`` it analyzes your own network.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from secondorder.analysis import HessianTracker, analyze, hessian_evolution, summary_table, write_report
from secondorder.environment import describe

EPILOG = """\
examples:
  secondorder analyze                                   train the MNIST-1D default, write ./secondorder-out/
  secondorder analyze --model mypkg.nets:make_net --checkpoint net.pt \\
                      --data mypkg.data:val_batches --loss cross_entropy --out report/
  secondorder analyze --checkpoint ep1.pt --checkpoint ep10.pt ...   evolution over checkpoints
  secondorder analyze --params conv1,fc --curvature ggn --json       some layers, Gauss-Newton, JSON on stdout

factories: MODULE:NAME is imported (the current directory is on the path) and called with no
arguments. --model's returns an nn.Module; --data's returns one (inputs, targets) batch or a
re-iterable of batches (a list, a DataLoader). --loss MODULE:NAME is used as loss(outputs, targets)
and must return the batch's mean loss.

what the report holds (report.html, self-contained; report.md; summary.json; PNGs):
  trace        Hutch++ estimate of tr(H) with its standard error and 95% interval
  eigenvalues  top-k / bottom-k by thick-restart Lanczos; the residual ||Hv - theta v|| bounds each error
  density      spectral density by stochastic Lanczos quadrature (log scale)
  per layer    trace, trace per parameter (HAWQ-V2) and top eigenvalue (HAWQ-V1) of each layer's block
  landscape    loss along the top eigenvector vs a random unit direction (1-D), and on the plane of
               the top two eigenvectors (2-D), as in Yao et al. (NeurIPS 2018)
  evolution    top eigenvalue and trace over training (default model, or several --checkpoint)
exit status: 0 on success, 2 on bad input (one line on stderr naming the cause; nothing written).
"""

LOSSES: dict[str, Callable] = {
    "cross_entropy": F.cross_entropy,
    "mse": F.mse_loss,
    "bce": F.binary_cross_entropy_with_logits,  # on logits, the usual case
}
EVOLUTION_EPOCHS = (0, 1, 2, 5, 10, 20)


class UsageError(ValueError):
    """Bad input: reported in one line, exit status 2."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="secondorder", description="Second-order analysis of PyTorch models.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    a = sub.add_parser("analyze", help="Hessian report of a trained network (default: MNIST-1D CNN)",
                       description=__doc__.split("\n\n")[1], epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    own = a.add_argument_group("your model (all optional: without --model the default is trained)")
    own.add_argument("--model", metavar="MODULE:FACTORY", help="factory returning the nn.Module")
    own.add_argument("--checkpoint", metavar="PATH", action="append", default=[],
                     help="state_dict to load (repeat for the evolution over checkpoints; the last is analyzed)")
    own.add_argument("--data", metavar="MODULE:FACTORY", help="factory returning a batch or batches")
    own.add_argument("--loss", default="cross_entropy",
                     help="cross_entropy | mse | bce (with logits) | MODULE:NAME (default: cross_entropy)")
    own.add_argument("--params", metavar="NAMES", help="comma-separated parameter names or module prefixes")
    own.add_argument("--device", default="cpu", help="torch device, e.g. cuda (default: cpu)")
    est = a.add_argument_group("estimators")
    est.add_argument("--curvature", choices=["hessian", "ggn"], default="hessian", help="(default: hessian)")
    est.add_argument("--top-k", type=int, default=5, help="top eigenvalues (default: 5)")
    est.add_argument("--bottom-k", type=int, default=1, help="bottom eigenvalues, 0 for none (default: 1)")
    est.add_argument("--probes", type=int, default=90, help="Hutch++ products for the trace (default: 90)")
    est.add_argument("--slq-probes", type=int, default=4, help="spectral-density probes (default: 4)")
    est.add_argument("--slq-steps", type=int, default=64, help="Lanczos steps per density probe (default: 64)")
    est.add_argument("--max-matvecs", type=int, default=300, help="cap per Lanczos run (default: 300)")
    est.add_argument("--landscape-radius", type=float, default=1.0, help="alpha range of landscapes (default: 1)")
    est.add_argument("--no-landscape", action="store_true", help="skip the loss landscapes")
    est.add_argument("--epochs", type=int, default=20, help="training epochs of the default model (default: 20)")
    est.add_argument("--seed", type=int, default=0, help="seed of training (default model) and probes (default: 0)")
    out = a.add_argument_group("output")
    out.add_argument("--out", type=Path, default=Path("secondorder-out"), help="directory (default: ./secondorder-out)")
    out.add_argument("--json", action="store_true", help="print summary.json to stdout instead of the table")
    out.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def _load(spec: str, option: str) -> Any:
    """``MODULE:NAME`` imported from the current directory or the installed packages."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise UsageError(f"{option} must look like MODULE:NAME, got {spec!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as err:
        raise UsageError(f"{option} {spec}: cannot import {module_name!r} ({type(err).__name__}: {err})") from err
    if not hasattr(module, attr):
        raise UsageError(f"{option} {spec}: module {module_name!r} has no attribute {attr!r}")
    return getattr(module, attr)


def _call_factory(spec: str, option: str) -> Any:
    try:
        return _load(spec, option)()
    except UsageError:
        raise
    except Exception as err:
        raise UsageError(f"{option} {spec} failed: {type(err).__name__}: {err}") from err


def _load_checkpoint(model: torch.nn.Module, path: str) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise UsageError(f"--checkpoint {path}: cannot read it ({type(err).__name__}: {err})") from err
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    try:
        model.load_state_dict(state)
    except Exception as err:
        first = str(err).strip().splitlines()
        raise UsageError(f"--checkpoint {path} does not match the model: {' '.join(x.strip() for x in first[:3])}") \
            from err
    return state


def _loss(spec: str) -> Callable:
    return LOSSES[spec] if spec in LOSSES else _load(spec, "--loss")


def _check_forward(model: torch.nn.Module, loss_fn: Callable, data: Any, device: torch.device) -> None:
    """One forward of the first batch, so that shape errors surface as one clear line."""
    from secondorder.operators.data import as_batches, call_model, to_device

    try:
        batches = as_batches(data)
        first = to_device(next(iter(batches)), device)
    except StopIteration:
        raise UsageError("--data yielded no batches") from None
    except (TypeError, ValueError) as err:
        raise UsageError(f"--data: {err}") from err
    if not isinstance(first, (tuple, list)) or len(first) != 2:
        raise UsageError(f"--data must give (inputs, targets) batches, got {type(first).__name__}")
    try:
        with torch.no_grad():
            loss_fn(call_model(model, first[0]), first[1])
    except Exception as err:
        raise UsageError(f"the model rejected the first batch of --data: {type(err).__name__}: "
                         f"{str(err).strip().splitlines()[0]}") from err


def _own_model(args: argparse.Namespace, device: torch.device):
    if not args.model or not args.data:
        raise UsageError("--model and --data go together (without both, the default model is trained)")
    model = _call_factory(args.model, "--model")
    if not isinstance(model, torch.nn.Module):
        raise UsageError(f"--model {args.model} returned {type(model).__name__}, not a torch.nn.Module")
    states = [_load_checkpoint(model, path) for path in args.checkpoint]
    model.to(device)
    data = _call_factory(args.data, "--data")
    loss_fn = _loss(args.loss)
    _check_forward(model, loss_fn, data, device)
    context = {"model": f"{args.model} ({sum(p.numel() for p in model.parameters())} parameters)",
               "checkpoint": args.checkpoint[-1] if args.checkpoint else "factory's initial weights",
               "data": args.data, "loss": args.loss}
    evolution = None
    if len(states) > 1:
        evolution = hessian_evolution(model, list(enumerate(states)), loss_fn, data, progress=not args.quiet,
                                      seed=args.seed, params=_params(args))
    return model, loss_fn, data, context, evolution


def _default_model(args: argparse.Namespace, device: torch.device):
    from secondorder.datasets import train_mnist1d

    if args.epochs < 1:
        raise UsageError(f"--epochs must be >= 1, got {args.epochs}")
    from secondorder.datasets import load_mnist1d

    xtr, ytr, xte, yte = load_mnist1d()
    analysis_data = [(xtr[i : i + 1000].to(device), ytr[i : i + 1000].to(device)) for i in range(0, len(xtr), 1000)]
    tracker = HessianTracker(F.cross_entropy, analysis_data[0], seed=args.seed)
    steps_per_epoch = -(-len(xtr) // 128)
    epochs = {e for e in EVOLUTION_EPOCHS if e <= args.epochs} | {args.epochs}

    def callback(step: int, model: torch.nn.Module) -> None:
        if step // steps_per_epoch in epochs:
            tracker(step, model)

    trained = train_mnist1d(args.seed, args.epochs, data=(xtr, ytr, xte, yte), callback=callback,
                            progress=not args.quiet)
    context = {"model": "default: " + trained.recipe,
               "test accuracy": f"{100 * trained.test_accuracy:.1f}%",
               "analysis data": f"the {len(xtr)} training samples (batches of 1000); evolution on the first 1000"}
    return trained.model.to(device), F.cross_entropy, analysis_data, context, tuple(tracker.points)


def _params(args: argparse.Namespace) -> list[str] | None:
    return [p.strip() for p in args.params.split(",") if p.strip()] if args.params else None


def _analyze(args: argparse.Namespace) -> tuple[dict, str]:
    try:
        device = torch.device(args.device)
    except RuntimeError as err:
        raise UsageError(f"--device {args.device!r}: {err}") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda, but torch sees no CUDA device")
    start = time.perf_counter()
    own = args.model or args.data or args.checkpoint
    model, loss_fn, data, context, evolution = (_own_model if own else _default_model)(args, device)
    analysis = analyze(model, loss_fn, data, params=_params(args), curvature=args.curvature, top_k=args.top_k,
                       bottom_k=args.bottom_k, trace_matvecs=args.probes, slq_probes=args.slq_probes,
                       slq_steps=args.slq_steps, landscape=not args.no_landscape,
                       landscape_radius=args.landscape_radius, max_matvecs=args.max_matvecs, seed=args.seed,
                       progress=not args.quiet)
    context.update({"curvature": args.curvature, "seed": args.seed, "machine": describe(device),
                    "total seconds": f"{time.perf_counter() - start:.1f}"})
    write_report(analysis, args.out, title="secondorder analyze: Hessian report", context=context,
                 evolution=evolution)
    return json.loads((args.out / "summary.json").read_text()), summary_table(analysis)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``secondorder`` command."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        summary, table = _analyze(args)
    except (UsageError, ValueError, TypeError, OSError, FloatingPointError) as err:
        print(f"secondorder: error: {str(err).splitlines()[0] if str(err) else type(err).__name__}",
              file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(table)
        print(f"report: {args.out / 'report.html'} (also report.md, summary.json and PNGs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
