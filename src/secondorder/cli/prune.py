"""``secondorder prune``: unstructured pruning by magnitude, M-FAC OBS and diagonal-curvature OBD.

Prunes the model's Linear/Conv weights (or those named by --params) to each --sparsity, counted
globally over all of them, by each --method: global magnitude |w|; the optimal brain surgeon
saliency w^2 / (2 [F^-1]_qq) with its compensating update of the remaining weights, F the M-FAC
block-diagonal empirical Fisher lambda*I + G^T G / m of m gradients (Hassibi & Stork 1993; Frantar,
Kurtic & Alistarh 2021), in --steps increments that recompute the gradients; or optimal brain
damage, w^2 H_qq / 2 with the Hessian diagonal estimated by XDiag (LeCun et al. 1990). Reports the
loss and accuracy before and after, optionally after a short masked fine-tuning, as a table and a
figure of accuracy against sparsity, and saves every pruned checkpoint with its mask. Without
--model it trains the MNIST-1D default CNN first.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from secondorder.cli.batches import naming_the_batch
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
from secondorder.data import evaluate
from secondorder.environment import describe
from secondorder.prune import METHODS, finetune, prunable_parameters, prune

EPILOG = """\
examples:
  secondorder prune                                     MNIST-1D CNN, all three methods at 50/70/90%
  secondorder prune --method mfac,magnitude --sparsity 0.8 --fine-tune-epochs 2
  secondorder prune --gradual --sparsity 0.5,0.75,0.875 --fine-tune-epochs 1     prune, tune, prune further
  secondorder prune --model mypkg.nets:make --checkpoint net.pt --data mypkg.data:calib --params encoder

methods: magnitude (global |w|, no update); mfac (OBS: saliency w^2 / (2 [F^-1]_qq) and the update
dw = -F^-1 E_Q (E_Q^T F^-1 E_Q)^-1 w_Q of all remaining weights, F = lambda*I + G^T G / m over the
gradients of the batches of the data (--rows batch; the default model uses --gradients batches of
--batch-size training samples) or of its samples (--rows sample), block diagonal over chunks of
--block-size weights, recomputed --steps times on the way to each target); diagonal (OBD: w^2 H_qq / 2,
H_qq estimated by XDiag with --probes Hessian-vector products, no update).
sparsity: the fraction of the prunable weights (Linear/Conv weights, or --params: parameter names, or
module names whose Linear/Conv weights are pruned) set to zero, counted over all of them together.
Each target starts from the dense model (one-shot), or with --gradual from the previous target's
pruned (and fine-tuned) model, keeping its mask.
evaluation: the default model's 1000 test samples; with --model, --data itself.
outputs (in --out): report.md (the accuracy-vs-sparsity table and per-layer sparsities),
accuracy.png, summary.json, checkpoints/METHOD-SPARSITY.pt ({"state_dict", "masks", ...}; loads with
--checkpoint, and secondorder.prune.PruningMask.from_state_dict(ckpt["masks"])).
"""


def add_parser(sub) -> None:
    """Register ``prune`` on the subcommand parsers."""
    p = sub.add_parser("prune", help="second-order pruning (M-FAC OBS, OBD, magnitude)",
                       description=__doc__.split("\n\n")[1], epilog=EPILOG + FACTORIES_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_options(p)
    what = p.add_argument_group("pruning")
    what.add_argument("--method", default=",".join(METHODS),
                      help="comma-separated methods to compare: magnitude, mfac, diagonal (default: all three)")
    what.add_argument("--sparsity", default="0.5,0.7,0.9", help="comma-separated targets in [0, 1) "
                      "(default: 0.5,0.7,0.9)")
    what.add_argument("--gradual", action="store_true",
                      help="prune to the targets in turn, each from the previous one (fine-tuning in between)")
    what.add_argument("--fine-tune-epochs", type=int, default=0,
                      help="masked fine-tuning epochs after each pruning (default: 0, one-shot only)")
    what.add_argument("--lr", type=float, default=1e-2, help="fine-tuning learning rate, SGD momentum 0.9 "
                      "(default: 0.01)")
    curv = p.add_argument_group("curvature")
    curv.add_argument("--steps", type=int, default=16,
                      help="mfac: increments per target, recomputing the gradients between (default: 16)")
    curv.add_argument("--gradients", type=int, default=64,
                      help="mfac, default model: m, the number of gradient batches (default: 64)")
    curv.add_argument("--batch-size", type=int, default=32,
                      help="default model: samples per gradient batch (default: 32)")
    curv.add_argument("--rows", choices=["batch", "sample"], default="batch",
                      help="mfac: one gradient per batch (default) or per sample")
    curv.add_argument("--damping", type=float, default=1e-5, help="mfac: lambda (default: 1e-5)")
    curv.add_argument("--block-size", type=int, default=128, help="mfac: weights per block of F (default: 128)")
    curv.add_argument("--probes", type=int, default=100,
                      help="diagonal: XDiag Hessian-vector products (default: 100)")
    add_default_model_options(curv)
    add_output_options(p, "secondorder-prune")
    p.set_defaults(run=run)


def _list(text: str, option: str) -> list[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items:
        raise UsageError(f"{option} must name at least one value, got {text!r}")
    return items


def _sparsities(text: str, gradual: bool) -> list[float]:
    try:
        values = [float(x) for x in _list(text, "--sparsity")]
    except ValueError:
        raise UsageError(f"--sparsity must be comma-separated numbers in [0, 1), got {text!r}") from None
    bad = [v for v in values if not 0 <= v < 1]
    if bad:
        raise UsageError(f"--sparsity values must lie in [0, 1) (the fraction of weights set to zero), got {bad}")
    if gradual and any(b <= a for a, b in zip(values, values[1:])):
        raise UsageError(f"--gradual needs increasing --sparsity values, got {values}")
    return values if gradual else sorted(set(values))


def _methods(text: str) -> list[str]:
    methods = _list(text, "--method")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise UsageError(f"--method {','.join(unknown)}: unknown; choose from {', '.join(METHODS)}")
    return list(dict.fromkeys(methods))


def _check_numbers(args) -> None:
    if args.fine_tune_epochs < 0:
        raise UsageError(f"--fine-tune-epochs must be >= 0, got {args.fine_tune_epochs}")
    for name in ("steps", "gradients", "batch_size", "block_size", "probes"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.probes < 4:
        raise UsageError(f"--probes must be >= 4 (XDiag), got {args.probes}")
    if not 0 < args.damping < float("inf"):
        raise UsageError(f"--damping must be a positive number, got {args.damping}")
    if not 0 < args.lr < float("inf"):
        raise UsageError(f"--lr must be a positive number, got {args.lr}")


def _default(args, device):
    from secondorder.datasets import Mnist1dCNN, batches, train_mnist1d

    if args.epochs < 1:
        raise UsageError(f"--epochs must be >= 1, got {args.epochs}")
    with torch.random.fork_rng(devices=[]), user_input("--params"):  # names checked before training
        prunable_parameters(Mnist1dCNN(), parameter_names(args))
    trained = train_mnist1d(args.seed, args.epochs, progress=not args.quiet)
    (xtr, ytr), (xte, yte) = trained.train, trained.test
    count = args.gradients * args.batch_size
    if count > len(xtr):
        raise UsageError(f"--gradients x --batch-size = {count} exceeds the {len(xtr)} training samples")
    pick = torch.randperm(len(xtr), generator=torch.Generator().manual_seed(args.seed))[:count]
    xs, ys = xtr[pick].to(device), ytr[pick].to(device)
    gradient_data = [(xs[i:i + args.batch_size], ys[i:i + args.batch_size]) for i in range(0, count, args.batch_size)]
    fine = batches(xtr.to(device), ytr.to(device), 128)
    context = {"model": "default: " + trained.recipe, "evaluation": f"the {len(xte)} test samples",
               "curvature data": f"{args.gradients} batches of {args.batch_size} training samples "
                                 "(the diagonal: the same samples as one batch)",
               "fine-tuning data": f"the {len(xtr)} training samples, batches of 128"}
    return (trained.model.to(device), F.cross_entropy, gradient_data, [(xs, ys)], fine,
            [(xte.to(device), yte.to(device))], context)


def _own(args, device):
    model, loss_fn, data, _, context = own_problem(args, device)
    with user_input("--params"):
        prunable_parameters(model, parameter_names(args))
    context["evaluation"] = "--data (the same batches the curvature uses)"
    return model, loss_fn, data, data, data, data, context


def run(args: argparse.Namespace) -> tuple[dict, str]:
    """The ``prune`` command: its summary and the text to print."""
    with output_directory(args) as tmp:  # --out first, before any work
        assert tmp is not None
        return _run(args, tmp)


def _run(args: argparse.Namespace, tmp: Path) -> tuple[dict, str]:
    device = device_of(args)
    methods, targets = _methods(args.method), _sparsities(args.sparsity, args.gradual)
    if args.gradual and not args.fine_tune_epochs:
        raise UsageError("--gradual fine-tunes between the targets: give --fine-tune-epochs >= 1")
    _check_numbers(args)
    problem = (_own if wants_own_model(args) else _default)(args, device)
    model, loss_fn, data = problem[:3]
    with naming_the_batch(model, loss_fn, data):
        summary = _prune(args, tmp, device, methods, targets, *problem)
    table = _markdown(summary).split("\n![")[0] + f"\nreport: {args.out / 'report.md'} (also summary.json, " \
                                                  "accuracy.png, checkpoints/)"
    return summary, table


def _prune(args, tmp: Path, device, methods, targets, model, loss_fn, data, diagonal_data, fine_data, eval_data,
           context) -> dict:
    """Every method at every target; the report, figure and checkpoints are written into ``tmp``."""
    from tqdm import tqdm

    names = parameter_names(args)
    dense = evaluate(model, loss_fn, eval_data, device)
    (tmp / "checkpoints").mkdir()
    runs = []
    bar = tqdm(total=len(methods) * len(targets), desc="pruning", unit="run", disable=args.quiet)
    for method in methods:
        current, mask = copy.deepcopy(model), None
        for target in targets:
            if not args.gradual:
                current, mask = copy.deepcopy(model), None
            bar.set_postfix_str(f"{method} {target:g}")
            start = time.perf_counter()
            result = prune(current, loss_fn, diagonal_data if method == "diagonal" else data, target,
                           method=method, params=None if mask is not None else names, mask=mask,
                           steps=args.steps if method == "mfac" else 1, damping=args.damping,
                           block_size=args.block_size, rows=args.rows, num_matvecs=args.probes, seed=args.seed,
                           progress=not args.quiet)
            mask = result.mask
            seconds = time.perf_counter() - start
            one_shot, tuned = evaluate(current, loss_fn, eval_data, device), None
            if args.fine_tune_epochs:
                finetune(current, mask, loss_fn, fine_data, epochs=args.fine_tune_epochs, lr=args.lr,
                         seed=args.seed, progress=not args.quiet)
                tuned = evaluate(current, loss_fn, eval_data, device)
            checkpoint = f"checkpoints/{method}-{target:g}.pt"
            torch.save({"state_dict": current.state_dict(), "masks": mask.state_dict(), "method": method,
                        "sparsity": result.sparsity, "fine_tune_epochs": args.fine_tune_epochs}, tmp / checkpoint)
            runs.append({"method": method, "target": target, "sparsity": result.sparsity, "seconds": seconds,
                         "pruned": one_shot, "fine_tuned": tuned, "checkpoint": checkpoint,
                         "pruning": result.to_dict()})
            bar.update()
    bar.close()
    context.update({"methods": methods, "sparsities": targets,
                    "schedule": "gradual (each target from the previous)" if args.gradual else "one-shot from dense",
                    "mfac": f"m = {'batches' if args.rows == 'batch' else 'samples'} of the curvature data, "
                            f"lambda {args.damping:g}, block {args.block_size}, {args.steps} recomputations",
                    "diagonal": f"XDiag, {args.probes} Hessian-vector products",
                    "fine-tuning": f"{args.fine_tune_epochs} epochs, SGD lr {args.lr:g} momentum 0.9, masks kept",
                    "machine": describe(device)})
    summary = {"context": context, "dense": dense, "runs": runs}
    _plot(tmp, summary)
    (tmp / "summary.json").write_text(json.dumps(summary, indent=2))
    (tmp / "report.md").write_text(_markdown(summary))
    return summary


def _score(res: dict | None) -> str:
    if res is None:
        return "-"
    if res["accuracy"] is None:
        return f"loss {res['loss']:.4f}"
    return f"{100 * res['accuracy']:.2f}% ({res['loss']:.3f})"


def _markdown(summary: dict) -> str:
    runs = summary["runs"]
    methods = list(dict.fromkeys(r["method"] for r in runs))
    targets = list(dict.fromkeys(r["target"] for r in runs))
    tuned = any(r["fine_tuned"] is not None for r in runs)
    by = {(r["method"], r["target"]): r for r in runs}
    lines = ["# secondorder prune: accuracy against sparsity", ""]
    lines += [f"- **{k}**: {v}" for k, v in summary["context"].items()] + [""]
    columns = [m for m in methods] + ([f"{m} + fine-tuning" for m in methods] if tuned else [])
    lines += ["Accuracy (loss) on the evaluation data; sparsity over the prunable weights.", "",
              "| sparsity | " + " | ".join(columns) + " |", "|---:|" + "---:|" * len(columns)]
    lines.append("| 0 (dense) | " + " | ".join([_score(summary["dense"])] * len(columns)) + " |")
    for t in targets:
        cells = [_score(by[m, t]["pruned"]) for m in methods]
        if tuned:
            cells += [_score(by[m, t]["fine_tuned"]) for m in methods]
        lines.append(f"| {100 * by[methods[0], t]['sparsity']:.1f}% | " + " | ".join(cells) + " |")
    lines += ["", "| method | target | time (s) | " + " | ".join(x["name"] for x in runs[0]["pruning"]["layers"])
              + " |", "|---|---:|---:|" + "---:|" * len(runs[0]["pruning"]["layers"])]
    for r in runs:
        lines.append(f"| {r['method']} | {r['target']:g} | {r['seconds']:.2f} | "
                     + " | ".join(f"{100 * x['sparsity']:.1f}%" for x in r["pruning"]["layers"]) + " |")
    return "\n".join(lines + ["", "![accuracy against sparsity](accuracy.png)", ""])


def _plot(tmp: Path, summary: dict) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    runs, dense = summary["runs"], summary["dense"]
    key = "accuracy" if dense["accuracy"] is not None else "loss"
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for i, method in enumerate(dict.fromkeys(r["method"] for r in runs)):
        mine = [r for r in runs if r["method"] == method]
        xs = [100 * r["sparsity"] for r in mine]
        ax.plot(xs, [r["pruned"][key] for r in mine], "o-", color=f"C{i}", label=method)
        if mine[0]["fine_tuned"] is not None:
            ax.plot(xs, [r["fine_tuned"][key] for r in mine], "s--", color=f"C{i}", label=f"{method} + fine-tuning")
    ax.axhline(dense[key], color="gray", lw=0.8, ls=":", label="dense")
    ax.set_xlabel("sparsity of the prunable weights (%)")
    ax.set_ylabel(f"evaluation {key}")
    ax.legend(fontsize=8)
    fig.savefig(tmp / "accuracy.png", dpi=110, bbox_inches="tight")
    plt.close(fig)
