"""What the optimizers of ``secondorder train`` share: the problem (a factory's or the embedded
MNIST-1D CNN), its evaluation, the records as CSV and the resumable state of a run on a fixed batch
size (``{"run": {"optimizer", "config"}, "model", "optimizer", "order_generator", "epochs", "steps"}``).
"""

from __future__ import annotations

import argparse
import csv
import io
import math
from typing import Any, Callable

import torch

from secondorder.cli.common import UsageError, call_factory, own_problem, wants_own_model
from secondorder.data import as_batches, call_model, to_device

STATE_FILE = "trainer_state.pt"


def tensors(data, option: str) -> tuple[torch.Tensor, torch.Tensor]:
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


def problem(args: argparse.Namespace, device: torch.device):
    """``(model, loss_fn, train, test, context)``: the factories' problem or the embedded MNIST-1D CNN."""
    import torch.nn.functional as F

    if wants_own_model(args):
        model, loss_fn, data, _, context = own_problem(args, device)
        train = tensors(data, "--data")
        test = tensors(call_factory(args.test_data, "--test-data"), "--test-data") if args.test_data else None
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


def fmt(x, spec: str) -> str:
    """``x`` formatted, ``-`` for ``None``."""
    return "-" if x is None else format(x, spec)


def evaluate(model: torch.nn.Module, loss_fn: Callable, test, device: torch.device,
             chunk: int) -> tuple[float | None, float | None]:
    """Mean test loss and, for ``[N, C]`` outputs and class-index targets, accuracy (no grad), as the SGD path."""
    if test is None:
        return None, None
    x, y = test
    total = correct = 0.0
    classify = True
    with torch.no_grad():
        for start in range(0, len(x), chunk):
            xb, yb = to_device((x[start:start + chunk], y[start:start + chunk]), device)
            out = call_model(model, xb)
            total += float(loss_fn(out, yb)) * len(yb)
            classify = classify and out.ndim == 2 and yb.ndim == 1 and not yb.is_floating_point()
            if classify:
                correct += float((out.argmax(-1) == yb).sum())
    return total / len(x), (correct / len(x) if classify else None)


def finite(value: Any) -> Any:
    """A record's value for strict JSON: a non-finite float (Newton-MR's ratio) as None."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def load_run_state(path: str, device: torch.device, optimizer: str) -> dict:
    """The state of ``--resume path``, checked to be a run of ``optimizer`` on a fixed batch size."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as err:
        raise UsageError(f"--resume {path}: cannot read it ({type(err).__name__}: {err})") from err
    written = "sgd" if isinstance(state, dict) and isinstance(state.get("controller"), dict) else \
        state["run"].get("optimizer") if isinstance(state, dict) and isinstance(state.get("run"), dict) else None
    if written is not None and written != optimizer:
        raise UsageError(f"--resume {path} was written by secondorder train --optimizer {written}: resume it with "
                         f"that --optimizer")
    if written is None or not {"model", "optimizer", "order_generator", "epochs", "steps"} <= set(state):
        raise UsageError(f"--resume {path} is not a {STATE_FILE} written by secondorder train")
    return state


def resume_run(state: dict, path: str, settings: dict, flags: dict[str, str], epochs: int, model: torch.nn.Module,
                   optimizer: torch.optim.Optimizer, order: torch.Generator) -> None:
    """Load a run's state after checking its ``settings`` (``flags`` name them in the errors) and epochs."""
    saved = state["run"].get("config", {})
    for key, value in settings.items():
        if saved.get(key) != value:
            raise UsageError(f"--resume {path} does not match this run: {flags[key]} {saved.get(key)} there, "
                             f"{value} here")
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        order.set_state(state["order_generator"])
    except (ValueError, RuntimeError, KeyError, TypeError) as err:
        raise UsageError(f"--resume {path} does not match this run: {str(err).strip().splitlines()[0]}") from err
    if len(state["epochs"]) >= epochs:
        raise UsageError(f"--resume {path} has already trained {len(state['epochs'])} epochs; raise --epochs above that")


def rows_csv(rows: list[dict], columns: tuple[str, ...]) -> str:
    """The records as CSV text (``None`` as an empty cell)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row[k] is None else row[k] for k in columns})
    return buf.getvalue()
