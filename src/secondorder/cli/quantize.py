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
from dataclasses import replace
from pathlib import Path

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
from secondorder.data import as_batches, evaluate, to_device
from secondorder.environment import describe
from secondorder.quant import (
    Allocation,
    activation_sensitivities,
    allocate_bits,
    allocate_bits_ilp,
    allocate_joint,
    finetune,
    gptq_quantize,
    interpolated_budget,
    joint_frontier,
    layer_sensitivities,
    pareto_frontier,
    quantizable_layers,
    quantize,
    uniform_cost,
)
from secondorder.quant.dependencies import bisection_search, calibration_damage, measure_dependencies, threshold_path
from secondorder.quant.macs import layer_macs
from secondorder.quant.uncertainty import beats_probability, confidence_omega, parametric_stability

EPILOG = """\
examples:
  secondorder quantize                                  MNIST-1D CNN at an average of 4 bits
  secondorder quantize --budget-bits 3 --finetune-epochs 2
  secondorder quantize --bits 4,8 --budget-bits 6 --bops 0.5      HAWQ-V3: size and BOPs budgets
  secondorder quantize --budget-bits 3 --rounding gptq --act-order   HAWQ bits, GPTQ rounding
  secondorder quantize --activations --bits 4,8 --act-bits 4,8 --bops 0.5     weight and activation bits
  secondorder quantize --max-drop 1 --bits 2,3,4,8        cheapest bits within 1 point of accuracy
  secondorder quantize --budget-bits 3 --robust            allocate on the traces' upper confidence bound
  secondorder quantize --model mypkg.nets:make --checkpoint net.pt --data mypkg.data:calib \\
                       --budget-mb 0.5 --pin conv1=8 --pin fc=8 --tie layer1.0.conv2,layer1.0.downsample.0

layers: all quantizable layers (modules holding a weight of 2+ dimensions), or those named by
--params (layer names, e.g. --params conv2,fc); the others stay in full precision.
budgets: --budget-bits B is an average of B bits per weight (B * total weights); --budget-mb M
megabytes of quantized weights; --bops A in [0, 1] limits the bit operations (MACs * weight bits *
activation bits, activations at the weight bits) to all-lowest + A * (all-highest - all-lowest),
HAWQ-V3's 'low/medium/high' rows (A = 0.25, 0.5, 0.75).
activations: with --activations every layer's input activation gets its own bit width:
Omega_act = Tr(d2L/da2)/n_a * ||Q(a) - a||^2 (per-sample mean trace, Hutch++ on the same data), and the
ILP minimises the weights' plus the activations' Omega under the size budget and the BOPs budget
(MACs * weight bits * activation bits, interpolated between all-lowest and all-highest pairs).
The report compares weight-only mixed precision at the same budgets (activations uniform, at the
candidate width whose best weight allocation has the smallest ΣΩ).
dependencies: --max-drop D measures each layer's damage alone and each pair's together on the
sensitivity data, orders the layers by damage per bit saved, and bisects on a global threshold
for the cheapest configuration inside the window; the pure-Hessian (Omega) order is bisected too.
error bars: every allocation is re-solved on --redraws draws of the traces from their normal
error bars; the report says how often the same bits come back. --robust allocates on the traces'
upper confidence bound and gives the probability that the robust choice has the smaller ΣΩ.
outputs (in --out): summary.json, report.md, pareto.png (min Omega against size, every uniform
choice and the chosen point; with --activations frontier.png: ΣΩ against BOPs for weight-only and
weight+activation mixed precision and the chosen points), layers.png (per-layer trace/n and bits).
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
    x = q.add_argument_group("activations, inter-layer dependencies and error bars")
    x.add_argument("--activations", action="store_true",
                   help="also choose every layer's input-activation bits from Hessian traces with respect to the "
                        "activations (HAWQ-V2), jointly with the weight bits under the BOPs budget (--bops, 0.5 "
                        "unless given); activations are fake-quantized per tensor over ranges calibrated on the "
                        "sensitivity data")
    x.add_argument("--act-bits", default="4,8", help="candidate activation bits with --activations (default: 4,8)")
    x.add_argument("--max-drop", type=float, metavar="D",
                   help="instead of a size budget: the cheapest configuration whose calibration accuracy drops by "
                        "at most D percentage points (for a non-classifier: whose loss rises by at most D), by "
                        "bisection on a global threshold over dependency-augmented sensitivities (measured "
                        "single-layer and pairwise loss increases; Schaefer et al. 2023), the pure-Hessian order beside it")
    x.add_argument("--pairs", choices=["neighbours", "all"], default="neighbours",
                   help="with --max-drop: measure consecutive layer pairs (default) or all pairs")
    x.add_argument("--robust", nargs="?", type=float, const=1.645, metavar="Z",
                   help="allocate on sensitivities at the upper confidence bound trace + Z * stderr (Z 1.645, a "
                        "one-sided 95%% bound, if not given), and report the plain choice beside it")
    x.add_argument("--redraws", type=int, default=200,
                   help="redraws of the traces from their error bars to check how stable the chosen bits are "
                        "(default: 200; 0 skips the check)")
    t = q.add_argument_group("estimation and fine-tuning")
    t.add_argument("--probes", type=int, default=90, help="Hutch++ products for the traces (default: 90)")
    t.add_argument("--finetune-epochs", type=int, default=0, help="quantization-aware epochs (default: 0)")
    t.add_argument("--lr", type=float, default=1e-2, help="fine-tuning learning rate (default: 0.01)")
    add_default_model_options(t)
    add_output_options(q, "secondorder-quant")
    q.set_defaults(run=run)


def _bits(text: str, option: str = "--bits") -> tuple[int, ...]:
    try:
        bits = tuple(sorted({int(x) for x in text.split(",") if x.strip()}))
    except ValueError:
        raise UsageError(f"{option} must be comma-separated integers, got {text!r}") from None
    if not bits or not all(1 <= b <= 32 for b in bits):
        raise UsageError(f"{option} must lie in 1..32, got {text!r}")
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


def _check_options(args) -> None:
    """Every refusal that needs no model, before any work."""
    if args.finetune_epochs < 0 or args.probes < 3:
        raise UsageError("--finetune-epochs must be >= 0 and --probes >= 3")
    if args.rounding == "gptq" and args.finetune_epochs:
        raise UsageError("--rounding gptq is post-training rounding; quantization-aware fine-tuning "
                         "(--finetune-epochs) would round the weights to nearest again")
    if args.act_order and args.rounding != "gptq":
        raise UsageError("--act-order applies to --rounding gptq only")
    if args.redraws < 0:
        raise UsageError(f"--redraws must be >= 0, got {args.redraws}")
    if args.robust is not None and (not math.isfinite(args.robust) or args.sensitivity != "v2"):
        raise UsageError("--robust needs --sensitivity v2 (trace error bars) and a finite Z")
    if args.max_drop is None:
        return
    clashes = [name for name, value in (("--budget-bits", args.budget_bits), ("--budget-mb", args.budget_mb),
                                        ("--bops", args.bops), ("--robust", args.robust)) if value is not None]
    clashes += [name for name, value in (("--pin", args.pin), ("--tie", args.tie),
                                         ("--activations", args.activations)) if value]
    if clashes:
        raise UsageError(f"--max-drop chooses the bits by measured accuracy, without budgets; drop {', '.join(clashes)}")
    if not math.isfinite(args.max_drop) or args.max_drop < 0:
        raise UsageError(f"--max-drop must be a finite number >= 0, got {args.max_drop}")
    if min(_bits(args.bits)) < 2 or len(_bits(args.bits)) < 2:
        raise UsageError("--max-drop needs at least two candidate weight bit widths in 2..32 (--bits)")


def run(args: argparse.Namespace) -> tuple[dict, str]:
    """The ``quantize`` command: its summary and the text to print."""
    with output_directory(args) as tmp:  # --out first, before any work
        assert tmp is not None
        return _run(args, tmp)


def _run(args: argparse.Namespace, tmp: Path) -> tuple[dict, str]:
    device = device_of(args)
    bits = _bits(args.bits)
    act_bits = _bits(args.act_bits, "--act-bits") if args.activations else None
    _check_options(args)
    model, loss_fn, data, fine_data, eval_data, context = (_own if wants_own_model(args) else _default)(args, device)
    if not quantizable_layers(model):
        raise UsageError("the model has no quantizable layers (modules holding a weight of 2 or more dimensions)")
    with naming_the_batch(model, loss_fn, data):
        summary = _quantize(args, tmp, device, bits, act_bits, model, loss_fn, data, fine_data, eval_data, context)
    table = _markdown(summary).split("\n![")[0] + f"\nreport: {args.out / 'report.md'} (also summary.json, PNGs)"
    return summary, table


# --------------------------------------------------------------------------- allocation


def _tables(args, sens, acts, z: float = 0.0) -> list[dict[str, dict[int, float]]]:
    """The Omega tables the solver takes: the weights' (and the activations'), traces shifted by z stderr."""
    weights = confidence_omega(sens.layers, z) if args.sensitivity == "v2" else sens.eigenvalue_weighted()
    return [weights] if acts is None else [weights, confidence_omega(acts.layers, z)]


def _budgets(args, sizes, macs, bits, act_bits) -> tuple[int, float | None]:
    """The size budget in bits and the BOPs budget (None without --bops, unless activations are chosen)."""
    total = sum(sizes.values())
    budget = args.budget_mb * 8e6 if args.budget_mb is not None else \
        (4.0 if args.budget_bits is None else args.budget_bits) * total
    if args.bops is None and act_bits is None:
        return math.floor(budget), None
    low_act = None if act_bits is None else dict.fromkeys(sizes, min(act_bits))
    high_act = None if act_bits is None else dict.fromkeys(sizes, max(act_bits))
    low = uniform_cost(sizes, min(bits), macs, low_act)[1]
    high = uniform_cost(sizes, max(bits), macs, high_act)[1]
    assert low is not None and high is not None, "uniform_cost has BOPs when given MACs"
    return math.floor(budget), interpolated_budget(low, high, 0.5 if args.bops is None else args.bops)


def _solver(sizes, macs, pins, ties, size_limit, bops, joint: bool):
    """``solve(*tables) -> Allocation`` under the budgets: the DP, HAWQ-V3's ILP, or the joint ILP."""
    if joint:
        return lambda w, a, **kw: allocate_joint(w, a, sizes, macs, size_budget_bits=size_limit, bops_budget=bops,
                                                 pinned=pins, tied=ties, **kw)
    if bops is None:
        return lambda w: allocate_bits(w, sizes, size_limit, pinned=pins, tied=ties)
    return lambda w: allocate_bits_ilp(w, sizes, size_budget_bits=size_limit, macs=macs, bops_budget=bops,
                                       pinned=pins, tied=ties)


def _weight_only(solve, tables, sizes, act_bits) -> tuple[int, Allocation] | None:
    """Weight-only mixed precision at the same budgets: activations uniform, at the width whose best
    weight allocation has the smallest ΣΩ (None when no uniform width fits the budgets).
    """
    found = []
    for a in act_bits:
        try:
            found.append((a, solve(*tables, act_pinned=dict.fromkeys(sizes, a))))
        except ValueError:
            continue
    return min(found, key=lambda pair: (pair[1].sensitivity, -pair[0]), default=None)


def _entries(sens, acts) -> list:
    """Weight and activation sensitivities as one list (activations named "<layer> (activation)")."""
    extra = [] if acts is None else [replace(x, name=f"{x.name} (activation)") for x in acts.layers]
    return [*sens.layers, *extra]


def _configuration(allocation: Allocation) -> dict[str, int]:
    config = dict(allocation.bits)
    config.update({f"{n} (activation)": b for n, b in (allocation.act_bits or {}).items()})
    return config


def _budgeted(args, sens, acts, macs, bits, act_bits, pins, ties) -> tuple[Allocation, dict]:
    """The allocation under the budgets (robust if asked), its stability, and the comparisons."""
    sizes = sens.sizes()
    with user_input("the bit allocation (--budget-*, --bops, --pin, --tie)"):
        size_limit, bops = _budgets(args, sizes, macs, bits, act_bits)
        solve = _solver(sizes, macs, pins, ties, size_limit, bops, acts is not None)
        plain = solve(*_tables(args, sens, acts))
        chosen = plain if args.robust is None else solve(*_tables(args, sens, acts, args.robust))
    extra: dict = {"size budget (bits)": size_limit, "BOPs budget": bops, "plain": plain}
    if args.robust is not None:
        entries = _entries(sens, acts)
        extra["robust"] = {"z": args.robust, "same as plain": _configuration(chosen) == _configuration(plain),
                           "plain bits": plain.bits, "plain act_bits": plain.act_bits,
                           "P(robust beats plain)": beats_probability(entries, _configuration(chosen),
                                                                      _configuration(plain))}
    if args.redraws and args.sensitivity == "v2":
        groups = [sens.layers] if acts is None else [sens.layers, acts.layers]
        extra["stability"] = parametric_stability(groups, solve, chosen, redraws=args.redraws, seed=args.seed)
    if acts is not None:
        extra["weight only"] = _weight_only(solve, _tables(args, sens, acts, args.robust or 0.0), sizes, act_bits)
    return chosen, extra


def _bisected(args, model, loss_fn, data, sens, omega, progress: bool) -> tuple[Allocation, dict]:
    """--max-drop: dependency-augmented and pure-Hessian threshold paths, each bisected on measured damage.

    The dependency table is always measured as loss increases, the window in the user's metric: on a
    classifier that fits its calibration data most single-layer accuracy drops tie at 0, and a path
    ordered by ties jumps from all-high to all-low bits in one step (measured on the digit transformer).
    """
    classifier = evaluate(model, loss_fn, data)["accuracy"] is not None
    metric, limit = ("accuracy", args.max_drop / 100) if classifier else ("loss", args.max_drop)
    names, sizes = [x.name for x in sens.layers], sens.sizes()
    deps = measure_dependencies(model, loss_fn, data, bits=_bits(args.bits), layers=names, pairs=args.pairs,
                                metric="loss", granularity=args.granularity, group_size=args.group_size,
                                progress=progress)
    damage = calibration_damage(model, loss_fn, data, names, metric=metric, granularity=args.granularity,
                                group_size=args.group_size)
    with user_input("--max-drop"):
        searches = {order: bisection_search(threshold_path(table, sizes), damage, limit, sizes)
                    for order, table in (("dependencies", deps.augmented()), ("hessian", omega))}
    found = {order: replace(allocate_bits(omega, sizes, r.size_bits, pinned=r.bits), solver="bisection")
             for order, r in searches.items()}
    return found["dependencies"], {"metric": metric, "limit": limit, "dependencies": deps, "searches": searches,
                                   "hessian": found["hessian"]}


def _frontiers(tables, sizes, macs, pins, ties, weight_only) -> dict[str, list[Allocation]]:
    """ΣΩ against BOPs: weight+activation mixed precision, and weight-only at the uniform activation width."""
    curves = {"weight + activation": joint_frontier(tables[0], tables[1], sizes, macs, pinned=pins, tied=ties)}
    if weight_only is not None:
        curves[f"weight only (activations {weight_only[0]}-bit)"] = joint_frontier(
            tables[0], tables[1], sizes, macs, act_bits=weight_only[0], pinned=pins, tied=ties)
    return curves


# --------------------------------------------------------------------------- quantizing and reporting


def _ptq(model, allocation: Allocation, args, data):
    """The post-training quantized copy, activations calibrated on ``data`` when they are quantized."""
    if allocation.act_bits is None:
        return quantize(model, allocation.bits, granularity=args.granularity, group_size=args.group_size)
    return quantize(model, allocation.bits, allocation.act_bits, args.granularity, args.group_size, calibration=data)


def _allocation_dict(a: Allocation) -> dict:
    return {"bits": a.bits, "act_bits": a.act_bits, "sensitivity": a.sensitivity, "size_bits": a.size_bits,
            "average_bits": a.average_bits, "bops": a.bops, "solver": a.solver}


def _quantize(args, tmp: Path, device, bits, act_bits, model, loss_fn, data, fine_data, eval_data, context) -> dict:
    """Sensitivities, allocation, quantization and evaluation; the report is written into ``tmp``."""
    progress = not args.quiet
    names = parameter_names(args)
    sens = layer_sensitivities(model, loss_fn, data, bits=bits, layers=names, trace_matvecs=args.probes,
                               seed=args.seed, granularity=args.granularity, group_size=args.group_size,
                               progress=progress)
    acts = None
    if act_bits is not None:
        with user_input("--act-bits"):
            acts = activation_sensitivities(model, loss_fn, data, bits=act_bits, layers=[x.name for x in sens.layers],
                                            trace_matvecs=args.probes, seed=args.seed, progress=progress)
    omega = _tables(args, sens, None)[0]
    first = next(iter(as_batches(data)))
    macs = layer_macs(model, to_device(first[0], device))
    pins = _pins(args.pin)
    ties = [tuple(x.strip() for x in t.split(",") if x.strip()) for t in args.tie]
    results = {"full precision": evaluate(model, loss_fn, eval_data, device)}
    if args.max_drop is None:
        allocation, extra = _budgeted(args, sens, acts, macs, bits, act_bits, pins, ties)
    else:
        allocation, extra = _bisected(args, model, loss_fn, data, sens, omega, progress)
    qmodel = _ptq(model, allocation, args, data)
    results["quantized (PTQ)"] = evaluate(qmodel, loss_fn, eval_data, device)
    for label, other in _comparisons(extra, allocation):
        results[label] = evaluate(_ptq(model, other, args, data), loss_fn, eval_data, device)
    gptq = None
    if args.rounding == "gptq":
        try:
            rounded = gptq_quantize(model, allocation.bits, data, granularity=args.granularity,
                                    group_size=args.group_size, act_order=args.act_order, progress=progress)
        except (ValueError, TypeError) as err:
            raise UsageError(f"--rounding gptq: {str(err).strip().splitlines()[0]}") from err
        rounded_model = rounded.model if allocation.act_bits is None else quantize(
            rounded.model, dict.fromkeys(allocation.bits), allocation.act_bits, calibration=data)
        results["quantized (GPTQ)"] = evaluate(rounded_model, loss_fn, eval_data, device)
        gptq = [layer.as_dict() for layer in rounded.layers.values()]
        context["rounding"] = "GPTQ, sequential" + (", activation order" if args.act_order else "")
    if args.finetune_epochs:
        finetune(qmodel, loss_fn, fine_data, epochs=args.finetune_epochs, lr=args.lr, progress=progress)
        results[f"quantized + {args.finetune_epochs} QAT epochs"] = evaluate(qmodel, loss_fn, eval_data, device)
    with user_input("the bit allocation (--pin, --tie)"):
        frontier = pareto_frontier(omega, sens.sizes(), pinned=pins, tied=ties)
        curves = None if acts is None else _frontiers(_tables(args, sens, acts), sens.sizes(), macs, pins, ties,
                                                      extra.get("weight only"))
    context.update({"sensitivity": f"HAWQ-{args.sensitivity.upper()}", "granularity": args.granularity,
                    "candidate bits": list(bits), "machine": describe(device)})
    if act_bits is not None:
        context["candidate activation bits"] = list(act_bits)
    context.update({k: extra[k] for k in ("size budget (bits)", "BOPs budget") if k in extra})
    summary = _summary(context, sens, acts, omega, macs, allocation, results, frontier, extra)
    if gptq is not None:
        summary["gptq"] = gptq
    _plots(tmp, omega, sens, allocation, frontier, curves, extra)
    (tmp / "summary.json").write_text(json.dumps(summary, indent=2))
    (tmp / "report.md").write_text(_markdown(summary))
    return summary


def _comparisons(extra: dict, chosen: Allocation) -> list[tuple[str, Allocation]]:
    """The other configurations the report evaluates beside the chosen one."""
    out = []
    if "robust" in extra and not extra["robust"]["same as plain"]:
        out.append(("plain allocation (PTQ)", extra["plain"]))
    if extra.get("weight only") is not None:
        a, other = extra["weight only"]
        out.append((f"weight only, activations {a}-bit (PTQ)", other))
    if "hessian" in extra and extra["hessian"].bits != chosen.bits:
        out.append(("Hessian order, bisected (PTQ)", extra["hessian"]))
    return out


def _summary(context, sens, acts, omega, macs, allocation, results, frontier, extra) -> dict:
    layers = []
    for x in sens.layers:
        row = {"name": x.name, "size": x.size, "trace_per_weight": x.trace / x.size,
               "trace_stderr_per_weight": x.trace_stderr / x.size, "top_eigenvalue": x.top_eigenvalue,
               "macs": macs[x.name], "omega": {str(b): v for b, v in omega[x.name].items()},
               "bits": allocation.bits[x.name]}
        layers.append(row)
    if acts is not None:
        for row, y in zip(layers, acts.layers):
            row.update({"activation_size": y.size, "activation_trace_per_entry": y.trace / y.size,
                        "activation_trace_stderr_per_entry": y.trace_stderr / y.size,
                        "activation_range": [y.low, y.high],
                        "activation_omega": {str(b): v for b, v in acts.hawq_v2()[y.name].items()},
                        "act_bits": (allocation.act_bits or {}).get(y.name)})
    summary = {"context": context, "layers": layers, "allocation": _allocation_dict(allocation), "results": results,
               "frontier": [{"size_bits": a.size_bits, "sensitivity": a.sensitivity, "bits": a.bits} for a in frontier]}
    if "stability" in extra:
        summary["stability"] = extra["stability"].as_dict()
    if "robust" in extra:
        summary["robust"] = extra["robust"]
    if extra.get("weight only") is not None:
        a, other = extra["weight only"]
        summary["weight only"] = {"uniform activation bits": a, **_allocation_dict(other)}
    if "searches" in extra:
        deps = extra["dependencies"]
        summary["bisection"] = {
            "metric": extra["metric"], "max_drop": extra["limit"], "dependency_metric": deps.metric,
            "pairs": [list(p) for p in deps.pairs],
            "evaluations": deps.evaluations,
            "single": deps.single, "augmented": deps.augmented(),
            "interactions": {f"{i},{j}": {b: deps.interaction(i, j, b) for b in deps.bits} for i, j in deps.pairs},
            "searches": {order: {"bits": r.bits, "damage": r.damage, "size_bits": r.size_bits, "position": r.position,
                                 "path_length": len(r.path), "probed": [list(p) for p in r.probed],
                                 "monotone": r.monotone} for order, r in extra["searches"].items()},
        }
    return summary


def _plots(tmp, omega, sens, allocation, frontier, curves, extra) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4))
    ax.step([a.average_bits for a in frontier], [a.sensitivity for a in frontier], where="post",
            label="Pareto frontier (min ΣΩ, weights)")
    for b in next(iter(omega.values())):
        if all(b in o for o in omega.values()):
            ax.plot([b], [sum(o[b] for o in omega.values())], "s", label=f"uniform {b}-bit")
    ax.plot([allocation.average_bits], [sum(omega[n][b] for n, b in allocation.bits.items())], "r*", ms=14,
            label="chosen")
    _yscale(ax, [a.sensitivity for a in frontier])
    ax.set_xlabel("average bits per weight")
    ax.set_ylabel("ΣΩ (weights)")
    ax.legend(fontsize=8)
    fig.savefig(tmp / "pareto.png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    if curves is not None:
        _frontier_plot(tmp, curves, allocation, extra)
    fig, axes = plt.subplots(1, 2, figsize=(10, 0.45 * len(sens.layers) + 1.6), sharey=True)
    names = [x.name for x in sens.layers]
    axes[0].barh(names, [x.trace / x.size for x in sens.layers], xerr=[2 * x.trace_stderr / x.size
                                                                        for x in sens.layers])
    axes[0].set_title("Tr(H_i) / n_i (±2 stderr)")
    axes[1].barh(names, [allocation.bits[n] for n in names], color="tab:orange", label="weights")
    if allocation.act_bits is not None:
        axes[1].barh(names, [allocation.act_bits[n] for n in names], color="tab:green", height=0.35,
                     label="activations")
        axes[1].legend(fontsize=8)
    axes[1].set_title("chosen bits")
    axes[0].invert_yaxis()
    fig.savefig(tmp / "layers.png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def _yscale(ax, values: list[float]) -> None:
    """Log scale for positive ΣΩ; symmetric log (linear below the smallest magnitude) when some are <= 0."""
    if all(v > 0 for v in values):
        ax.set_yscale("log")
    else:
        ax.set_yscale("symlog", linthresh=min((abs(v) for v in values if v), default=1.0))


def _frontier_plot(tmp, curves, allocation, extra) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4))
    for label, points in curves.items():
        ax.step([a.bops for a in points], [a.sensitivity for a in points], where="post", label=label)
    ax.plot([allocation.bops], [allocation.sensitivity], "r*", ms=14, label="chosen (weight + activation)")
    if extra.get("weight only") is not None:
        a, other = extra["weight only"]
        ax.plot([other.bops], [other.sensitivity], "kD", ms=8, label=f"chosen weight only ({a}-bit activations)")
    if extra.get("BOPs budget") is not None:
        ax.axvline(extra["BOPs budget"], color="grey", ls="--", lw=1, label="BOPs budget")
    ax.set_xscale("log")
    _yscale(ax, [a.sensitivity for points in curves.values() for a in points])
    ax.set_xlabel("BOPs per sample (MACs × weight bits × activation bits)")
    ax.set_ylabel("ΣΩ (weights + activations)")
    ax.legend(fontsize=7)
    fig.savefig(tmp / "frontier.png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def _fmt_bits(a: dict) -> str:
    return ", ".join(f"{n}={b}" for n, b in a.items())


def _markdown(summary: dict) -> str:
    lines = ["# secondorder quantize: Hessian-aware mixed precision (HAWQ)", ""]
    lines += [f"- **{k}**: {v}" for k, v in summary["context"].items()] + [""]
    acts = "act_bits" in summary["layers"][0]
    head = "| layer | weights | Tr/n ± stderr | top eigenvalue | bits |"
    rule = "|---|---:|---:|---:|---:|"
    if acts:
        head, rule = head + " activation Tr/n ± stderr | activation bits |", rule + "---:|---:|"
    lines += [head, rule]
    for layer in summary["layers"]:
        row = (f"| {layer['name']} | {layer['size']} | {layer['trace_per_weight']:.4g} ± "
               f"{layer['trace_stderr_per_weight']:.2g} | {layer['top_eigenvalue']:.4g} | {layer['bits']} |")
        if acts:
            row += (f" {layer['activation_trace_per_entry']:.4g} ± {layer['activation_trace_stderr_per_entry']:.2g}"
                    f" | {layer['act_bits']} |")
        lines.append(row)
    a, r = summary["allocation"], summary["results"]
    lines += ["", f"Size {a['size_bits'] / 8e6:.4f} MB ({a['average_bits']:.3f} bits per weight), "
              f"ΣΩ {a['sensitivity']:.4g}, solver {a['solver']}" + (f", BOPs {a['bops']:.4g}" if a["bops"] else "")]
    if "stability" in summary:
        s = summary["stability"]
        lines += ["", f"Stability: the same bits come back in {100 * s['frequency']:.1f}% ± {100 * s['stderr']:.1f}% "
                  f"of {s['redraws']} redraws of the traces from their error bars ({s['distinct']} distinct "
                  "configurations)" + ("; the choice is fragile, consider --robust or more --probes"
                                       if s["frequency"] < 0.8 else "")]
    if "robust" in summary:
        rb = summary["robust"]
        lines += ["", f"Robust allocation (traces + {rb['z']:g} stderr): "
                  + ("the same bits as the plain allocation" if rb["same as plain"] else
                     f"plain bits would be {_fmt_bits(rb['plain bits'])}; P(robust ΣΩ < plain ΣΩ) = "
                     f"{rb['P(robust beats plain)']:.3f}")]
    if "weight only" in summary:
        w = summary["weight only"]
        lines += ["", f"Weight-only mixed precision at the same budgets (activations {w['uniform activation bits']}-bit): "
                  f"bits {_fmt_bits(w['bits'])}, ΣΩ {w['sensitivity']:.4g}, BOPs {w['bops']:.4g}"]
    if "bisection" in summary:
        lines += _bisection_lines(summary["bisection"])
    lines += ["", "| model | loss | accuracy |", "|---|---:|---:|"]
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
    figures = ["", "![Pareto frontier](pareto.png)", "", "![layers](layers.png)", ""]
    if "weight only" in summary or acts:
        figures[1:1] = ["![weight-only vs weight+activation frontier](frontier.png)", ""]
    return "\n".join(lines + figures)


def _bisection_lines(b: dict) -> list[str]:
    unit = "accuracy drop (fraction)" if b["metric"] == "accuracy" else "loss increase"
    lines = ["", f"Bisection inside the window: {unit} at most {b['max_drop']:.4g} on the sensitivity data "
             f"({b['evaluations']} calibration passes measured the dependencies as {b['dependency_metric']} increases)", "",
             "| order | bits | size (bits) | measured damage | path position | evaluations | monotone |",
             "|---|---|---:|---:|---:|---:|---|"]
    for order, s in b["searches"].items():
        lines.append(f"| {order} | {_fmt_bits(s['bits'])} | {s['size_bits']} | {s['damage']:.4g} | "
                     f"{s['position']}/{s['path_length'] - 1} | {len(s['probed'])} | {s['monotone']} |")
    return lines
