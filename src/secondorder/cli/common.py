"""What the ``secondorder`` commands share: the user's model, data and loss from factories, ``--out``, errors.

Bad input raises :class:`UsageError` (one line, exit status 2, nothing written). ``--out`` is
checked before any work and replaced as a whole (:mod:`secondorder.cli.output`).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F

from secondorder.cli import output
from secondorder.cli.batches import WatchedBatches
from secondorder.cli.errors import UsageError
from secondorder.cli.output import atomic_directory

FACTORIES_HELP = """\
factories: MODULE:NAME is imported (the current directory is on the path) and called with no
arguments. --model's returns an nn.Module; --data's returns one (inputs, targets) batch or a
re-iterable of batches (a list, a DataLoader). --loss MODULE:NAME is used as loss(outputs, targets)
and must return the batch's mean loss.
exit status: 0 on success, 2 on bad input (one line on stderr naming the cause; nothing written).
"""

LOSSES: dict[str, Callable] = {
    "cross_entropy": F.cross_entropy,
    "mse": F.mse_loss,
    "bce": F.binary_cross_entropy_with_logits,  # on logits, the usual case
}


def load(spec: str, option: str) -> Any:
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


def call_factory(spec: str, option: str) -> Any:
    """Call the ``MODULE:NAME`` factory named by ``option``; its failure is a usage error."""
    try:
        return load(spec, option)()
    except UsageError:
        raise
    except Exception as err:
        raise UsageError(f"{option} {spec} failed: {type(err).__name__}: {err}") from err


def load_checkpoint(model: torch.nn.Module, path: str) -> dict:
    """Load the state dict at ``path`` into ``model`` (usage error if it does not fit); returns it."""
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


def loss_function(spec: str) -> Callable:
    """A built-in loss by name (``cross_entropy``, ...) or a ``MODULE:NAME`` callable."""
    return LOSSES[spec] if spec in LOSSES else load(spec, "--loss")


def check_forward(model: torch.nn.Module, loss_fn: Callable, data: Any, device: torch.device) -> Any:
    """One forward of the first batch, so that shape errors surface as one clear line; returns that batch.

    The later batches are checked where a pass reaches them (:mod:`secondorder.cli.batches`).
    """
    from secondorder.data import as_batches, call_model, to_device

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
    return first


def parameter_names(args: argparse.Namespace) -> list[str] | None:
    """The ``--params`` names or module prefixes (``None``: all trainable parameters)."""
    return [p.strip() for p in args.params.split(",") if p.strip()] if args.params else None




def add_model_options(parser: argparse.ArgumentParser) -> None:
    """--model, --checkpoint, --data, --loss, --params, --device (all optional: default model otherwise)."""
    own = parser.add_argument_group("your model (all optional: without --model the default is trained)")
    own.add_argument("--model", metavar="MODULE:FACTORY", help="factory returning the nn.Module")
    own.add_argument("--checkpoint", metavar="PATH", action="append", default=[],
                     help="state_dict to load (repeatable where a command uses several; the last is used)")
    own.add_argument("--data", metavar="MODULE:FACTORY", help="factory returning a batch or batches")
    own.add_argument("--loss", default="cross_entropy",
                     help="cross_entropy | mse | bce (with logits) | MODULE:NAME (default: cross_entropy)")
    own.add_argument("--params", metavar="NAMES", help="comma-separated parameter names or module prefixes")
    own.add_argument("--device", default="cpu", help="torch device, e.g. cuda (default: cpu)")


def add_default_model_options(group) -> None:
    """--epochs (of the default model) and --seed, in the caller's argument group."""
    group.add_argument("--epochs", type=int, default=20, help="training epochs of the default model (default: 20)")
    group.add_argument("--seed", type=int, default=0,
                       help="seed of training (default model) and probes (default: 0)")


@contextmanager
def user_input(what: str) -> Iterator[None]:
    """Report the ``ValueError`` of a check of what the user gave (``what``: the options) as a :class:`UsageError`.

    Wrap only calls that check the user's input: an error anywhere else is a bug and keeps its traceback.
    """
    try:
        yield
    except ValueError as err:
        raise UsageError(f"{what}: {str(err).strip().splitlines()[0]}") from err


def output_directory(args: argparse.Namespace, writes: bool = True) -> AbstractContextManager[Path | None]:
    """Enter first, before any work: ``--out`` checked, and (if this process ``writes``) the directory the
    command writes into, which replaces ``--out`` as a whole when the block succeeds
    (:func:`~secondorder.cli.output.atomic_directory`); ``None`` on a process that does not write.
    """
    if not writes:
        output.check(args.out, args.force)
        return nullcontext(None)
    return atomic_directory(args.out, force=args.force, command=f"secondorder {args.command}")


def add_output_options(parser: argparse.ArgumentParser, default_out: str) -> None:
    """--out, --force, --json, --quiet."""
    out = parser.add_argument_group("output")
    out.add_argument("--out", type=Path, default=Path(default_out),
                     help=f"directory, replaced as a whole by the new files when the run succeeds (checked before "
                          f"any work; default: ./{default_out})")
    out.add_argument("--force", action="store_true",
                     help="replace --out even if it is a non-empty directory that no secondorder command wrote "
                          "(its files are deleted); without it such a directory is refused, while an earlier "
                          "output is always replaced")
    out.add_argument("--json", action="store_true", help="print summary.json to stdout instead of the table")
    out.add_argument("--quiet", action="store_true", help="no progress bars")


def device_of(args: argparse.Namespace) -> torch.device:
    """The ``--device``, checked to exist here."""
    try:
        device = torch.device(args.device)
    except RuntimeError as err:
        raise UsageError(f"--device {args.device!r}: {err}") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda, but torch sees no CUDA device")
    return device


def under_torchrun() -> bool:
    """Whether torchrun (or another env:// launcher) started this process as one of several ranks."""
    return "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def join_torchrun(backend: str | None = None, timeout: float = 120.0):
    """Join the torchrun process group, or a one-line usage error explaining what is missing."""
    from secondorder.distributed import init_from_env

    try:
        return init_from_env(backend, timeout=timeout)
    except RuntimeError as err:
        raise UsageError(str(err)) from err


def wants_own_model(args: argparse.Namespace) -> bool:
    """Whether the user named a model, data or checkpoint (instead of the embedded default)."""
    return bool(args.model or args.data or args.checkpoint)


def own_problem(args: argparse.Namespace, device: torch.device):
    """``(model, loss_fn, data, checkpoint states, context)`` from the factories, checked with one forward;
    ``data`` is a :class:`~secondorder.cli.batches.WatchedBatches`.
    """
    from secondorder.data import as_batches

    if not args.model or not args.data:
        raise UsageError("--model and --data go together (without both, the default model is trained)")
    model = call_factory(args.model, "--model")
    if not isinstance(model, torch.nn.Module):
        raise UsageError(f"--model {args.model} returned {type(model).__name__}, not a torch.nn.Module")
    states = [load_checkpoint(model, path) for path in args.checkpoint]
    model.to(device)
    data = call_factory(args.data, "--data")
    loss_fn = loss_function(args.loss)
    first = check_forward(model, loss_fn, data, device)
    data = WatchedBatches(as_batches(data), first)  # a pass's error on a later batch names it
    context = {"model": f"{args.model} ({sum(p.numel() for p in model.parameters())} parameters)",
               "checkpoint": args.checkpoint[-1] if args.checkpoint else "factory's initial weights",
               "data": args.data, "loss": args.loss}
    return model, loss_fn, data, states, context
