"""``secondorder train``: training with an adaptive batch size from the top Hessian eigenvalue (ABS/ABSA),
with a sub-sampled Newton-type optimizer (trust region, ARC, Newton-MR), or with K-FAC.

Trains with SGD (momentum 0.9) under Yao et al.'s controller (arXiv:1810.01021, the rule of the
authors' HessianFlow code): after every epoch the top Hessian eigenvalue is measured on a fresh
batch of training samples; when it has fallen by --ratio since the last increase, or after
--patience epochs without one, the batch size and the learning rate are multiplied by 2, up to
--max-batch-size, large batches being reached by gradient accumulation. absa also replaces a
fraction of every batch by FGSM examples (halved at every increase, none in the second half of
training); abs does not; fixed keeps --batch-size; slq keeps it too and learns the learning rate and
momentum from the Hessian's spectrum (stochastic Lanczos quadrature). --optimizer trust-region, arc or newton-mr
trains instead with a sub-sampled Newton-type method (Xu, Roosta & Mahoney; Roosta et al.): one
step per batch (by default the whole training set, so an epoch is one iteration) with the batch's
full gradient and loss and the Hessian of a --hessian-fraction sample. --optimizer kfac trains with
K-FAC (Kronecker-factored natural gradient) on reshuffled mini-batches. Without --model it trains
the MNIST-1D CNN.
"""

from __future__ import annotations

import argparse
import csv
import inspect
import io
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable

import torch

from secondorder.cli import train_kfac
from secondorder.cli.common import (
    FACTORIES_HELP,
    UsageError,
    add_model_options,
    add_output_options,
    device_of,
    output_directory,
    user_input,
    wants_own_model,
)
from secondorder.cli.training import (
    STATE_FILE,
    evaluate,
    finite,
    fmt,
    load_run_state,
    problem,
    resume_run,
    rows_csv,
)
from secondorder.data import call_model, to_device
from secondorder.environment import describe
from secondorder.optim import CubicRegularization, NewtonMR, NewtonStep, TrustRegion
from secondorder.optim.subsampled import CURVATURES, SubsampledNewton
from secondorder.schedules import AdaptiveBatchSize, AdaptiveBatchTrainer, SLQLearningRate, SLQRecord
from secondorder.validation import MAX_SEED

SCHEDULES = ("absa", "abs", "fixed", "slq")
OPTIMIZERS = ("sgd", "trust-region", "arc", "newton-mr", "kfac")
CSV_COLUMNS = ("epoch", "batch_size", "lr", "top_eigenvalue", "adversarial_fraction", "train_loss", "test_accuracy",
               "iterations", "test_loss", "steps", "batch_increase")
NEWTON_EPOCHS = 100
"""Default --epochs of the Newton-type optimizers (at the default full batch: 100 iterations)."""
NEWTON_EPOCH_COLUMNS = ("epoch", "iterations", "accepted", "train_loss", "test_loss", "test_accuracy", "radius",
                        "sigma", "step_size", "propagations", "hessian_products", "seconds")
NEWTON_STEP_COLUMNS = ("step", "epoch", *(f.name for f in fields(NewtonStep)), "total_propagations", "seconds")


@dataclass(frozen=True)
class Method:
    """A Newton-type ``--optimizer``: its class, its own option (attribute name) and sub-problem cap."""

    cls: type
    option: str  # "radius", "sigma" or "inexactness"
    parameter: str  # the NewtonStep field of the method's state: "radius", "sigma" or "step_size"
    cap: str  # the constructor argument of the sub-problem's iteration cap
    solver: str

    def default(self, name: str) -> Any:
        return inspect.signature(self.cls).parameters[name].default


METHODS = {
    "trust-region": Method(TrustRegion, "radius", "radius", "cg_maxiter", "CG-Steihaug"),
    "arc": Method(CubicRegularization, "sigma", "sigma", "lanczos_maxiter", "Lanczos"),
    "newton-mr": Method(NewtonMR, "inexactness", "step_size", "minres_maxiter", "MINRES"),
}
SGD_DEFAULTS = {"schedule": "absa", "epochs": 90, "batch_size": 128, "lr": 0.1, "ratio": 2.0, "patience": 10,
                "lr_decay": 0.2, "warmup_epochs": 0, "eigen_batch": 128, "eigen_matvecs": 20}
"""The SGD path's defaults, filled in when the option was not given (None on the parser, so that an
SGD option given with a Newton-type optimizer is refused)."""
SGD_ONLY = ("schedule", "slq_every", "slq_steps", "slq_batch", "slq_lr_factor", "max_batch_size", "ratio", "patience", "lr_milestones", "lr_decay", "max_lr",
            "warmup_epochs", "adversarial_fraction", "adversarial_epochs", "epsilon", "eigen_batch", "eigen_matvecs")
SLQ_OPTIONS = ("slq_every", "slq_steps", "slq_batch", "slq_lr_factor")
NOT_SLQ = ("lr", "max_batch_size", "ratio", "patience", "lr_milestones", "lr_decay", "max_lr", "warmup_epochs",
           "adversarial_fraction", "adversarial_epochs", "epsilon", "eigen_batch", "eigen_matvecs")
"""The options of --schedule slq alone, and the SGD options it refuses (it learns the lr and keeps the batch)."""
SLQ_COLUMNS = ("step", "lambda_max", "lambda_min", "kappa", "lr", "momentum", "matvecs", "kept")
NEWTON_ONLY = {"radius": ("trust-region",), "sigma": ("arc",), "inexactness": ("newton-mr",),
               "hessian_fraction": tuple(METHODS), "curvature": tuple(METHODS),
               "subproblem_iterations": tuple(METHODS)}
USERS = {**{name: ("sgd",) for name in SGD_ONLY}, "lr": ("sgd", "kfac"), **NEWTON_ONLY,
         **{name: ("kfac",) for name in train_kfac.OPTIONS}}
"""The optimizers that take each optimizer-specific option (the others refuse it)."""
OWN = {"sgd": "--schedule", "trust-region": "--radius", "arc": "--sigma", "newton-mr": "--inexactness",
       "kfac": "--lr and --damping"}

EPILOG = """\
examples:
  secondorder train                                     ABSA on the MNIST-1D CNN, 90 epochs, from batch 128
  secondorder train --schedule abs --epochs 30 --quiet  ABS (no adversarial examples)
  secondorder train --schedule fixed --batch-size 2048 --lr 1.6 --warmup-epochs 5
                                                        plain large batch, linearly scaled lr with warm-up
  secondorder train --model mypkg.nets:make --data mypkg.data:train --test-data mypkg.data:test \\
                    --batch-size 64 --lr 0.05 --max-batch-size 4096 --out run/
  secondorder train --epochs 120 --resume run/trainer_state.pt --out run/   continue a run to 120 epochs
  secondorder train --schedule slq --epochs 30          lr and momentum learned from the Hessian's spectrum
  secondorder train --optimizer trust-region            sub-sampled trust region, 100 full-batch iterations
  secondorder train --optimizer arc --sigma 10 --hessian-fraction 0.1 --epochs 30
  secondorder train --optimizer newton-mr --curvature gauss-newton --epochs 50 --out mr/
  secondorder train --optimizer trust-region --batch-size 500 --epochs 5   8 steps per epoch, on mini-batches
  secondorder train --optimizer newton-mr --epochs 80 --resume mr/trainer_state.pt --out mr/
  secondorder train --optimizer kfac                    K-FAC, 30 epochs of batch 128, lr 0.01, damping 1e-3
  secondorder train --optimizer kfac --batch-size 1024 --lr 0.05 --damping 0.01 --fisher empirical

the rule (HessianFlow's defaults): eigenvalue on --eigen-batch 128 fresh training samples each
epoch (Lanczos, eval mode); grow when it is <= reference / --ratio (2) or after --patience (10)
epochs; the learning rate follows the batch linearly (capped by --max-lr if given), times
--lr-decay (0.2) after each of --lr-milestones (default 1/3, 2/3 and 8/9 of --epochs, as 30/60/80
of 90); FGSM fraction --adversarial-fraction (0.2 for absa), step --epsilon (default 0.005 times
the range of the training inputs: HessianFlow's 0.005 on [0, 1] images).
--schedule slq (the SLQ learner of Granziol, Zohren & Roberts, JMLR 2022; secondorder.schedules.SLQLearningRate)
keeps --batch-size and, every --slq-every steps (default: once per epoch, from the first step), runs
--slq-steps 20 Lanczos steps of the Hessian on --slq-batch 128 fresh training samples (eval mode):
lambda_max the top Ritz value, lambda_min the 5% quantile of the positive part of the SLQ density,
then SGD's lr and momentum are the heavy-ball optimum (2 / (sqrt lambda_max + sqrt lambda_min))^2
and ((sqrt k - 1) / (sqrt k + 1))^2, k = lambda_max / lambda_min, momentum capped at 0.99, edges
smoothed by a geometric EMA 0.5, lr times --slq-lr-factor (1), capped at 2 / lambda_max of the
refresh (the research note's safe clamp: a factor 1 + momentum inside the heavy ball's stability
edge; without it the optimum sits at that edge and diverged on networks whose curvature rises
between refreshes, experiments/results/slq_learner.md). Even so it does not train the default
MNIST-1D CNN, whose curvature at initialisation is small (lambda_max ~1, so lr ~2-3, which kills the
ReLU network within an epoch, also with --slq-every 4): the learner is a research reproduction,
honest about where it fails; --slq-lr-factor below 1 is the remedy we measured. It takes
no --lr, --max-batch-size, --ratio, --patience, --lr-*, --max-lr, --warmup-epochs, adversarial or
--eigen-* option; epochs.csv's lr and top_eigenvalue are those of the refresh in force at the
epoch's last step, and slq.csv (also under "slq_refreshes" in summary.json) has every refresh: step,
lambda_max, lambda_min, kappa, lr, momentum, matvecs, kept (no positive curvature: values kept).
outputs of sgd (in --out): epochs.csv (epoch, batch_size, lr, top_eigenvalue, adversarial_fraction,
train_loss, test_accuracy, iterations, test_loss, steps, batch_increase), schedule.png (batch size,
top eigenvalue and test accuracy over epochs), summary.json, trainer_state.pt (for --resume).

Newton-type optimizers (Xu, Roosta & Mahoney, Math. Programming 2020 and SDM 2020; Roosta, Liu,
Xu & Mahoney, arXiv:1810.00303): every step takes the loss and gradient of its whole batch and the
Hessian (or --curvature gauss-newton: the Gauss-Newton matrix) of a uniform --hessian-fraction
sample of it (0.05, at least one sample), then solves a sub-problem: trust-region by CG-Steihaug
within the radius (initial --radius 1), arc the cubic model (initial --sigma 1) by Lanczos, both
accepting by the ratio of actual to predicted decrease and retrying a rejected step (at most 30
times); newton-mr runs MINRES to --inexactness 0.01 with an Armijo line search, forward along
non-positive curvature. --subproblem-iterations caps CG (250), Lanczos (250) or MINRES (200).
By default the batch is the whole training set (the papers' full gradient), so an epoch is one
iteration; a smaller --batch-size splits every epoch into reshuffled batches (the last one
smaller), one step each. The model runs in eval mode (dropout off, BatchNorm on its running
statistics): the ratio test and the line search compare losses, which must be deterministic.
--loss MODULE:NAME must also accept reduction='none' (per-sample losses). The schedule options
(--schedule, --lr, --max-batch-size, --ratio, ..., --epsilon, --eigen-*) belong to sgd and are
refused, as are the Newton-type options with sgd.
outputs of the Newton-type optimizers (in --out): steps.csv (one row per step: step, epoch, the
optimizer's record - loss, new_loss, accepted, trials, ratio, radius, sigma, step_size, step_norm,
exit, subproblem_iterations, samples, hessian_samples, gradient_evaluations, function_evaluations,
hessian_products, propagations - then total_propagations and seconds), epochs.csv (epoch,
iterations, accepted, train_loss, test_loss, test_accuracy, radius, sigma, step_size,
propagations, hessian_products, seconds; train_loss is the sample-weighted mean of the batches'
losses after their steps: at the full batch, the training loss at the end of the epoch),
training.png (training loss against propagations, the method's parameter per step, test accuracy
per epoch), summary.json (context, final, epochs, and the per-step records under "steps"; a ratio
without a value - newton-mr's, or a non-finite trial's - is null), trainer_state.pt (model,
optimizer state, data order and records, for --resume).

K-FAC (Martens & Grosse 2015; Grosse & Martens 2016 for convolutions): the Linear, Conv1d and Conv2d
layers' curvature as Kronecker products of input and output-gradient factors (--fisher mc: labels
sampled from the model, the Fisher; empirical: the true labels; ggn: exact Gauss-Newton), in
running averages (--factor-decay 0.95) refreshed every --factor-every 10 steps and inverted with
factored Tikhonov damping (--damping 1e-3) every --inverse-every 100 steps; the step is clipped to
a KL of --kl-clip 1e-3 and taken with --momentum 0.9 and --weight-decay 0 at --lr 0.01. Other
parameters take the plain momentum step. One step is one forward of the whole --batch-size (128)
batch (no accumulation); reshuffled every epoch, the last batch smaller. outputs of kfac (in --out):
steps.csv (step, epoch, loss, factor_update, inverse_update, seconds), epochs.csv (epoch,
iterations, train_loss - the sample-weighted mean of the batch losses before their steps -,
test_loss, test_accuracy, seconds), training.png, summary.json, trainer_state.pt (for --resume).
"""


def add_parser(sub) -> None:
    """Register ``train`` on the subcommand parsers."""
    t = sub.add_parser("train", help="adaptive batch size from the Hessian (ABS/ABSA) with FGSM mixing, "
                                     "sub-sampled Newton-type training (trust region, ARC, Newton-MR), or K-FAC",
                       description=__doc__.split("\n\n")[1], epilog=EPILOG + FACTORIES_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_options(t)
    t.add_argument_group("evaluation").add_argument(
        "--test-data", metavar="MODULE:FACTORY", help="factory returning test batches (accuracy per epoch)")
    o = t.add_argument_group("training")
    o.add_argument("--optimizer", choices=OPTIMIZERS, default="sgd",
                   help="sgd under --schedule, a sub-sampled Newton-type method, or kfac (default: sgd)")
    o.add_argument("--epochs", type=int,
                   help=f"training epochs (default: 90 with sgd, {NEWTON_EPOCHS} with the Newton-type optimizers, "
                        f"where an epoch at the full batch is one iteration, {train_kfac.EPOCHS} with kfac)")
    o.add_argument("--batch-size", type=int,
                   help="initial batch size (default: 128) with sgd; the batch of every step with the Newton-type "
                        f"optimizers (default: the whole training set) and kfac (default: {train_kfac.BATCH_SIZE})")
    s = t.add_argument_group("schedule (--optimizer sgd)")
    s.add_argument("--schedule", choices=SCHEDULES, help="(default: absa)")
    s.add_argument("--lr", type=float, help="learning rate at --batch-size (default: 0.1); also kfac's "
                                            f"(default: {train_kfac.default('lr'):g})")
    s.add_argument("--max-batch-size", type=int,
                   help="cap (default: 128 x --batch-size, at most the number of training samples)")
    s.add_argument("--ratio", type=float, help="eigenvalue decrease that grows the batch (default: 2)")
    s.add_argument("--patience", type=int,
                   help="epochs without growth after which the batch grows anyway, 0 for never (default: 10)")
    s.add_argument("--lr-milestones", metavar="E1,E2,...",
                   help="epochs after which the lr is multiplied by --lr-decay, 'none' for a constant lr "
                        "(default: 1/3, 2/3 and 8/9 of --epochs)")
    s.add_argument("--lr-decay", type=float, help="(default: 0.2)")
    s.add_argument("--max-lr", type=float, help="cap of the linearly scaled learning rate (default: none)")
    s.add_argument("--warmup-epochs", type=int, help="linear lr warm-up (default: 0)")
    s.add_argument("--adversarial-fraction", type=float, help="FGSM fraction (default: 0.2 for absa, else 0)")
    s.add_argument("--adversarial-epochs", type=int, help="epochs with FGSM examples (default: half of --epochs)")
    s.add_argument("--epsilon", type=float, help="FGSM step (default: 0.005 x the range of the training inputs)")
    s.add_argument("--slq-every", type=int, metavar="N",
                   help="slq: optimizer steps between refreshes of lr and momentum (default: one epoch's steps)")
    s.add_argument("--slq-steps", type=int, metavar="K",
                   help="slq: Lanczos steps (Hessian-vector products) per refresh (default: 20)")
    s.add_argument("--slq-batch", type=int, metavar="B",
                   help="slq: fresh training samples per refresh (default: 128, at most the training set)")
    s.add_argument("--slq-lr-factor", type=float, metavar="F",
                   help="slq: multiplies the learned lr, capped at 2 / lambda_max of the refresh (default: 1)")
    n = t.add_argument_group("Newton-type optimizers (--optimizer trust-region, arc, newton-mr)")
    n.add_argument("--radius", type=float,
                   help=f"trust-region: initial radius (default: {METHODS['trust-region'].default('radius'):g})")
    n.add_argument("--sigma", type=float,
                   help=f"arc: initial cubic regularization sigma (default: {METHODS['arc'].default('sigma'):g})")
    n.add_argument("--inexactness", type=float,
                   help=f"newton-mr: MINRES inexactness theta in (0, 1) "
                        f"(default: {METHODS['newton-mr'].default('inexactness'):g})")
    n.add_argument("--hessian-fraction", type=float,
                   help=f"fraction of the batch in each step's Hessian sample, in (0, 1] "
                        f"(default: {METHODS['arc'].default('hessian_fraction'):g})")
    n.add_argument("--curvature", choices=CURVATURES, help="Hessian or Gauss-Newton products (default: hessian)")
    n.add_argument("--subproblem-iterations", type=int, metavar="N",
                   help="cap on CG / Lanczos / MINRES iterations per sub-problem (default: 250 / 250 / 200)")
    train_kfac.add_options(t)
    c = t.add_argument_group("computation")
    c.add_argument("--max-micro-batch", type=int, default=128,
                   help="largest forward pass; bigger batches are accumulated (default: 128)")
    c.add_argument("--eigen-batch", type=int, help="sgd: samples for the eigenvalue (default: 128)")
    c.add_argument("--eigen-matvecs", type=int, help="sgd: Lanczos products per eigenvalue (default: 20)")
    c.add_argument("--seed", type=int, default=0,
                   help="seed of initialisation, data order, probes and Hessian samples (default: 0)")
    c.add_argument("--resume", metavar="PATH", help="trainer_state.pt of an earlier run with the same settings")
    add_output_options(t, "secondorder-train")
    t.set_defaults(run=run)


def _options(args: argparse.Namespace) -> None:
    """Refuse the options of the other optimizers (before any work) and fill in the defaults of the SGD path."""
    for name, users in USERS.items():
        if getattr(args, name) is not None and args.optimizer not in users:
            raise UsageError(_refusal(_flag(name), users, args.optimizer))
    if args.optimizer == "sgd":
        _slq_options(args)
        for name, value in SGD_DEFAULTS.items():
            if getattr(args, name) is None:
                setattr(args, name, value)
    elif args.epochs is None:
        args.epochs = train_kfac.EPOCHS if args.optimizer == "kfac" else NEWTON_EPOCHS


def _slq_options(args: argparse.Namespace) -> None:
    """Refuse the SGD options --schedule slq does not take, and its own options with the other schedules."""
    if args.schedule == "slq":
        for name in NOT_SLQ:
            if getattr(args, name) is not None:
                raise UsageError(f"{_flag(name)} does not apply to --schedule slq, which learns the learning rate and "
                                 f"momentum from the Hessian at a fixed --batch-size: drop {_flag(name)}")
        args.slq_steps = 20 if args.slq_steps is None else args.slq_steps
        args.slq_batch = 128 if args.slq_batch is None else args.slq_batch
        args.slq_lr_factor = 1.0 if args.slq_lr_factor is None else args.slq_lr_factor
        if not 0 < args.slq_lr_factor < math.inf:
            raise UsageError(f"--slq-lr-factor must be a positive finite number, got {args.slq_lr_factor}")
        return
    for name in SLQ_OPTIONS:
        if getattr(args, name) is not None:
            raise UsageError(f"{_flag(name)} applies to --schedule slq, not to --schedule {args.schedule or 'absa'}")


def _refusal(flag: str, users: tuple[str, ...], optimizer: str) -> str:
    if users == ("sgd",):
        return (f"{flag} belongs to the SGD schedule (--optimizer sgd); --optimizer {optimizer} has no batch schedule "
                f"or eigenvalue: drop {flag}")
    if optimizer == "sgd":
        return f"{flag} applies to --optimizer {_either(users)}, not to sgd (the default)"
    return f"{flag} applies to --optimizer {_either(users)}; --optimizer {optimizer} takes {OWN[optimizer]}"


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _either(names: tuple[str, ...]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def _check(args: argparse.Namespace) -> None:
    for flag, value, low in (("--epochs", args.epochs, 1), ("--batch-size", args.batch_size, 1),
                             ("--max-micro-batch", args.max_micro_batch, 1), ("--eigen-batch", args.eigen_batch, 1),
                             ("--eigen-matvecs", args.eigen_matvecs, 1), ("--patience", args.patience, 0),
                             ("--slq-every", 1 if args.slq_every is None else args.slq_every, 1),
                             ("--slq-steps", 1 if args.slq_steps is None else args.slq_steps, 1),
                             ("--slq-batch", 1 if args.slq_batch is None else args.slq_batch, 1),
                             ("--warmup-epochs", args.warmup_epochs, 0),
                             ("--adversarial-epochs", 0 if args.adversarial_epochs is None else args.adversarial_epochs,
                              0)):
        if value < low:
            raise UsageError(f"{flag} must be >= {low}, got {value}")
    if not args.lr > 0:
        raise UsageError(f"--lr must be positive, got {args.lr}")
    if args.ratio <= 1:
        raise UsageError(f"--ratio must exceed 1, got {args.ratio}")
    if args.max_lr is not None and not args.max_lr > 0:
        raise UsageError(f"--max-lr must be positive, got {args.max_lr}")
    if not 0 < args.lr_decay <= 1:
        raise UsageError(f"--lr-decay must lie in (0, 1], got {args.lr_decay}")
    if args.adversarial_fraction is not None:
        if not 0 <= args.adversarial_fraction <= 1:
            raise UsageError(f"--adversarial-fraction must lie in [0, 1], got {args.adversarial_fraction}")
        if args.schedule == "abs" and args.adversarial_fraction > 0:
            raise UsageError("--schedule abs trains without adversarial examples; use --schedule absa")
    if args.epsilon is not None and not args.epsilon > 0:
        raise UsageError(f"--epsilon must be positive, got {args.epsilon}")
    if args.params:
        raise UsageError("--params does not apply to train: every trainable parameter is trained")
    if args.schedule == "fixed" and args.max_batch_size is not None and args.max_batch_size != args.batch_size:
        raise UsageError("--schedule fixed keeps --batch-size; drop --max-batch-size")


def _milestones(args: argparse.Namespace) -> tuple[int, ...]:
    if args.lr_milestones is None:
        e = args.epochs
        return tuple(sorted({m for m in (round(e / 3), round(2 * e / 3), round(8 * e / 9)) if 0 < m < e}))
    if args.lr_milestones.strip().lower() == "none":
        return ()
    try:
        milestones = tuple(int(x) for x in args.lr_milestones.split(",") if x.strip())
    except ValueError:
        raise UsageError(f"--lr-milestones must be comma-separated epochs or 'none', got {args.lr_milestones!r}") \
            from None
    if any(m < 1 for m in milestones):
        raise UsageError(f"--lr-milestones must be positive epochs, got {args.lr_milestones!r}")
    return milestones






def _controller(args: argparse.Namespace, num_samples: int, saved: dict | None) -> AdaptiveBatchSize:
    """The controller of the flags; with ``saved`` (a resumed run's config) the defaults that derive
    from --epochs (milestones, adversarial epochs) are the saved run's.
    """
    if args.schedule in ("fixed", "slq"):
        max_batch = args.batch_size
    elif args.max_batch_size is None:
        max_batch = min(128 * args.batch_size, num_samples)
    else:
        max_batch = args.max_batch_size
    if max_batch > num_samples or args.batch_size > num_samples:
        flag = "--batch-size" if args.batch_size > num_samples else "--max-batch-size"
        raise UsageError(f"{flag} {max(max_batch, args.batch_size)} exceeds the {num_samples} training samples: "
                         f"the full batch is the largest real batch; use {flag} <= {num_samples}")
    if max_batch < args.batch_size:
        raise UsageError(f"--max-batch-size ({max_batch}) must be >= --batch-size ({args.batch_size})")
    fraction = args.adversarial_fraction if args.adversarial_fraction is not None else \
        (0.2 if args.schedule == "absa" else 0.0)
    return AdaptiveBatchSize(
        args.batch_size, args.lr, max_batch_size=max_batch, ratio=args.ratio, patience=args.patience or None,
        adversarial_fraction=fraction,
        adversarial_epochs=args.adversarial_epochs if args.adversarial_epochs is not None else
        saved.get("adversarial_epochs") if saved is not None else args.epochs // 2,
        lr_milestones=() if args.schedule == "slq" else _milestones(args) if saved is None or args.lr_milestones
        is not None else
        tuple(saved.get("lr_milestones", ())), lr_decay=args.lr_decay, max_lr=args.max_lr,
        warmup_epochs=args.warmup_epochs, adaptive=args.schedule not in ("fixed", "slq"))


def _load_state(path: str, device: torch.device) -> dict:
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as err:
        raise UsageError(f"--resume {path}: cannot read it ({type(err).__name__}: {err})") from err
    if isinstance(state, dict) and isinstance(state.get("run"), dict):
        raise UsageError(f"--resume {path} was written by secondorder train --optimizer "
                         f"{state['run'].get('optimizer')}: resume it with that --optimizer")
    if not isinstance(state, dict) or not isinstance(state.get("controller"), dict) \
            or not isinstance(state["controller"].get("config"), dict):
        raise UsageError(f"--resume {path} is not a {STATE_FILE} written by secondorder train")
    return state


def _resume(trainer: AdaptiveBatchTrainer, state: dict, path: str, epochs: int) -> None:
    try:
        trainer.load_state_dict(state)
    except (ValueError, RuntimeError, KeyError, TypeError) as err:
        raise UsageError(f"--resume {path} does not match this run: {str(err).strip().splitlines()[0]}") from err
    if trainer.controller.epoch >= epochs:
        raise UsageError(f"--resume {path} has already trained {trainer.controller.epoch} epochs; "
                         f"raise --epochs above that")


def _csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(CSV_COLUMNS), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row[k] is None else row[k] for k in CSV_COLUMNS})
    return buf.getvalue()


def _plot(path: Path, rows: list[dict], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    batches = [r["batch_size"] for r in rows]
    axes[0].step(epochs, batches, where="post")
    axes[0].set_yscale("log", base=2)
    axes[0].set_yticks(sorted(set(batches)), [str(b) for b in sorted(set(batches))])
    axes[0].minorticks_off()
    axes[0].set_ylabel("batch size")
    eig = [(r["epoch"], r["top_eigenvalue"]) for r in rows if r["top_eigenvalue"] is not None]
    if eig:
        axes[1].plot(*zip(*eig), "o-", ms=3)
    for r in rows:
        if r["batch_increase"]:
            axes[1].axvline(r["epoch"], color="grey", lw=0.6, ls=":" if r["batch_increase"] == "patience" else "-")
    axes[1].set_ylabel("top Hessian eigenvalue (eigenvalue batch)")
    acc = [(r["epoch"], r["test_accuracy"]) for r in rows if r["test_accuracy"] is not None]
    if acc:
        axes[2].plot(*zip(*acc), "o-", ms=3, color="tab:green")
        axes[2].set_ylabel("test accuracy")
    else:
        axes[2].plot(epochs, [r["train_loss"] for r in rows], "o-", ms=3, color="tab:red")
        axes[2].set_ylabel("train loss")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(True, alpha=0.3)
    axes[1].set_title("vertical lines: batch increases (solid: eigenvalue halved, dotted: patience)", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)




def _table(summary: dict, rows: list[dict], out: Path) -> str:
    c = summary["context"]
    lines = [f"secondorder train: {c['schedule']} on {c['model']}",
             f"{'epoch':>5}  {'batch':>6}  {'lr':>8}  {'top eig':>9}  {'adv':>6}  {'train loss':>10}  "
             f"{'test acc':>8}  {'iterations':>10}  increase"]
    lines += [f"{r['epoch']:>5}  {r['batch_size']:>6}  {r['lr']:>8.4g}  {fmt(r['top_eigenvalue'], '>9.4g')}  "
              f"{r['adversarial_fraction']:>6.3g}  {r['train_loss']:>10.4f}  {fmt(r['test_accuracy'], '>8.4f')}  "
              f"{r['iterations']:>10}  {r['batch_increase']}" for r in rows]
    f = summary["final"]
    lines.append(f"final: test accuracy {fmt(f['test_accuracy'], '.4f')}, {f['iterations']} iterations, batch "
                 f"{f['batch_size']}; outputs: {out} (epochs.csv, schedule.png, summary.json, {STATE_FILE})")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> tuple[dict, str]:
    """The ``train`` command: its summary and the text to print."""
    with output_directory(args) as tmp:  # --out first, before any work
        assert tmp is not None
        return _run(args, tmp)


def _run(args: argparse.Namespace, tmp: Path) -> tuple[dict, str]:
    _options(args)
    if args.optimizer == "kfac":
        return train_kfac.run_kfac(args, tmp)
    if args.optimizer != "sgd":
        return _run_newton(args, tmp)
    _check(args)
    device = device_of(args)
    start = time.perf_counter()
    model, loss_fn, train, test, context = problem(args, device)
    state = _load_state(args.resume, device) if args.resume else None
    controller = _controller(args, len(train[0]), None if state is None else state["controller"]["config"])
    epsilon = args.epsilon
    if epsilon is None:
        x = train[0]
        epsilon = 0.005 * float(x.max() - x.min()) if x.is_floating_point() and x.numel() else 0.005
        epsilon = epsilon if epsilon > 0 else 0.005
    trainer = AdaptiveBatchTrainer(model, loss_fn, train, controller, test_data=test,
                                   max_micro_batch=args.max_micro_batch, epsilon=epsilon,
                                   eigen_batch_size=args.eigen_batch, eigen_max_matvecs=args.eigen_matvecs,
                                   seed=args.seed, progress=not args.quiet, track_eigenvalue=args.schedule != "slq")
    learner = _slq_learner(args, trainer, train) if args.schedule == "slq" else None
    if state is not None:
        _resume_slq(learner, state, args.resume)
        _resume(trainer, state, args.resume, args.epochs)
    try:
        history = trainer.train(args.epochs - controller.epoch)
    except FloatingPointError as err:
        if learner is None or not learner.records:
            raise
        r = learner.records[-1]
        raise UsageError(f"the training loss is not finite at step {learner.steps} with the SLQ learner's lr {r.lr:.4g} "
                         f"and momentum {r.momentum:.4g} (set at step {r.step} for lambda_max {r.lambda_max:.4g}): "
                         "the heavy-ball optimum sits at the edge of stability, and the curvature rose past it; "
                         "refresh more often (--slq-every) or take smaller steps (--slq-lr-factor 0.5)") from err
    rows = [asdict(r) for r in history]
    if learner is not None:
        _slq_rows(rows, learner.records)
    context.update({"schedule": args.schedule, "epochs": args.epochs, "base batch size": controller.base_batch_size,
                    "max batch size": controller.max_batch_size, "base lr": controller.base_lr,
                    "lr milestones": list(controller.lr_milestones), "lr decay": controller.lr_decay,
                    "max lr": controller.max_lr, "warmup epochs": controller.warmup_epochs,
                    "ratio": controller.ratio, "patience": controller.patience,
                    "adversarial fraction": controller.initial_adversarial_fraction,
                    "adversarial epochs": controller.adversarial_epochs, "epsilon": epsilon,
                    "max micro batch": args.max_micro_batch, "eigenvalue batch": trainer.eigen_batch_size,
                    "optimizer": "SGD, momentum 0.9" if learner is None else
                    "SGD, lr and momentum from the SLQ learner", "seed": args.seed, "resumed from": args.resume,
                    "machine": describe(device), "total seconds": round(time.perf_counter() - start, 2)})
    last = rows[-1]
    summary = {"context": context,
               "final": {k: last[k] for k in ("test_accuracy", "test_loss", "train_loss", "iterations", "batch_size",
                                               "lr")},
               "batch_increases": [{"after_epoch": r["epoch"], "reason": r["batch_increase"]}
                                   for r in rows if r["batch_increase"]],
               "epochs": rows}
    (tmp / "epochs.csv").write_text(_csv(rows))
    _plot(tmp / "schedule.png", rows, f"secondorder train --schedule {args.schedule}: {context['model']}")
    (tmp / "summary.json").write_text(json.dumps(summary, indent=2))
    if learner is not None:
        _slq_outputs(summary, learner, tmp)
    torch.save({**trainer.state_dict(), **({} if learner is None else {"slq": learner.state_dict()})},
               tmp / STATE_FILE)
    table = _table(summary, rows, args.out)
    if learner is not None:
        r = learner.records[-1]
        table += (f"\nslq: {len(learner.records)} refreshes every {learner.every} steps; the last (step {r.step}): "
                  f"lambda_max {r.lambda_max:.4g}, lambda_min {r.lambda_min:.4g}, lr {r.lr:.4g}, momentum "
                  f"{r.momentum:.4g} (slq.csv)")
    return summary, table


# ---- --schedule slq ----------------------------------------------------------------------------------
def _slq_learner(args: argparse.Namespace, trainer: AdaptiveBatchTrainer, train) -> SLQLearningRate:
    """The learner on the trainer's SGD, run before every optimizer step (an optimizer pre-hook), so its
    values replace the controller's fixed lr at every step; refresh batches from the training set.
    """
    n = len(train[0])
    every = args.slq_every if args.slq_every is not None else math.ceil(n / args.batch_size)
    with user_input("--schedule slq"):
        learner = SLQLearningRate(trainer.optimizer, trainer.model, trainer.loss_fn, train, every=every,
                                  num_steps=args.slq_steps, batch_size=min(args.slq_batch, n),
                                  max_micro_batch=args.max_micro_batch, lr_factor=args.slq_lr_factor,
                                  seed=(args.seed + 2) % (MAX_SEED + 1))
    def before_step(*_: Any) -> None:
        learner.step()

    trainer.optimizer.register_step_pre_hook(before_step)
    return learner


def _resume_slq(learner: SLQLearningRate | None, state: dict, path: str) -> None:
    """Refuse a state of the other kind of schedule (slq's has the learner under "slq")."""
    if (learner is None) == ("slq" in state):
        written = "slq" if "slq" in state else "absa, abs or fixed"
        raise UsageError(f"--resume {path} was written by --schedule {written}: resume it with that --schedule")
    if learner is not None:
        try:
            learner.load_state_dict(state["slq"])
        except (ValueError, KeyError, TypeError, RuntimeError) as err:
            raise UsageError(f"--resume {path} does not match this run: {str(err).strip().splitlines()[0]}") from err


def _slq_rows(rows: list[dict], records: tuple[SLQRecord, ...]) -> None:
    """An epoch's lr and top eigenvalue with slq: those of the refresh in force at its last step."""
    for row in rows:
        last = [r for r in records if r.step < row["iterations"]][-1]
        row["lr"], row["top_eigenvalue"] = last.lr, last.lambda_max


def _slq_outputs(summary: dict, learner: SLQLearningRate, tmp: Path) -> None:
    refreshes = [{k: finite(v) for k, v in asdict(r).items()} for r in learner.records]
    summary["context"]["slq"] = {"every": learner.every, "lanczos steps": learner.num_steps,
                                 "batch": learner.batch_size, "lambda_min": f"{learner.quantile:g} quantile of the "
                                 "positive part of the SLQ density", "max momentum": learner.max_momentum,
                                 "smoothing": learner.smoothing, "lr factor": learner.lr_factor,
                                 "model mode": "eval"}
    summary["context"]["base lr"] = "learned (slq)"
    summary["final"]["momentum"] = learner.momentum
    summary["slq_refreshes"] = refreshes
    (tmp / "slq.csv").write_text(rows_csv(refreshes, SLQ_COLUMNS))


# ---- the Newton-type optimizers ----------------------------------------------------------------------
CONFIG_FLAGS = {"optimizer": "--optimizer", "training samples": "training samples", "batch size": "--batch-size",
                "radius": "--radius", "sigma": "--sigma", "inexactness": "--inexactness",
                "hessian fraction": "--hessian-fraction", "curvature": "--curvature",
                "subproblem iterations": "--subproblem-iterations", "seed": "--seed"}
"""The settings a resumed Newton-type run must share with the run that wrote its state, and their flags."""


def _check_newton(args: argparse.Namespace) -> None:
    for flag, value in (("--epochs", args.epochs), ("--max-micro-batch", args.max_micro_batch),
                        ("--batch-size", args.batch_size), ("--subproblem-iterations", args.subproblem_iterations)):
        if value is not None and value < 1:
            raise UsageError(f"{flag} must be >= 1, got {value}")
    for flag, value in (("--radius", args.radius), ("--sigma", args.sigma)):
        if value is not None and not 0 < value < math.inf:
            raise UsageError(f"{flag} must be a positive finite number, got {value}")
    if args.inexactness is not None and not 0 < args.inexactness < 1:
        raise UsageError(f"--inexactness must lie in (0, 1), got {args.inexactness}")
    if args.hessian_fraction is not None and not 0 < args.hessian_fraction <= 1:
        raise UsageError(f"--hessian-fraction must lie in (0, 1], got {args.hessian_fraction}")
    if not 0 <= args.seed <= MAX_SEED:
        raise UsageError(f"--seed must lie in 0..2**62, got {args.seed}")
    if args.params:
        raise UsageError("--params does not apply to train: every trainable parameter is trained")


def _newton_settings(args: argparse.Namespace, num_samples: int) -> dict:
    """The resolved settings of a Newton-type run (what --resume checks), with the library's defaults."""
    method = METHODS[args.optimizer]
    batch = num_samples if args.batch_size is None else args.batch_size
    if batch > num_samples:
        raise UsageError(f"--batch-size {batch} exceeds the {num_samples} training samples: the full batch is the "
                         f"largest real batch; use --batch-size <= {num_samples} or leave it out (the full batch)")
    own = getattr(args, method.option)
    return {"optimizer": args.optimizer, "training samples": num_samples, "batch size": batch,
            method.option: float(method.default(method.option) if own is None else own),
            "hessian fraction": float(method.default("hessian_fraction") if args.hessian_fraction is None
                                      else args.hessian_fraction),
            "curvature": args.curvature or method.default("curvature"),
            "subproblem iterations": args.subproblem_iterations or method.default(method.cap), "seed": args.seed}


def _newton_optimizer(settings: dict, params: list[torch.Tensor]) -> SubsampledNewton:
    method = METHODS[settings["optimizer"]]
    with user_input(f"--optimizer {settings['optimizer']}"):
        return method.cls(params, **{method.option: settings[method.option]},
                          **{method.cap: settings["subproblem iterations"]},
                          hessian_fraction=settings["hessian fraction"], curvature=settings["curvature"],
                          seed=settings["seed"], distributed=False)


def _per_sample(loss_fn: Callable, name: str) -> Callable:
    """``losses(outputs, targets)``: the per-sample losses ``[n]`` from ``loss_fn(..., reduction="none")``
    (a sample's further dimensions averaged, as a mean loss averages them).
    """
    def losses(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        try:
            out = loss_fn(outputs, targets, reduction="none")
        except TypeError as err:
            raise UsageError(f"--loss {name} takes no reduction='none' ({err}): the Newton-type optimizers need "
                             "per-sample losses; use a built-in --loss or one with a reduction argument") from err
        if not isinstance(out, torch.Tensor) or out.ndim == 0 or out.shape[0] != len(targets):
            shape = f"shape {list(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__
            raise UsageError(f"--loss {name} with reduction='none' gave {shape}, not one loss per sample "
                             f"({len(targets)}): the Newton-type optimizers need per-sample losses")
        return out.reshape(out.shape[0], -1).mean(1) if out.ndim > 1 else out
    return losses


def _check_newton_problem(model: torch.nn.Module, loss_fn: Callable, per_sample: Callable, train, test,
                          device: torch.device, chunk: int, name: str) -> None:
    """One forward of a first micro-batch: per-sample losses that average to the mean loss, a test set that fits."""
    x, y = to_device((train[0][:chunk], train[1][:chunk]), device)
    with torch.no_grad():
        out = call_model(model, x)
        mean, per = loss_fn(out, y), per_sample(out, y)
        if not bool(torch.isfinite(per).all()):
            raise UsageError(f"the loss of the first {len(y)} training samples is not finite "
                             f"({float(per.mean()):.6g}): check the data and the model")
        if not torch.allclose(per.mean(), mean, rtol=1e-4, atol=1e-6):
            raise UsageError(f"--loss {name}: its reduction='none' losses average to {float(per.mean()):.6g}, not to "
                             f"its mean loss {float(mean):.6g}; the Newton-type optimizers need per-sample losses")
        if test is not None:
            try:
                tx, ty = to_device((test[0][:chunk], test[1][:chunk]), device)
                loss_fn(call_model(model, tx), ty)
            except Exception as err:
                raise UsageError(f"the model rejected the first batch of --test-data: {type(err).__name__}: "
                                 f"{str(err).strip().splitlines()[0]}") from err


def _closure(model: torch.nn.Module, per_sample: Callable, x: torch.Tensor, y: torch.Tensor, chunk: int,
             gauss_newton: bool) -> Callable:
    """The optimizers' closure on the batch ``(x, y)``: forward passes of at most ``chunk`` samples."""
    def closure(indices: torch.Tensor | None = None):
        xs, ys = (x, y) if indices is None else (x[indices.to(x.device)], y[indices.to(y.device)])
        outs = [call_model(model, xs[s:s + chunk]) for s in range(0, len(xs), chunk)]
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        losses = per_sample(out, ys)
        return (losses, out) if gauss_newton else losses
    return closure










def _run_newton(args: argparse.Namespace, tmp: Path) -> tuple[dict, str]:
    from tqdm import tqdm

    _check_newton(args)
    device = device_of(args)
    start = time.perf_counter()
    model, loss_fn, train, test, context = problem(args, device)
    settings = _newton_settings(args, len(train[0]))
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise UsageError("the model has no trainable parameters")
    name = args.loss if wants_own_model(args) else "cross_entropy"
    per_sample = _per_sample(loss_fn, name)
    model.eval()  # a deterministic loss: the ratio test and the line search compare values
    _check_newton_problem(model, loss_fn, per_sample, train, test, device, args.max_micro_batch, name)
    optimizer = _newton_optimizer(settings, params)
    order_generator = torch.Generator().manual_seed(args.seed)
    epochs: list[dict] = []
    steps: list[dict] = []
    if args.resume:
        state = load_run_state(args.resume, device, args.optimizer)
        resume_run(state, args.resume, settings, CONFIG_FLAGS, args.epochs, model, optimizer, order_generator)
        epochs, steps = list(state["epochs"]), list(state["steps"])
    method = METHODS[args.optimizer]
    x, y = to_device((train[0], train[1]), device)
    n, batch = len(x), settings["batch size"]
    per_epoch = math.ceil(n / batch)
    gauss_newton = settings["curvature"] == "gauss-newton"
    total = steps[-1]["total_propagations"] if steps else 0
    products = sum(s["hessian_products"] for s in steps)
    bar = tqdm(total=(args.epochs - len(epochs)) * per_epoch, desc="training", unit="step", disable=args.quiet,
               leave=False, file=sys.stderr, dynamic_ncols=True)
    try:
        for epoch in range(len(epochs) + 1, args.epochs + 1):
            epoch_start = time.perf_counter()
            order = None if batch == n else torch.randperm(n, generator=order_generator)
            weighted, accepted = 0.0, 0
            for first in range(0, n, batch):
                if order is None:
                    bx, by = x, y
                else:
                    idx = order[first:first + batch].to(x.device)
                    bx, by = x[idx], y[idx]
                step_start = time.perf_counter()
                try:
                    optimizer.step(_closure(model, per_sample, bx, by, args.max_micro_batch, gauss_newton))
                except FloatingPointError as err:
                    raise UsageError(f"step {len(steps) + 1} (epoch {epoch}): {err}") from err
                record = optimizer.last_step
                assert isinstance(record, NewtonStep), "set by every step"
                total, products = total + record.propagations, products + record.hessian_products
                steps.append({"step": len(steps) + 1, "epoch": epoch,
                              **{k: finite(v) for k, v in record.to_dict().items()},
                              "total_propagations": total, "seconds": round(time.perf_counter() - step_start, 4)})
                weighted += record.new_loss * record.samples
                accepted += record.accepted
                bar.update()
                value = getattr(record, method.parameter)
                bar.set_postfix_str(f"epoch {epoch}/{args.epochs}, loss {record.new_loss:.4f}, "
                                    f"{method.parameter} {value:.3g}"
                                    + ("" if not epochs or epochs[-1]["test_accuracy"] is None
                                       else f", acc {epochs[-1]['test_accuracy']:.3f}"))
            test_loss, test_accuracy = evaluate(model, loss_fn, test, device, args.max_micro_batch)
            last = steps[-1]
            epochs.append({"epoch": epoch, "iterations": len(steps), "accepted": accepted, "train_loss": weighted / n,
                           "test_loss": test_loss, "test_accuracy": test_accuracy, "radius": last["radius"],
                           "sigma": last["sigma"], "step_size": last["step_size"], "propagations": total,
                           "hessian_products": products, "seconds": round(time.perf_counter() - epoch_start, 3)})
    finally:
        bar.close()
    context.update({
        "optimizer": f"{method.cls.__name__} (--optimizer {args.optimizer}, sub-problem by {method.solver})",
        "epochs": args.epochs, "batch size": batch,
        "batch": "the whole training set (full gradient)" if batch == n else
        f"{per_epoch} reshuffled batches per epoch" + ("" if n % batch == 0 else f" (the last one {n % batch} samples)"),
        "hessian fraction": settings["hessian fraction"],
        "hessian samples per step": batch if settings["hessian fraction"] == 1 else
        max(1, math.ceil(settings["hessian fraction"] * batch)),
        "curvature": settings["curvature"],
        method.option if method.option == "inexactness" else f"initial {method.option}": settings[method.option],
        "subproblem iterations": settings["subproblem iterations"], "max micro batch": args.max_micro_batch,
        "model mode": "eval (a deterministic loss for the ratio test and the line search)", "seed": args.seed,
        "resumed from": args.resume, "machine": describe(device),
        "total seconds": round(time.perf_counter() - start, 2)})
    final = epochs[-1]
    summary = {"context": context,
               "final": {**{k: final[k] for k in ("test_accuracy", "test_loss", "train_loss", "iterations")},
                         "accepted": sum(bool(s["accepted"]) for s in steps), "propagations": total,
                         method.parameter: final[method.parameter]},
               "epochs": epochs, "steps": steps}
    (tmp / "steps.csv").write_text(rows_csv(steps, NEWTON_STEP_COLUMNS))
    (tmp / "epochs.csv").write_text(rows_csv(epochs, NEWTON_EPOCH_COLUMNS))
    _plot_newton(tmp / "training.png", steps, epochs, method.parameter,
                 f"secondorder train --optimizer {args.optimizer}: {context['model']}")
    (tmp / "summary.json").write_text(json.dumps(summary, indent=2, allow_nan=False))
    torch.save({"run": {"optimizer": args.optimizer, "config": settings}, "model": model.state_dict(),
                "optimizer": optimizer.state_dict(), "order_generator": order_generator.get_state(),
                "epochs": epochs, "steps": steps}, tmp / STATE_FILE)
    return summary, _newton_table(summary, method, args)




def _plot_newton(path: Path, steps: list[dict], epochs: list[dict], parameter: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    axes[0].plot([s["total_propagations"] for s in steps], [s["new_loss"] for s in steps], ".-", ms=3, lw=1)
    rejected = [(s["total_propagations"], s["new_loss"]) for s in steps if not s["accepted"]]
    if rejected:
        axes[0].plot(*zip(*rejected), "x", color="tab:red", ms=5, label="no step taken")
        axes[0].legend(fontsize=8)
    if all(s["new_loss"] > 0 for s in steps):
        axes[0].set_yscale("log")
    axes[0].ticklabel_format(axis="x", style="sci", scilimits=(0, 0))
    axes[0].set_xlabel("propagations (forward 1, forward + backward 2, per sample)")
    axes[0].set_ylabel("training loss of the batch after the step")
    values = [(s["step"], s[parameter]) for s in steps if s[parameter] is not None and s[parameter] > 0]
    if values:
        axes[1].plot(*zip(*values), ".-", ms=3, lw=1, color="tab:purple")
        axes[1].set_yscale("log")
    axes[1].set_xlabel("step")
    axes[1].set_ylabel({"radius": "trust-region radius", "sigma": "cubic regularization sigma",
                        "step_size": "line-search step size"}[parameter] + " after the step")
    accuracy = [(r["epoch"], r["test_accuracy"]) for r in epochs if r["test_accuracy"] is not None]
    if accuracy:
        axes[2].plot(*zip(*accuracy), "o-", ms=3, color="tab:green")
        axes[2].set_ylabel("test accuracy")
    else:
        axes[2].plot([r["epoch"] for r in epochs], [r["train_loss"] for r in epochs], "o-", ms=3, color="tab:red")
        axes[2].set_ylabel("train loss")
    axes[2].set_xlabel("epoch")
    for ax in axes:
        ax.grid(True, alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _newton_table(summary: dict, method: Method, args: argparse.Namespace) -> str:
    c, p = summary["context"], method.parameter
    lines = [f"secondorder train: {c['optimizer']} on {c['model']}, batch {c['batch size']}",
             f"{'epoch':>5}  {'iterations':>10}  {'accepted':>8}  {'train loss':>10}  {'test acc':>8}  {p:>9}  "
             f"{'propagations':>12}"]
    lines += [f"{r['epoch']:>5}  {r['iterations']:>10}  {r['accepted']:>8}  {r['train_loss']:>10.4f}  "
              f"{fmt(r['test_accuracy'], '.4f'):>8}  {fmt(r[p], '.4g'):>9}  {r['propagations']:>12}"
              for r in summary["epochs"]]
    f = summary["final"]
    lines.append(f"final: test accuracy {fmt(f['test_accuracy'], '.4f')}, {f['iterations']} iterations "
                 f"({f['accepted']} accepted), {f['propagations']} propagations; outputs: {args.out} (steps.csv, "
                 f"epochs.csv, training.png, summary.json, {STATE_FILE})")
    return "\n".join(lines)
