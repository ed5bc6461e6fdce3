"""``secondorder analyze``: the Hessian report of a network.

With no arguments it trains the embedded default (a small 1-D CNN on MNIST-1D, generated
offline by the ``mnist1d`` package, 20 epochs of SGD, recording the Hessian's evolution on the
way) and analyzes it. With ``--model`` and ``--data`` it analyzes your own network.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from secondorder.analysis import HessianTracker, analyze, hessian_evolution, summary_table, write_report
from secondorder.analysis.stability import check_rate_source, optimizer_preconditioner
from secondorder.cli.batches import WatchedBatches, naming_the_batch
from secondorder.cli.common import (
    FACTORIES_HELP,
    UsageError,
    add_default_model_options,
    add_model_options,
    add_output_options,
    device_of,
    join_torchrun,
    output_directory,
    own_problem,
    parameter_names,
    under_torchrun,
    user_input,
    wants_own_model,
)
from secondorder.data import as_batches
from secondorder.distributed import shutdown
from secondorder.distributed.reducer import RankReducer, Reducer
from secondorder.environment import describe
from secondorder.operators.params import select_parameters
from secondorder.validation import non_negative_int, positive_int

EPILOG = """\
examples:
  secondorder analyze                                   train the MNIST-1D default, write ./secondorder-out/
  secondorder analyze --model mypkg.nets:make_net --checkpoint net.pt \\
                      --data mypkg.data:val_batches --loss cross_entropy --out report/
  secondorder analyze --checkpoint ep1.pt --checkpoint ep10.pt ...   evolution over checkpoints
  secondorder analyze --params conv1,fc --curvature ggn --json       some layers, Gauss-Newton, JSON on stdout
  secondorder analyze --curvature kfac --no-landscape               how far K-FAC is from the Gauss-Newton matrix
  secondorder analyze --lr 0.5 --momentum 0                         train the default at the edge of stability
  secondorder analyze --model ... --data ... --checkpoint net.pt --optimizer-state adam.pt
                                 the preconditioned sharpness of the Adam run that saved adam.pt
  torchrun --nproc-per-node 4 -m secondorder.cli analyze --device cuda ...
                                 4 processes (GPUs) share the analysis batches; rank 0 writes the report

what the report holds (report.html, self-contained; report.md; summary.json; PNGs):
  trace        Hutch++ estimate of tr(H) with its standard error and 95% interval
  eigenvalues  top-k / bottom-k by thick-restart Lanczos; the residual ||Hv - theta v|| bounds each error
  density      spectral density by stochastic Lanczos quadrature (log scale)
  per layer    trace, trace per parameter (HAWQ-V2) and top eigenvalue (HAWQ-V1) of each layer's block
  landscape    loss along the top eigenvector vs a random unit direction (1-D), and on the plane of
               the top two eigenvectors (2-D), as in Yao et al. (NeurIPS 2018)
  evolution    top eigenvalue and trace over training (default model, or several --checkpoint)
  stability    with the learning rate (the default model knows its own; --lr, --momentum or
               --optimizer-state for yours): lambda_max against 2/lr (heavy ball: (2+2 beta)/lr),
               tr(H) against SGD's 2/lr, and for Adam/AdamW/RMSprop/Adagrad/AdaHessian/Sophia the
               preconditioned sharpness lambda_max(P^-1 H) from the saved state against
               (2+2 beta1)/((1-beta1) lr); each "stable", "unstable" (certain: the Ritz value is a
               lower bound) or "undecided" (the error bar straddles the bound); dashed lines on
               the evolution plot
  K-FAC        --curvature kfac: the Gauss-Newton report, and beside it K-FAC's exact trace and top
               eigenvalues (whole and per layer) and ||G - K||_F / ||G||_F by Hutchinson probes
"""

EVOLUTION_EPOCHS = (0, 1, 2, 5, 10, 20)
TRAIN_BATCH = 128  # the default model's SGD batch (the callback maps steps back to epochs with it)
DEFAULT_LR, DEFAULT_MOMENTUM = 0.1, 0.9  # and its learning rate and momentum (train_mnist1d's)


def add_parser(sub) -> None:
    """Register ``analyze`` on the subcommand parsers."""
    a = sub.add_parser("analyze", help="Hessian report of a trained network (default: MNIST-1D CNN)",
                       description=__doc__.split("\n\n")[1], epilog=EPILOG + FACTORIES_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_options(a)
    est = a.add_argument_group("estimators")
    est.add_argument("--curvature", choices=["hessian", "ggn", "kfac"], default="hessian",
                     help="kfac: the Gauss-Newton report with its K-FAC approximation beside it (traces, top "
                          "eigenvalues, per layer, relative Frobenius distance) (default: hessian)")
    est.add_argument("--kfac-probes", type=int, default=30,
                     help="--curvature kfac: probes of the distance ||G - K||_F / ||G||_F (default: 30)")
    est.add_argument("--top-k", type=int, default=5, help="top eigenvalues (default: 5)")
    est.add_argument("--bottom-k", type=int, default=1, help="bottom eigenvalues, 0 for none (default: 1)")
    est.add_argument("--probes", type=int, default=90, help="Hutch++ products for the trace (default: 90)")
    est.add_argument("--slq-probes", type=int, default=4, help="spectral-density probes (default: 4)")
    est.add_argument("--slq-steps", type=int, default=64, help="Lanczos steps per density probe (default: 64)")
    est.add_argument("--max-matvecs", type=int, default=300, help="cap per Lanczos run (default: 300)")
    est.add_argument("--landscape-radius", type=float, default=1.0, help="alpha range of landscapes (default: 1)")
    est.add_argument("--no-landscape", action="store_true", help="skip the loss landscapes")
    add_default_model_options(est)
    st = a.add_argument_group("stability (the linear-stability bounds of the training learning rate)")
    st.add_argument("--lr", type=float,
                    help="training learning rate; the default model trains with it (default: 0.1 for the "
                         "default model, none for yours: no stability check)")
    st.add_argument("--momentum", type=float,
                    help="heavy-ball momentum of that training (default: 0.9 for the default model, else 0)")
    st.add_argument("--optimizer-state", metavar="PATH",
                    help="torch.save(optimizer.state_dict()) of the optimizer that trained --model, built over "
                         "model.parameters(): its lr, momentum and adaptive denominators (instead of --lr)")
    add_output_options(a, "secondorder-out")
    a.set_defaults(run=run)


def _check_stability_options(args: argparse.Namespace) -> None:
    """--lr, --momentum and --optimizer-state, checked before any work."""
    if args.optimizer_state is not None and (args.lr is not None or args.momentum is not None):
        raise UsageError("--optimizer-state holds the learning rate and momentum: give it or --lr/--momentum")
    if args.optimizer_state is not None and not wants_own_model(args):
        raise UsageError("--optimizer-state is for your --model (the default model's optimizer is known)")
    if args.momentum is not None and args.lr is None and wants_own_model(args):
        raise UsageError("--momentum needs --lr")
    if args.lr is not None or args.momentum is not None:
        with user_input("--lr/--momentum"):
            check_rate_source(DEFAULT_LR if args.lr is None else args.lr, args.momentum or 0.0, None)


def _optimizer_state(args: argparse.Namespace, model: torch.nn.Module) -> dict | None:
    """The --optimizer-state, checked against the analyzed parameters (a usage error if it does not fit)."""
    if args.optimizer_state is None:
        return None
    try:
        state = torch.load(args.optimizer_state, map_location="cpu", weights_only=True)
    except Exception as err:
        raise UsageError(f"--optimizer-state {args.optimizer_state}: cannot read it ({type(err).__name__}: {err})") \
            from err
    with user_input(f"--optimizer-state {args.optimizer_state}"):
        params = [p for _, p in select_parameters(model, parameter_names(args))]
        optimizer_preconditioner(state, params, parameters=list(model.parameters()))
    return state


def _own_model(args: argparse.Namespace, device: torch.device):
    model, loss_fn, data, states, context = own_problem(args, device)
    if args.optimizer_state is not None:
        context["optimizer state"] = args.optimizer_state
    evolution = None
    if len(states) > 1:
        with naming_the_batch(model, loss_fn, data):
            evolution = hessian_evolution(model, list(enumerate(states)), loss_fn, data, progress=not args.quiet,
                                          seed=args.seed, params=parameter_names(args))
    return model, loss_fn, data, context, evolution


def _default_model(args: argparse.Namespace, device: torch.device):
    from secondorder.datasets import train_mnist1d

    if args.epochs < 1:
        raise UsageError(f"--epochs must be >= 1, got {args.epochs}")
    from secondorder.datasets import batches, load_mnist1d

    if args.params:  # fail before training, with the suggestions the selector gives
        from secondorder.datasets import Mnist1dCNN

        with torch.random.fork_rng(devices=[]), user_input("--params"):
            select_parameters(Mnist1dCNN(), parameter_names(args))
    xtr, ytr, xte, yte = load_mnist1d()
    analysis_data = batches(xtr.to(device), ytr.to(device), 1000)
    lr, momentum = default_rate(args)
    tracker = HessianTracker(F.cross_entropy, analysis_data[0], seed=args.seed, lr=lr, momentum=momentum)
    steps_per_epoch = -(-len(xtr) // TRAIN_BATCH)
    epochs = {e for e in EVOLUTION_EPOCHS if e <= args.epochs} | {args.epochs}

    def callback(step: int, model: torch.nn.Module) -> None:
        if step // steps_per_epoch in epochs:
            tracker(step, model)

    trained = train_mnist1d(args.seed, args.epochs, TRAIN_BATCH, lr, data=(xtr, ytr, xte, yte), callback=callback,
                            progress=not args.quiet, momentum=momentum)
    context = {"model": "default: " + trained.recipe,
               "test accuracy": f"{100 * trained.test_accuracy:.1f}%",
               "analysis data": f"the {len(xtr)} training samples (batches of 1000); evolution on the first 1000"}
    return trained.model.to(device), F.cross_entropy, analysis_data, context, tuple(tracker.points)


def default_rate(args: argparse.Namespace) -> tuple[float, float]:
    """The default model's training learning rate and momentum (--lr and --momentum, else 0.1 and 0.9)."""
    return (DEFAULT_LR if args.lr is None else args.lr), (DEFAULT_MOMENTUM if args.momentum is None else args.momentum)


def _my_shard(data, reducer: Reducer) -> list:
    """Rank r's batches r, r + W, ... of the analysis data (every rank loads the same data; one
    batch or a sequence of batches, by the operators' rule :func:`as_batches`).
    """
    batches = list(as_batches(data))
    try:
        return reducer.shard(batches, what="the analysis data (batches)")
    except ValueError as err:
        raise UsageError(f"{err} (smaller batches, or fewer processes)") from None


def _watched_shard(data, reducer: Reducer):
    """:func:`_my_shard`, still naming a rejected batch by its index in --data if ``data`` is the user's."""
    shard = _my_shard(data, reducer)
    if not isinstance(data, WatchedBatches):
        return shard
    rank, size = reducer.rank, reducer.size
    return WatchedBatches(shard, data.first, numbers=range(rank, rank + size * len(shard), size))


def run(args: argparse.Namespace) -> tuple[dict | None, str]:
    """The ``analyze`` command: its summary (``None`` on ranks other than 0) and the text to print."""
    if not under_torchrun():
        return _run(args, None)
    world, finished = join_torchrun(), False
    try:
        out = _run(args, world)
        finished = True
        return out
    finally:
        shutdown(wait=finished)


def _check_counts(args: argparse.Namespace) -> None:
    """The estimators' budgets, checked before any work."""
    with user_input("the estimator options"):
        for name in ("top_k", "probes", "slq_probes", "slq_steps"):
            positive_int(getattr(args, name), name)
        non_negative_int(args.bottom_k, "bottom_k")
    if args.curvature == "kfac" and args.kfac_probes < 2:
        raise UsageError(f"--kfac-probes must be >= 2 (for a standard error), got {args.kfac_probes}")


def _run(args: argparse.Namespace, world) -> tuple[dict | None, str]:
    with output_directory(args, writes=world is None or world.rank == 0) as tmp:  # --out first, before any work
        return _analyze(args, world, tmp)


def _analyze(args: argparse.Namespace, world, tmp) -> tuple[dict | None, str]:
    """The analysis; rank 0 (or the single process) writes the report into ``tmp``."""
    _check_counts(args)
    _check_stability_options(args)
    device = device_of(args)
    start = time.perf_counter()
    args.quiet = args.quiet or (world is not None and world.rank != 0)  # rank 0 shows the progress
    own = wants_own_model(args)
    model, loss_fn, data, context, evolution = (_own_model if own else _default_model)(args, device)
    state = _optimizer_state(args, model) if own else None
    lr, momentum = (args.lr, args.momentum or 0.0) if own else default_rate(args)
    if world is not None:
        data = _watched_shard(data, RankReducer())
        context["processes"] = f"{world.size} ({world.backend}), each analyzing every {world.size}-th batch"
    with naming_the_batch(model, loss_fn, data):
        analysis = analyze(model, loss_fn, data, params=parameter_names(args), curvature=args.curvature,
                           top_k=args.top_k, bottom_k=args.bottom_k, trace_matvecs=args.probes,
                           slq_probes=args.slq_probes, slq_steps=args.slq_steps, landscape=not args.no_landscape,
                           landscape_radius=args.landscape_radius, max_matvecs=args.max_matvecs, seed=args.seed,
                           progress=not args.quiet, kfac_probes=args.kfac_probes, distributed=world is not None,
                           lr=None if state is not None else lr, momentum=momentum, optimizer=state,
                           optimizer_parameters=None if state is None else list(model.parameters()))
    if tmp is None:  # a rank other than 0: rank 0 writes the report
        return None, ""
    context.update({"curvature": args.curvature, "seed": args.seed, "machine": describe(device),
                    "total seconds": f"{time.perf_counter() - start:.1f}"})
    summary = write_report(analysis, tmp, title="secondorder analyze: Hessian report", context=context,
                           evolution=evolution)
    table = summary_table(analysis) + f"\nreport: {args.out / 'report.html'} (also report.md, summary.json and PNGs)"
    return summary, table
