"""``secondorder train``: training with an adaptive batch size from the top Hessian eigenvalue (ABS/ABSA).

Trains with SGD (momentum 0.9) under Yao et al.'s controller (arXiv:1810.01021, the rule of the
authors' HessianFlow code): after every epoch the top Hessian eigenvalue is measured on a fresh
batch of training samples; when it has fallen by --ratio since the last increase, or after
--patience epochs without one, the batch size and the learning rate are multiplied by 2, up to
--max-batch-size, large batches being reached by gradient accumulation. absa also replaces a
fraction of every batch by FGSM examples (halved at every increase, none in the second half of
training); abs does not; fixed keeps --batch-size. Without --model it trains the MNIST-1D CNN.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch

from secondorder.cli.common import (
    FACTORIES_HELP,
    UsageError,
    add_model_options,
    add_output_options,
    call_factory,
    device_of,
    output_directory,
    own_problem,
    wants_own_model,
)
from secondorder.data import as_batches
from secondorder.environment import describe
from secondorder.schedules import AdaptiveBatchSize, AdaptiveBatchTrainer

SCHEDULES = ("absa", "abs", "fixed")
STATE_FILE = "trainer_state.pt"
CSV_COLUMNS = ("epoch", "batch_size", "lr", "top_eigenvalue", "adversarial_fraction", "train_loss", "test_accuracy",
               "iterations", "test_loss", "steps", "batch_increase")

EPILOG = """\
examples:
  secondorder train                                     ABSA on the MNIST-1D CNN, 90 epochs, from batch 128
  secondorder train --schedule abs --epochs 30 --quiet  ABS (no adversarial examples)
  secondorder train --schedule fixed --batch-size 2048 --lr 1.6 --warmup-epochs 5
                                                        plain large batch, linearly scaled lr with warm-up
  secondorder train --model mypkg.nets:make --data mypkg.data:train --test-data mypkg.data:test \\
                    --batch-size 64 --lr 0.05 --max-batch-size 4096 --out run/
  secondorder train --epochs 120 --resume run/trainer_state.pt --out run/   continue a run to 120 epochs

the rule (HessianFlow's defaults): eigenvalue on --eigen-batch 128 fresh training samples each
epoch (Lanczos, eval mode); grow when it is <= reference / --ratio (2) or after --patience (10)
epochs; the learning rate follows the batch linearly (capped by --max-lr if given), times
--lr-decay (0.2) after each of --lr-milestones (default 1/3, 2/3 and 8/9 of --epochs, as 30/60/80
of 90); FGSM fraction --adversarial-fraction (0.2 for absa), step --epsilon (default 0.005 times
the range of the training inputs: HessianFlow's 0.005 on [0, 1] images).
outputs (in --out): epochs.csv (epoch, batch_size, lr, top_eigenvalue, adversarial_fraction,
train_loss, test_accuracy, iterations, test_loss, steps, batch_increase), schedule.png (batch size,
top eigenvalue and test accuracy over epochs), summary.json, trainer_state.pt (for --resume).
"""


def add_parser(sub) -> None:
    """Register ``train`` on the subcommand parsers."""
    t = sub.add_parser("train", help="adaptive batch size from the Hessian (ABS/ABSA) with FGSM mixing",
                       description=__doc__.split("\n\n")[1], epilog=EPILOG + FACTORIES_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_options(t)
    t.add_argument_group("evaluation").add_argument(
        "--test-data", metavar="MODULE:FACTORY", help="factory returning test batches (accuracy per epoch)")
    s = t.add_argument_group("schedule")
    s.add_argument("--schedule", choices=SCHEDULES, default="absa", help="(default: absa)")
    s.add_argument("--epochs", type=int, default=90, help="training epochs (default: 90)")
    s.add_argument("--batch-size", type=int, default=128, help="initial batch size (default: 128)")
    s.add_argument("--lr", type=float, default=0.1, help="learning rate at --batch-size (default: 0.1)")
    s.add_argument("--max-batch-size", type=int,
                   help="cap (default: 128 x --batch-size, at most the number of training samples)")
    s.add_argument("--ratio", type=float, default=2.0, help="eigenvalue decrease that grows the batch (default: 2)")
    s.add_argument("--patience", type=int, default=10,
                   help="epochs without growth after which the batch grows anyway, 0 for never (default: 10)")
    s.add_argument("--lr-milestones", metavar="E1,E2,...",
                   help="epochs after which the lr is multiplied by --lr-decay, 'none' for a constant lr "
                        "(default: 1/3, 2/3 and 8/9 of --epochs)")
    s.add_argument("--lr-decay", type=float, default=0.2, help="(default: 0.2)")
    s.add_argument("--max-lr", type=float, help="cap of the linearly scaled learning rate (default: none)")
    s.add_argument("--warmup-epochs", type=int, default=0, help="linear lr warm-up (default: 0)")
    s.add_argument("--adversarial-fraction", type=float, help="FGSM fraction (default: 0.2 for absa, else 0)")
    s.add_argument("--adversarial-epochs", type=int, help="epochs with FGSM examples (default: half of --epochs)")
    s.add_argument("--epsilon", type=float, help="FGSM step (default: 0.005 x the range of the training inputs)")
    c = t.add_argument_group("computation")
    c.add_argument("--max-micro-batch", type=int, default=128,
                   help="largest forward pass; bigger batches are accumulated (default: 128)")
    c.add_argument("--eigen-batch", type=int, default=128, help="samples for the eigenvalue (default: 128)")
    c.add_argument("--eigen-matvecs", type=int, default=20, help="Lanczos products per eigenvalue (default: 20)")
    c.add_argument("--seed", type=int, default=0, help="seed of initialisation, data order and probes (default: 0)")
    c.add_argument("--resume", metavar="PATH", help="trainer_state.pt of an earlier run with the same settings")
    add_output_options(t, "secondorder-train")
    t.set_defaults(run=run)


def _check(args: argparse.Namespace) -> None:
    for flag, value, low in (("--epochs", args.epochs, 1), ("--batch-size", args.batch_size, 1),
                             ("--max-micro-batch", args.max_micro_batch, 1), ("--eigen-batch", args.eigen_batch, 1),
                             ("--eigen-matvecs", args.eigen_matvecs, 1), ("--patience", args.patience, 0),
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


def _tensors(data, option: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One ``(inputs, targets)`` pair of tensors from a batch or a re-iterable of batches."""
    try:
        batches = list(as_batches(data))
    except (TypeError, ValueError) as err:
        raise UsageError(f"{option}: {err}") from err
    if not batches or not all(isinstance(b, (tuple, list)) and len(b) == 2 and all(isinstance(t, torch.Tensor)
                                                                                  for t in b) for b in batches):
        raise UsageError(f"{option} must give (inputs, targets) tensor batches")
    try:
        return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    except RuntimeError as err:
        raise UsageError(f"{option}: the batches do not concatenate ({str(err).splitlines()[0]})") from err


def _problem(args: argparse.Namespace, device: torch.device):
    import torch.nn.functional as F

    if wants_own_model(args):
        model, loss_fn, data, _, context = own_problem(args, device)
        train = _tensors(data, "--data")
        test = _tensors(call_factory(args.test_data, "--test-data"), "--test-data") if args.test_data else None
        context["test data"] = args.test_data or "none"
        return model, loss_fn, train, test, context
    if args.test_data:
        raise UsageError("--test-data needs --model and --data (the default model has its own test set)")
    from secondorder.datasets import Mnist1dCNN, load_mnist1d

    xtr, ytr, xte, yte = load_mnist1d()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        model = Mnist1dCNN()
    context = {"model": f"default: Mnist1dCNN ({sum(p.numel() for p in model.parameters())} parameters), "
                        f"initialised with seed {args.seed}",
               "data": f"MNIST-1D ({len(xtr)} train / {len(xte)} test)", "loss": "cross_entropy"}
    return model.to(device), F.cross_entropy, (xtr, ytr), (xte, yte), context


def _controller(args: argparse.Namespace, num_samples: int, saved: dict | None) -> AdaptiveBatchSize:
    """The controller of the flags; with ``saved`` (a resumed run's config) the defaults that derive
    from --epochs (milestones, adversarial epochs) are the saved run's.
    """
    if args.schedule == "fixed":
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
        lr_milestones=_milestones(args) if saved is None or args.lr_milestones is not None else
        tuple(saved.get("lr_milestones", ())), lr_decay=args.lr_decay, max_lr=args.max_lr,
        warmup_epochs=args.warmup_epochs, adaptive=args.schedule != "fixed")


def _load_state(path: str, device: torch.device) -> dict:
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as err:
        raise UsageError(f"--resume {path}: cannot read it ({type(err).__name__}: {err})") from err
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


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _table(summary: dict, rows: list[dict], out: Path) -> str:
    c = summary["context"]
    lines = [f"secondorder train: {c['schedule']} on {c['model']}",
             f"{'epoch':>5}  {'batch':>6}  {'lr':>8}  {'top eig':>9}  {'adv':>6}  {'train loss':>10}  "
             f"{'test acc':>8}  {'iterations':>10}  increase"]
    lines += [f"{r['epoch']:>5}  {r['batch_size']:>6}  {r['lr']:>8.4g}  {_fmt(r['top_eigenvalue'], '>9.4g')}  "
              f"{r['adversarial_fraction']:>6.3g}  {r['train_loss']:>10.4f}  {_fmt(r['test_accuracy'], '>8.4f')}  "
              f"{r['iterations']:>10}  {r['batch_increase']}" for r in rows]
    f = summary["final"]
    lines.append(f"final: test accuracy {_fmt(f['test_accuracy'], '.4f')}, {f['iterations']} iterations, batch "
                 f"{f['batch_size']}; outputs: {out} (epochs.csv, schedule.png, summary.json, {STATE_FILE})")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> tuple[dict, str]:
    """The ``train`` command: its summary and the text to print."""
    with output_directory(args) as tmp:  # --out first, before any work
        assert tmp is not None
        return _run(args, tmp)


def _run(args: argparse.Namespace, tmp: Path) -> tuple[dict, str]:
    _check(args)
    device = device_of(args)
    start = time.perf_counter()
    model, loss_fn, train, test, context = _problem(args, device)
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
                                   seed=args.seed, progress=not args.quiet)
    if state is not None:
        _resume(trainer, state, args.resume, args.epochs)
    history = trainer.train(args.epochs - controller.epoch)
    rows = [asdict(r) for r in history]
    context.update({"schedule": args.schedule, "epochs": args.epochs, "base batch size": controller.base_batch_size,
                    "max batch size": controller.max_batch_size, "base lr": controller.base_lr,
                    "lr milestones": list(controller.lr_milestones), "lr decay": controller.lr_decay,
                    "max lr": controller.max_lr, "warmup epochs": controller.warmup_epochs,
                    "ratio": controller.ratio, "patience": controller.patience,
                    "adversarial fraction": controller.initial_adversarial_fraction,
                    "adversarial epochs": controller.adversarial_epochs, "epsilon": epsilon,
                    "max micro batch": args.max_micro_batch, "eigenvalue batch": trainer.eigen_batch_size,
                    "optimizer": "SGD, momentum 0.9", "seed": args.seed, "resumed from": args.resume,
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
    torch.save(trainer.state_dict(), tmp / STATE_FILE)
    return summary, _table(summary, rows, args.out)
