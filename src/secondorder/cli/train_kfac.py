"""``secondorder train --optimizer kfac``: K-FAC (:class:`secondorder.optim.KFAC`; Martens & Grosse
2015, the knobs of Ma et al.'s large-batch study 2019) on reshuffled mini-batches of a fixed size.

Every step is one forward of the whole batch (K-FAC's factors come from the layers' inputs and
output gradients of that forward, so --max-micro-batch only splits the evaluation); the Linear,
Conv1d and Conv2d layers are preconditioned, every other trainable parameter takes the same
momentum step on its plain gradient. The model trains in train mode, as with SGD.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import re
import sys
import time
from pathlib import Path
from typing import Any

import torch

from secondorder.cli.common import UsageError, device_of
from secondorder.cli.training import STATE_FILE, evaluate, fmt, load_run_state, problem, resume_run, rows_csv
from secondorder.data import call_model, to_device
from secondorder.environment import describe
from secondorder.operators.kfac import covers
from secondorder.optim import KFAC
from secondorder.optim.kfac import FISHERS
from secondorder.validation import MAX_SEED

OPTIONS = ("momentum", "damping", "weight_decay", "kl_clip", "factor_every", "inverse_every", "factor_decay", "fisher")
"""The options only --optimizer kfac takes (besides --lr, which it shares with sgd)."""
EPOCHS = 30
BATCH_SIZE = 128
EPOCH_COLUMNS = ("epoch", "iterations", "train_loss", "test_loss", "test_accuracy", "seconds")
STEP_COLUMNS = ("step", "epoch", "loss", "factor_update", "inverse_update", "seconds")
CONFIG_FLAGS = {"optimizer": "--optimizer", "training samples": "training samples", "batch size": "--batch-size",
                "lr": "--lr", **{name.replace("_", " "): "--" + name.replace("_", "-") for name in OPTIONS},
                "seed": "--seed"}
"""The settings a resumed K-FAC run must share with the run that wrote its state, and their flags."""


def default(name: str) -> Any:
    """The library's default of a KFAC argument (the CLI's default too)."""
    return inspect.signature(KFAC).parameters[name].default


def _kl_clip(text: str) -> float | str:
    """A number, or ``"none"`` (KL clipping off; ``None`` is taken for "not given")."""
    if text.strip().lower() == "none":
        return "none"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number or 'none', got {text!r}") from None


def add_options(parser: argparse.ArgumentParser) -> None:
    """The K-FAC group of ``train``'s options (None when not given, so other optimizers refuse them)."""
    k = parser.add_argument_group("K-FAC (--optimizer kfac; --lr is its learning rate, default "
                                  f"{default('lr'):g}, --batch-size its batch, default {BATCH_SIZE})")
    k.add_argument("--damping", type=float,
                   help=f"lambda of the factored Tikhonov damping (default: {default('damping'):g})")
    k.add_argument("--momentum", type=float, help=f"heavy-ball momentum in [0, 1) (default: {default('momentum'):g})")
    k.add_argument("--weight-decay", type=float, help=f"(default: {default('weight_decay'):g})")
    k.add_argument("--kl-clip", type=_kl_clip, metavar="KAPPA|none",
                   help=f"KL clipping of the step, 'none' for off (default: {default('kl_clip'):g})")
    k.add_argument("--factor-every", type=int, metavar="N",
                   help=f"steps between factor updates (default: {default('factor_every')})")
    k.add_argument("--inverse-every", type=int, metavar="N",
                   help=f"steps between inversions of the damped factors (default: {default('inverse_every')})")
    k.add_argument("--factor-decay", type=float,
                   help=f"running-average decay of the factors, in [0, 1) (default: {default('factor_decay'):g})")
    k.add_argument("--fisher", choices=FISHERS,
                   help="mc: labels sampled from the model (the Fisher), empirical: the true labels, ggn: exact "
                        f"Gauss-Newton factors (default: {default('fisher')})")


def settings(args: argparse.Namespace, num_samples: int) -> dict:
    """The resolved settings of a K-FAC run (what --resume checks), with the library's defaults."""
    batch = BATCH_SIZE if args.batch_size is None else args.batch_size
    if args.batch_size is None:
        batch = min(batch, num_samples)
    elif batch > num_samples:
        raise UsageError(f"--batch-size {batch} exceeds the {num_samples} training samples: the full batch is the "
                         f"largest real batch; use --batch-size <= {num_samples}")
    if not 0 <= args.seed <= MAX_SEED:
        raise UsageError(f"--seed must lie in 0..2**62, got {args.seed}")
    for flag, value in (("--epochs", args.epochs), ("--batch-size", batch), ("--max-micro-batch", args.max_micro_batch)):
        if value < 1:
            raise UsageError(f"{flag} must be >= 1, got {value}")
    if args.params:
        raise UsageError("--params does not apply to train: every trainable parameter is trained")
    own = {name.replace("_", " "): default(name) if getattr(args, name) is None else getattr(args, name)
           for name in ("lr", *OPTIONS)}
    own["kl clip"] = None if own["kl clip"] == "none" else own["kl clip"]
    return {"optimizer": "kfac", "training samples": num_samples, "batch size": batch, **own, "seed": args.seed}


def _optimizer(model: torch.nn.Module, loss_fn, config: dict) -> KFAC:
    covered = {id(p) for m in model.modules() if covers(m) for p in m.parameters(recurse=False)}
    kwargs = {name: config[name.replace("_", " ")] for name in ("lr", *OPTIONS)}
    flags = {name: CONFIG_FLAGS[name.replace("_", " ")] for name in kwargs}
    try:
        return KFAC(model, loss_fn, **kwargs, params=lambda name, p: id(p) in covered, seed=config["seed"],
                    distributed=False)
    except (ValueError, TypeError) as err:
        message = str(err).strip().splitlines()[0]
        for name, flag in flags.items():  # name the flag, not the argument
            message = re.sub(rf"(?<![\w-]){name}\b", flag, message)
        raise UsageError(f"--optimizer kfac: {message}") from err


def _check_first_batch(model: torch.nn.Module, loss_fn, train, device: torch.device, size: int) -> None:
    with torch.no_grad():
        x, y = to_device((train[0][:size], train[1][:size]), device)
        loss = loss_fn(call_model(model, x), y)
    if not bool(torch.isfinite(loss).all()):
        raise UsageError(f"the loss of the first {len(y)} training samples is not finite ({float(loss):.6g}): check "
                         "the data and the model")


def run_kfac(args: argparse.Namespace, tmp: Path) -> tuple[dict, str]:
    """Train with K-FAC; write steps.csv, epochs.csv, training.png, summary.json and the state."""
    from tqdm import tqdm

    device = device_of(args)
    start = time.perf_counter()
    model, loss_fn, train, test, context = problem(args, device)
    config = settings(args, len(train[0]))
    if not any(covers(m) and any(p.requires_grad for p in m.parameters(recurse=False)) for m in model.modules()):
        raise UsageError("--optimizer kfac preconditions nn.Linear, nn.Conv1d and nn.Conv2d layers; the model has "
                         "no trainable one: use --optimizer sgd")
    _check_first_batch(model, loss_fn, train, device, min(config["batch size"], args.max_micro_batch))
    optimizer = _optimizer(model, loss_fn, config)
    order = torch.Generator().manual_seed(args.seed)
    epochs: list[dict] = []
    steps: list[dict] = []
    if args.resume:
        state = load_run_state(args.resume, device, "kfac")
        resume_run(state, args.resume, config, CONFIG_FLAGS, args.epochs, model, optimizer, order)
        epochs, steps = list(state["epochs"]), list(state["steps"])
    x, y = to_device((train[0], train[1]), device)
    n, batch = len(x), config["batch size"]
    bar = tqdm(total=(args.epochs - len(epochs)) * math.ceil(n / batch), desc="training", unit="step",
               disable=args.quiet, leave=False, file=sys.stderr, dynamic_ncols=True)
    model.train()
    try:
        for epoch in range(len(epochs) + 1, args.epochs + 1):
            epoch_start, weighted = time.perf_counter(), 0.0
            perm = torch.randperm(n, generator=order)
            for first in range(0, n, batch):
                idx = perm[first:first + batch].to(x.device)
                bx, by = x[idx], y[idx]
                step_start, number = time.perf_counter(), optimizer.num_steps + 1

                def closure(bx=bx, by=by):
                    out = call_model(model, bx)
                    return loss_fn(out, by), out

                try:
                    loss = float(optimizer.step(closure))
                except FloatingPointError as err:
                    raise UsageError(f"step {len(steps) + 1} (epoch {epoch}): {err}; try a smaller --lr or a larger "
                                     "--damping") from err
                steps.append({"step": len(steps) + 1, "epoch": epoch, "loss": loss,
                              "factor_update": (number - 1) % optimizer.factor_every == 0,
                              "inverse_update": (number - 1) % optimizer.inverse_every == 0,
                              "seconds": round(time.perf_counter() - step_start, 4)})
                weighted += loss * len(idx)
                bar.update()
                bar.set_postfix_str(f"epoch {epoch}/{args.epochs}, loss {loss:.4f}"
                                    + ("" if not epochs or epochs[-1]["test_accuracy"] is None
                                       else f", acc {epochs[-1]['test_accuracy']:.3f}"))
            model.eval()
            test_loss, test_accuracy = evaluate(model, loss_fn, test, device, args.max_micro_batch)
            model.train()
            epochs.append({"epoch": epoch, "iterations": len(steps), "train_loss": weighted / n, "test_loss": test_loss,
                           "test_accuracy": test_accuracy, "seconds": round(time.perf_counter() - epoch_start, 3)})
    finally:
        bar.close()
    context.update({"optimizer": f"KFAC (--optimizer kfac, fisher {config['fisher']})", "epochs": args.epochs,
                    **{k: v for k, v in config.items() if k not in ("optimizer", "seed")},
                    "preconditioned layers": [name for name, _ in optimizer.layers],
                    "plain parameters": optimizer.plain_parameters, "seed": args.seed, "resumed from": args.resume,
                    "machine": describe(device), "total seconds": round(time.perf_counter() - start, 2)})
    final = epochs[-1]
    summary = {"context": context,
               "final": {k: final[k] for k in ("test_accuracy", "test_loss", "train_loss", "iterations")},
               "epochs": epochs, "steps": steps}
    (tmp / "steps.csv").write_text(rows_csv(steps, STEP_COLUMNS))
    (tmp / "epochs.csv").write_text(rows_csv(epochs, EPOCH_COLUMNS))
    _plot(tmp / "training.png", steps, epochs, f"secondorder train --optimizer kfac: {context['model']}")
    (tmp / "summary.json").write_text(json.dumps(summary, indent=2, allow_nan=False))
    torch.save({"run": {"optimizer": "kfac", "config": config}, "model": model.state_dict(),
                "optimizer": optimizer.state_dict(), "order_generator": order.get_state(), "epochs": epochs,
                "steps": steps}, tmp / STATE_FILE)
    return summary, _table(summary, args.out)


def _plot(path: Path, steps: list[dict], epochs: list[dict], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    axes[0].plot([s["step"] for s in steps], [s["loss"] for s in steps], lw=0.6, alpha=0.6, label="batch loss")
    axes[0].plot([r["iterations"] for r in epochs], [r["train_loss"] for r in epochs], "o-", ms=3,
                 label="epoch mean")
    if all(s["loss"] > 0 for s in steps):
        axes[0].set_yscale("log")
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("training loss")
    axes[0].legend(fontsize=8)
    key = "test_accuracy" if any(r["test_accuracy"] is not None for r in epochs) else "test_loss"
    shown = [(r["epoch"], r[key]) for r in epochs if r[key] is not None]
    if shown:
        axes[1].plot(*zip(*shown), "o-", ms=3, color="tab:green")
    axes[1].set_xlabel("epoch")
    axes[1].set_ylabel(key.replace("_", " "))
    for ax in axes:
        ax.grid(True, alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _table(summary: dict, out: str) -> str:
    c = summary["context"]
    lines = [f"secondorder train: {c['optimizer']} on {c['model']}, batch {c['batch size']}, lr {c['lr']:g}, "
             f"damping {c['damping']:g}",
             f"{'epoch':>5}  {'iterations':>10}  {'train loss':>10}  {'test loss':>9}  {'test acc':>8}"]
    lines += [f"{r['epoch']:>5}  {r['iterations']:>10}  {r['train_loss']:>10.4f}  {fmt(r['test_loss'], '.4f'):>9}  "
              f"{fmt(r['test_accuracy'], '.4f'):>8}" for r in summary["epochs"]]
    f = summary["final"]
    lines.append(f"final: test accuracy {fmt(f['test_accuracy'], '.4f')}, {f['iterations']} iterations; outputs: "
                 f"{out} (steps.csv, epochs.csv, training.png, summary.json, {STATE_FILE})")
    return "\n".join(lines)
