"""``secondorder batch-scaling``: the top Hessian eigenvalue and the maximal stable learning rate against the batch size.

For each batch size B it measures the top eigenvalue of the Hessian of the mean loss on
--num-batches random mini-batches of B distinct samples (mean +- standard error) and of the whole
data, fits lambda_B = c + a (1/B - 1/n) (Granziol, Zohren & Roberts, JMLR 2022: the mini-batch
noise pushes the top eigenvalue up by a term proportional to 1/B), and finds by bisection the
largest learning rate at which SGD and Adam train a copy of the model for --steps steps without
diverging, with the fit lr_max ~ B^p (the paper: p = 1 for SGD while the noise dominates,
saturating at large B; p = 1/2 for Adam). Without --model it trains the MNIST-1D default CNN first.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from secondorder.analysis.batch_scaling import OPTIMIZERS, batch_scaling
from secondorder.analysis.batch_scaling_plots import batch_scaling_table, plot_batch_scaling
from secondorder.cli.common import (
    FACTORIES_HELP,
    UsageError,
    add_default_model_options,
    add_model_options,
    add_output_options,
    device_of,
    output_directory,
    own_problem,
    parameter_names,
    user_input,
    wants_own_model,
)
from secondorder.environment import describe

DEFAULT_SIZES = "8,16,32,64,128,256,512"

EPILOG = """\
examples:
  secondorder batch-scaling                             MNIST-1D CNN, B = 8..512, eigenvalues and learning rates
  secondorder batch-scaling --no-lr                     eigenvalues only (seconds instead of minutes)
  secondorder batch-scaling --batch-sizes 16,64,256,1024 --num-batches 20 --optimizers sgd --steps 100
  secondorder batch-scaling --model mypkg.nets:make_net --checkpoint net.pt --data mypkg.data:train \\
                            --loss cross_entropy --out scaling/

what the numbers mean (report.md, summary.json, batch_scaling.png):
  lambda_B     mean over --num-batches mini-batches of B distinct random samples of the top eigenvalue
               (Lanczos, residual-certified) of the Hessian of the batch's mean loss; +- its standard error
  full         the top eigenvalue of the Hessian of the mean loss over all n samples
  fit, c free  weighted least squares lambda_B = c + a (1/B - 1/n), weights 1/stderr^2: the noise of a
               B-sample mean drawn without replacement has variance ~ 1/B - 1/n, so B = n is the full
               data; c should match full (z = (c - full) / stderr(c)), a is the noise strength, R^2 and
               chi^2/dof say how well 1/B describes the measurements
  c = full     the same with c fixed at the measured full value (one parameter: the paper's law)
  lr_max       the largest learning rate (within --lr-rtol) at which the optimizer, started from the
               model's state, runs --steps steps on fresh random batches of B without diverging:
               a non-finite loss, or the loss on all the data above --divergence x its initial value
               (checked every 10 steps); SGD has no momentum, Adam torch's defaults
  p            slope of log lr_max against log B, over all B and over the smaller half
  2 / lambda_B SGD's edge of stability on the mini-batch quadratic, the paper's prediction of lr_max
"""


def add_parser(sub) -> None:
    """Register ``batch-scaling`` on the subcommand parsers."""
    p = sub.add_parser("batch-scaling", help="top Hessian eigenvalue and max stable lr against the batch size",
                       description=__doc__.split("\n\n")[1], epilog=EPILOG + FACTORIES_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_options(p)
    eig = p.add_argument_group("eigenvalues")
    eig.add_argument("--batch-sizes", default=DEFAULT_SIZES,
                     help=f"comma-separated batch sizes, at least two, each at most the number of samples "
                          f"(default: {DEFAULT_SIZES})")
    eig.add_argument("--num-batches", type=int, default=10, help="mini-batches per size, >= 2 (default: 10)")
    eig.add_argument("--max-matvecs", type=int, default=None,
                     help="cap of Hessian-vector products per Lanczos run (default: the library's, 500)")
    lr = p.add_argument_group("learning rates")
    lr.add_argument("--no-lr", action="store_true", help="skip the learning-rate bisection (the expensive part)")
    lr.add_argument("--optimizers", default="sgd,adam", help="comma-separated: sgd, adam (default: sgd,adam)")
    lr.add_argument("--steps", type=int, default=200, help="training steps per trial (default: 200)")
    lr.add_argument("--lr-rtol", type=float, default=0.05,
                    help="relative width of the final learning-rate bracket (default: 0.05)")
    lr.add_argument("--divergence", type=float, default=2.0,
                    help="a trial diverged when the data's loss exceeds this multiple of its initial value "
                         "(default: 2)")
    add_default_model_options(lr)
    add_output_options(p, "secondorder-batch-scaling")
    p.set_defaults(run=run)


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--batch-sizes must be comma-separated integers, got {text!r}") from None
    bad = [b for b in sizes if b < 1]
    if bad:
        raise UsageError(f"--batch-sizes must be positive, got {bad}")
    if len(set(sizes)) < 2:
        raise UsageError(f"--batch-sizes needs at least two distinct sizes, got {text!r}")
    return sorted(set(sizes))


def _optimizers(args: argparse.Namespace) -> list[str]:
    if args.no_lr:
        return []
    names = list(dict.fromkeys(x.strip() for x in args.optimizers.split(",") if x.strip()))
    unknown = [n for n in names if n not in OPTIMIZERS]
    if unknown or not names:
        raise UsageError(f"--optimizers {args.optimizers!r}: choose from {', '.join(OPTIMIZERS)}")
    return names


def _check_numbers(args: argparse.Namespace) -> None:
    if args.num_batches < 2:
        raise UsageError(f"--num-batches must be >= 2 (for a standard error), got {args.num_batches}")
    if args.max_matvecs is not None and args.max_matvecs < 1:
        raise UsageError(f"--max-matvecs must be >= 1, got {args.max_matvecs}")
    if args.steps < 1:
        raise UsageError(f"--steps must be >= 1, got {args.steps}")
    if not 0 < args.lr_rtol < 1:
        raise UsageError(f"--lr-rtol must lie in (0, 1), got {args.lr_rtol}")
    if not 1 < args.divergence < float("inf"):
        raise UsageError(f"--divergence must be a finite number above 1, got {args.divergence}")


def _fits(sizes: list[int], n: int, what: str) -> None:
    big = [b for b in sizes if b > n]
    if big:
        raise UsageError(f"--batch-sizes {big} exceed the {n} samples of {what}")


def _default(args: argparse.Namespace, device: torch.device, sizes: list[int]):
    from secondorder.datasets import Mnist1dCNN, load_mnist1d, train_mnist1d
    from secondorder.operators.params import select_parameters

    if args.epochs < 1:
        raise UsageError(f"--epochs must be >= 1, got {args.epochs}")
    if args.params:  # fail before training
        with torch.random.fork_rng(devices=[]), user_input("--params"):
            select_parameters(Mnist1dCNN(), parameter_names(args))
    data = load_mnist1d()
    _fits(sizes, len(data[0]), "the MNIST-1D training set")
    trained = train_mnist1d(args.seed, args.epochs, data=data, progress=not args.quiet)
    x, y = trained.train
    context = {"model": "default: " + trained.recipe, "test accuracy": f"{100 * trained.test_accuracy:.1f}%",
               "data": f"the {len(x)} training samples"}
    return trained.model.to(device), F.cross_entropy, (x.to(device), y.to(device)), context


def _own(args: argparse.Namespace, device: torch.device, sizes: list[int]):
    model, loss_fn, data, _, context = own_problem(args, device)
    batches = list(data)
    if not all(isinstance(b[0], torch.Tensor) and isinstance(b[1], torch.Tensor) for b in batches):
        raise UsageError("--data must give (inputs, targets) batches of tensors: batch-scaling draws its own "
                         "batches from their rows")
    try:
        x = torch.cat([b[0] for b in batches]).to(device)
        y = torch.cat([b[1] for b in batches]).to(device)
    except RuntimeError as err:
        raise UsageError(f"--data: the batches do not stack into one data set ({str(err).splitlines()[0]})") \
            from err
    _fits(sizes, len(x), "--data")
    with user_input("--params"):
        from secondorder.operators.params import select_parameters

        select_parameters(model, parameter_names(args))
    context["data"] = f"{args.data}: {len(x)} samples"
    return model, loss_fn, (x, y), context


def run(args: argparse.Namespace) -> tuple[dict, str]:
    """The ``batch-scaling`` command: its summary and the text to print."""
    with output_directory(args) as tmp:  # --out first, before any work
        assert tmp is not None
        return _run(args, tmp)


def _run(args: argparse.Namespace, tmp: Path) -> tuple[dict, str]:
    sizes, optimizers = _sizes(args.batch_sizes), _optimizers(args)
    _check_numbers(args)
    device = device_of(args)
    start = time.perf_counter()
    model, loss_fn, data, context = (_own if wants_own_model(args) else _default)(args, device, sizes)
    result = batch_scaling(model, loss_fn, data, sizes, num_batches=args.num_batches, params=parameter_names(args),
                           max_matvecs=args.max_matvecs, optimizers=optimizers, steps=args.steps,
                           lr_rtol=args.lr_rtol, divergence=args.divergence, seed=args.seed, progress=not args.quiet)
    context.update({"batch sizes": sizes, "mini-batches per size": args.num_batches,
                    "learning rates": ", ".join(optimizers) + f" ({args.steps} steps, rtol {args.lr_rtol:g}, "
                                      f"divergence {args.divergence:g} x the initial loss)" if optimizers else "skipped",
                    "seed": args.seed, "machine": describe(device),
                    "total seconds": f"{time.perf_counter() - start:.1f}"})
    table = batch_scaling_table(result)
    summary = {"context": context, "result": result.to_dict()}
    plot_batch_scaling(result, tmp / "batch_scaling.png", title="secondorder batch-scaling")
    (tmp / "summary.json").write_text(json.dumps(summary, indent=2))
    lines = ["# secondorder batch-scaling", ""] + [f"- **{k}**: {v}" for k, v in context.items()]
    (tmp / "report.md").write_text("\n".join(lines + ["", table, "", "![batch scaling](batch_scaling.png)", ""]))
    return summary, table + f"\nreport: {args.out / 'report.md'} (also summary.json, batch_scaling.png)"
