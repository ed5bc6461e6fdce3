"""``secondorder quantize``: Hessian-aware mixed-precision quantization (HAWQ-V2/V3).

Measures every layer's Hessian trace (one set of Hutch++ probes for all layers), scores each
candidate bit width by HAWQ-V2's Omega = Tr(H_i)/n_i * ||Q_b(W_i) - W_i||^2, picks the bits that
minimise the summed Omega under the size budget (exact dynamic programme) or, with --bops, under
size and bit-operation budgets (HAWQ-V3's integer linear programme), then quantizes (per-channel
symmetric weights) and reports the loss and accuracy before and after, optionally after a short
quantization-aware fine-tuning. Without --model it trains the MNIST-1D default CNN first.
"""

from __future__ import annotations

import argparse
import json
import math
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
from secondorder.data import as_batches, call_model, to_device
from secondorder.environment import describe
from secondorder.quant import (
    allocate_bits,
    allocate_bits_ilp,
    finetune,
    gptq_quantize,
    interpolated_budget,
    layer_sensitivities,
    pareto_frontier,
    quantizable_layers,
    quantize,
    uniform_cost,
)
from secondorder.quant.macs import layer_macs

EPILOG = """\
examples:
  secondorder quantize                                  MNIST-1D CNN at an average of 4 bits
  secondorder quantize --budget-bits 3 --finetune-epochs 2
  secondorder quantize --bits 4,8 --budget-bits 6 --bops 0.5      HAWQ-V3: size and BOPs budgets
  secondorder quantize --budget-bits 3 --rounding gptq --act-order   HAWQ bits, GPTQ rounding
  secondorder quantize --model mypkg.nets:make --checkpoint net.pt --data mypkg.data:calib \\
                       --budget-mb 0.5 --pin conv1=8 --pin fc=8 --tie layer1.0.conv2,layer1.0.downsample.0

layers: all quantizable layers (modules holding a weight of 2+ dimensions), or those named by
--params (layer names, e.g. --params conv2,fc); the others stay in full precision.
budgets: --budget-bits B is an average of B bits per weight (B * total weights); --budget-mb M
megabytes of quantized weights; --bops A in [0, 1] limits the bit operations (MACs * weight bits *
activation bits, activations at the weight bits) to all-lowest + A * (all-highest - all-lowest),
HAWQ-V3's 'low/medium/high' rows (A = 0.25, 0.5, 0.75).
outputs (in --out): summary.json, report.md, pareto.png (min Omega against size, every uniform
choice and the chosen point), layers.png (per-layer trace/n and chosen bits).
"""


def add_parser(sub) -> None:
    """Register ``quantize`` on the subcommand parsers."""
    q = sub.add_parser("quantize", help="Hessian-aware mixed-precision quantization (HAWQ-V2/V3)",
                       description=__doc__.split("\n\n")[1], epilog=EPILOG + FACTORIES_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_options(q)
    b = q.add_argument_group("bits and budgets")
    b.add_argument("--bits", default="2,3,4,8", help="candidate bit widths (default: 2,3,4,8)")
    size = b.add_mutually_exclusive_group()
    size.add_argument("--budget-bits", type=float, help="average bits per weight (default: 4)")
    size.add_argument("--budget-mb", type=float, help="size of the quantized weights in megabytes")
    b.add_argument("--bops", type=float, metavar="A", help="BOPs budget as a fraction A in [0, 1] (HAWQ-V3)")
    b.add_argument("--pin", action="append", default=[], metavar="LAYER=BITS", help="fix a layer's bits")
    b.add_argument("--tie", action="append", default=[], metavar="A,B,...", help="layers sharing one bit width")
    b.add_argument("--sensitivity", choices=["v2", "v1"], default="v2",
                   help="Omega from the trace (HAWQ-V2, default) or the top eigenvalue (HAWQ-V1: lambda * ||dW||^2)")
    b.add_argument("--granularity", choices=["channel", "tensor", "group"], default="channel",
                   help="weight scales per output channel (default), per tensor, or per group of rows (Q-BERT)")
    b.add_argument("--group-size", type=int, help="rows per group with --granularity group")
    b.add_argument("--rounding", choices=["nearest", "gptq"], default="nearest",
                   help="round to nearest (default) or GPTQ: second-order rounding from each layer's input "
                        "Hessian on the sensitivity data, layer after layer, no fine-tuning")
    b.add_argument("--act-order", action="store_true", help="with --rounding gptq: columns by descending diag(H)")
    t = q.add_argument_group("estimation and fine-tuning")
    t.add_argument("--probes", type=int, default=90, help="Hutch++ products for the traces (default: 90)")
    t.add_argument("--finetune-epochs", type=int, default=0, help="quantization-aware epochs (default: 0)")
    t.add_argument("--lr", type=float, default=1e-2, help="fine-tuning learning rate (default: 0.01)")
    add_default_model_options(t)
    add_output_options(q, "secondorder-quant")
    q.set_defaults(run=run)


def _bits(text: str) -> tuple[int, ...]:
    try:
        bits = tuple(sorted({int(x) for x in text.split(",") if x.strip()}))
    except ValueError:
        raise UsageError(f"--bits must be comma-separated integers, got {text!r}") from None
    if not bits or not all(1 <= b <= 32 for b in bits):
        raise UsageError(f"--bits must lie in 1..32, got {text!r}")
    return bits


def _pins(items: list[str]) -> dict[str, int]:
    pins = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not value.strip().isdigit():
            raise UsageError(f"--pin must look like LAYER=BITS, got {item!r}")
        pins[name.strip()] = int(value)
    return pins


def _default(args, device):
    from secondorder.datasets import batches, train_mnist1d

    if args.epochs < 1:
        raise UsageError(f"--epochs must be >= 1, got {args.epochs}")
    trained = train_mnist1d(args.seed, args.epochs, progress=not args.quiet)
    (xtr, ytr), (xte, yte) = trained.train, trained.test
    xtr, ytr = xtr.to(device), ytr.to(device)
    train, fine = batches(xtr, ytr, 1000), batches(xtr, ytr, 128)
    context = {"model": "default: " + trained.recipe, "evaluation": f"the {len(xte)} test samples",
               "sensitivity data": f"the {len(xtr)} training samples"}
    return trained.model.to(device), F.cross_entropy, train, fine, [(xte.to(device), yte.to(device))], context


def _own(args, device):
    model, loss_fn, data, _, context = own_problem(args, device)
    context["evaluation"] = "--data (the same batches the sensitivities use)"
    return model, loss_fn, data, data, data, context


def evaluate(model, loss_fn, data, device) -> dict:
    """Mean loss and, for class-index targets and ``[N, C]`` outputs, accuracy (no gradient, mode kept)."""
    total = correct = count = 0.0
    classify = True
    with torch.no_grad():
        for inputs, targets in as_batches(data):
            inputs, targets = to_device(inputs, device), to_device(targets, device)
            out = call_model(model, inputs)
            n = len(targets)
            total += float(loss_fn(out, targets)) * n
            count += n
            if classify and out.ndim == 2 and targets.ndim == 1 and not targets.is_floating_point():
                correct += float((out.argmax(-1) == targets).sum())
            else:
                classify = False
    return {"loss": total / count, "accuracy": correct / count if classify else None}


def _omega(args, sens) -> dict[str, dict[int, float]]:
    return sens.hawq_v2() if args.sensitivity == "v2" else sens.eigenvalue_weighted()


def _allocate(args, sens, macs, pins, ties):
    omega, sizes = _omega(args, sens), sens.sizes()
    total = sum(sizes.values())
    if args.budget_mb is not None:
        budget = args.budget_mb * 8e6
    else:
        budget = (4.0 if args.budget_bits is None else args.budget_bits) * total
    if args.bops is None:
        return allocate_bits(omega, sizes, math.floor(budget), pinned=pins, tied=ties), budget, None
    low_bits, high_bits = min(_bits(args.bits)), max(_bits(args.bits))
    bops = interpolated_budget(uniform_cost(sizes, low_bits, macs)[1], uniform_cost(sizes, high_bits, macs)[1],
                               args.bops)
    return (allocate_bits_ilp(omega, sizes, size_budget_bits=math.floor(budget), macs=macs, bops_budget=bops,
                              pinned=pins, tied=ties), budget, bops)


def _plots(tmp, omega, sens, allocation, frontier) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4))
    ax.step([a.average_bits for a in frontier], [a.sensitivity for a in frontier], where="post",
            label="Pareto frontier (min ΣΩ)")
    for b in next(iter(omega.values())):
        if all(b in o for o in omega.values()):
            ax.plot([b], [sum(o[b] for o in omega.values())], "s", label=f"uniform {b}-bit")
    ax.plot([allocation.average_bits], [allocation.sensitivity], "r*", ms=14, label="chosen")
    ax.set_yscale("symlog", linthresh=1e-12)
    ax.set_xlabel("average bits per weight")
    ax.set_ylabel("ΣΩ")
    ax.legend(fontsize=8)
    fig.savefig(tmp / "pareto.png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    fig, axes = plt.subplots(1, 2, figsize=(10, 0.45 * len(sens.layers) + 1.6), sharey=True)
    names = [x.name for x in sens.layers]
    axes[0].barh(names, [x.trace / x.size for x in sens.layers], xerr=[2 * x.trace_stderr / x.size
                                                                        for x in sens.layers])
    axes[0].set_title("Tr(H_i) / n_i (±2 stderr)")
    axes[1].barh(names, [allocation.bits[n] for n in names], color="tab:orange")
    axes[1].set_title("chosen bits")
    axes[0].invert_yaxis()
    fig.savefig(tmp / "layers.png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def _markdown(summary: dict) -> str:
    lines = ["# secondorder quantize: Hessian-aware mixed precision (HAWQ)", ""]
    lines += [f"- **{k}**: {v}" for k, v in summary["context"].items()] + [""]
    lines += ["| layer | weights | Tr/n ± stderr | top eigenvalue | bits |", "|---|---:|---:|---:|---:|"]
    for layer in summary["layers"]:
        lines.append(f"| {layer['name']} | {layer['size']} | {layer['trace_per_weight']:.4g} ± "
                     f"{layer['trace_stderr_per_weight']:.2g} | {layer['top_eigenvalue']:.4g} | {layer['bits']} |")
    a, r = summary["allocation"], summary["results"]
    lines += ["", f"Size {a['size_bits'] / 8e6:.4f} MB ({a['average_bits']:.3f} bits per weight), "
              f"ΣΩ {a['sensitivity']:.4g}, solver {a['solver']}" + (f", BOPs {a['bops']:.4g}" if a["bops"] else ""),
              "", "| model | loss | accuracy |", "|---|---:|---:|"]
    for name, res in r.items():
        acc = "-" if res["accuracy"] is None else f"{100 * res['accuracy']:.2f}%"
        lines.append(f"| {name} | {res['loss']:.4f} | {acc} |")
    if "gptq" in summary:
        lines += ["", "GPTQ rounding: layer output error tr((W - Ŵ) H (W - Ŵ)ᵀ) on the calibration inputs",
                  "", "| layer | bits | damping / mean diag H | raises | dead inputs | error GPTQ | error nearest |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for g in summary["gptq"]:
            lines.append(f"| {g['name']} | {g['bits']} | {g['relative_damping']:.3g} | {g['damping_raises']} | "
                         f"{g['dead_inputs']} | {g['error']:.4g} | {g['nearest_error']:.4g} |")
    return "\n".join(lines + ["", "![Pareto frontier](pareto.png)", "", "![layers](layers.png)", ""])


def run(args: argparse.Namespace) -> tuple[dict, str]:
    """The ``quantize`` command: its summary and the text to print."""
    with output_directory(args) as tmp:  # --out first, before any work
        assert tmp is not None
        return _run(args, tmp)


def _run(args: argparse.Namespace, tmp: Path) -> tuple[dict, str]:
    device = device_of(args)
    bits = _bits(args.bits)
    if args.finetune_epochs < 0 or args.probes < 3:
        raise UsageError("--finetune-epochs must be >= 0 and --probes >= 3")
    if args.rounding == "gptq" and args.finetune_epochs:
        raise UsageError("--rounding gptq is post-training rounding; quantization-aware fine-tuning "
                         "(--finetune-epochs) would round the weights to nearest again")
    if args.act_order and args.rounding != "gptq":
        raise UsageError("--act-order applies to --rounding gptq only")
    model, loss_fn, data, fine_data, eval_data, context = (_own if wants_own_model(args) else _default)(args, device)
    if not quantizable_layers(model):
        raise UsageError("the model has no quantizable layers (modules holding a weight of 2 or more dimensions)")
    with naming_the_batch(model, loss_fn, data):
        summary = _quantize(args, tmp, device, bits, model, loss_fn, data, fine_data, eval_data, context)
    table = _markdown(summary).split("\n![")[0] + f"\nreport: {args.out / 'report.md'} (also summary.json, PNGs)"
    return summary, table


def _quantize(args, tmp: Path, device, bits, model, loss_fn, data, fine_data, eval_data, context) -> dict:
    """Sensitivities, allocation, quantization and evaluation; the report is written into ``tmp``."""
    sens = layer_sensitivities(model, loss_fn, data, bits=bits, layers=parameter_names(args),
                               trace_matvecs=args.probes, seed=args.seed,
                               granularity=args.granularity, group_size=args.group_size, progress=not args.quiet)
    omega = _omega(args, sens)
    first = next(iter(as_batches(data)))
    macs = layer_macs(model, to_device(first[0], device))
    pins = _pins(args.pin)
    ties = [tuple(x.strip() for x in t.split(",") if x.strip()) for t in args.tie]
    with user_input("the bit allocation (--budget-*, --bops, --pin, --tie)"):
        allocation, budget, bops_budget = _allocate(args, sens, macs, pins, ties)
    results = {"full precision": evaluate(model, loss_fn, eval_data, device)}
    qmodel = quantize(model, allocation.bits, granularity=args.granularity, group_size=args.group_size)
    results["quantized (PTQ)"] = evaluate(qmodel, loss_fn, eval_data, device)
    gptq = None
    if args.rounding == "gptq":
        try:
            rounded = gptq_quantize(model, allocation.bits, data, granularity=args.granularity,
                                    group_size=args.group_size, act_order=args.act_order, progress=not args.quiet)
        except (ValueError, TypeError) as err:
            raise UsageError(f"--rounding gptq: {str(err).strip().splitlines()[0]}") from err
        results["quantized (GPTQ)"] = evaluate(rounded.model, loss_fn, eval_data, device)
        gptq = [layer.as_dict() for layer in rounded.layers.values()]
        context["rounding"] = "GPTQ, sequential" + (", activation order" if args.act_order else "")
    if args.finetune_epochs:
        finetune(qmodel, loss_fn, fine_data, epochs=args.finetune_epochs, lr=args.lr, progress=not args.quiet)
        results[f"quantized + {args.finetune_epochs} QAT epochs"] = evaluate(qmodel, loss_fn, eval_data, device)
    with user_input("the bit allocation (--pin, --tie)"):
        frontier = pareto_frontier(omega, sens.sizes(), pinned=pins, tied=ties)
    context.update({"sensitivity": f"HAWQ-{args.sensitivity.upper()}", "granularity": args.granularity,
                    "candidate bits": list(bits), "size budget (bits)": math.floor(budget),
                    "BOPs budget": bops_budget, "machine": describe(device)})
    summary = {
        "context": context,
        "layers": [{"name": x.name, "size": x.size, "trace_per_weight": x.trace / x.size,
                    "trace_stderr_per_weight": x.trace_stderr / x.size, "top_eigenvalue": x.top_eigenvalue,
                    "macs": macs[x.name], "omega": {str(b): v for b, v in omega[x.name].items()},
                    "bits": allocation.bits[x.name]} for x in sens.layers],
        "allocation": {"bits": allocation.bits, "sensitivity": allocation.sensitivity,
                       "size_bits": allocation.size_bits, "average_bits": allocation.average_bits,
                       "bops": allocation.bops, "solver": allocation.solver},
        "results": results,
        "frontier": [{"size_bits": a.size_bits, "sensitivity": a.sensitivity, "bits": a.bits} for a in frontier],
    }
    if gptq is not None:
        summary["gptq"] = gptq
    _plots(tmp, omega, sens, allocation, frontier)
    (tmp / "summary.json").write_text(json.dumps(summary, indent=2))
    (tmp / "report.md").write_text(_markdown(summary))
    return summary
