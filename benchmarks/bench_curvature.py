#!/usr/bin/env python
"""secondorder against PyHessian 0.1: speed, accuracy and memory, in one process.

Runs both libraries on the same models, data and seeds and prints one markdown table with
both numbers, their ratio (secondorder / PyHessian, lower is better) and PASS/FAIL against
the project's targets. See ``benchmarks/README.md`` for the protocol of every target.

    python benchmarks/bench_curvature.py                 # full run (a few minutes on 2 cores)
    python benchmarks/bench_curvature.py --quick         # smoke run (under a minute)
    python benchmarks/bench_curvature.py --targets 1,3 --json out.json

Needs ``pyhessian==0.1`` (``pip install --no-deps pyhessian==0.1``; ``./run bench`` does it).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
from machine import Contention, prepare
from torch import nn

NUM_THREADS = prepare()
import secondorder  # noqa: E402  (after prepare() put src/ on the path if needed)
from secondorder.environment import cpu_model  # noqa: E402
from secondorder.environment import describe as machine


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------
def git_commit() -> str:
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "src"], capture_output=True,
                               text=True, check=True).stdout.strip()
        return head + (" (src modified)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def load() -> str:
    try:
        return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "load average unknown"


TIMED = {"1", "2"}  # the targets whose result is a time
DEVICE = torch.device("cpu")  # set by --device (targets 1 and 2 only)


def synchronize() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def warn_contention(target: str, contention: Contention) -> float:
    other, wall, share = contention.share()
    msg = f"target {target}: other processes used {other:.1f} CPU-s in {wall:.1f} s ({100 * share:.0f}% of the machine)"
    if share > 0.05 and target in TIMED:
        msg += "  ** WARNING: the machine was shared; timings are unreliable, rerun on an idle machine **"
    print(msg, flush=True)
    return share


def section(title: str) -> None:
    print(f"\n## {title}\nmachine: {machine(DEVICE)}; {load()}", flush=True)


def best_times(fns, reps: int, warmup: int = 1) -> list[float]:
    """Minimum wall time of ``reps`` calls of each function, after ``warmup`` untimed calls each.

    The functions take turns (one call of each per round), so a slow phase of the machine
    hits all of them alike.
    """
    for fn in fns:
        for _ in range(warmup):
            fn()
    times = [[] for _ in fns]
    for _ in range(reps):
        for fn, ts in zip(fns, times):
            gc.collect()
            synchronize()
            t0 = time.perf_counter()
            fn()
            synchronize()
            ts.append(time.perf_counter() - t0)
    return [min(ts) for ts in times]


def best_time(fn, reps: int, warmup: int = 1) -> float:
    return best_times([fn], reps, warmup)[0]


def import_pyhessian():
    try:
        from pyhessian import hessian  # noqa: F401
    except ImportError as exc:  # pragma: no cover
        sys.exit(f"PyHessian is not installed ({exc}); run: pip install --no-deps pyhessian==0.1")
    # pyhessian/__init__.py re-exports the class `hessian`, which shadows the submodule
    # attribute, so the module object has to be taken from sys.modules.
    return sys.modules["pyhessian.hessian"]


NEVER_STOP = float("-inf")  # PyHessian's trace stops when |dmean|/(mean+1e-6) < tol: never with -inf


def flat_to_list(v: torch.Tensor, params) -> list[torch.Tensor]:
    out, offset = [], 0
    for p in params:
        out.append(v[offset : offset + p.numel()].view_as(p).clone())
        offset += p.numel()
    return out


def list_to_flat(vs) -> torch.Tensor:
    return torch.cat([v.reshape(-1) for v in vs])


def mlp(dtype=torch.float32) -> nn.Module:
    return nn.Sequential(
        nn.Linear(784, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 10)
    ).to(dtype)


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 16, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 12 * 12, 10),
    )


class Row:
    """One line of the results table."""

    def __init__(self, target, metric, ours, theirs, ratio, goal, passed, unit=""):
        self.target, self.metric, self.ours, self.theirs = target, metric, ours, theirs
        self.ratio, self.goal, self.passed, self.unit = ratio, goal, passed, unit

    def cells(self) -> list[str]:
        def fmt(x):
            if x is None:
                return "-"
            if isinstance(x, str):
                return x
            if isinstance(x, int):
                return str(x)
            return f"{x:.4g}"

        verdict = "-" if self.passed is None else ("PASS" if self.passed else "FAIL")
        unit = f" {self.unit}" if self.unit else ""
        ours = fmt(self.ours) + (unit if self.ours is not None else "")
        theirs = fmt(self.theirs) + (unit if self.theirs is not None else "")
        return [self.target, self.metric, ours, theirs, fmt(self.ratio), self.goal, verdict]

    def as_dict(self) -> dict:
        return dict(
            target=self.target, metric=self.metric, secondorder=self.ours, pyhessian=self.theirs,
            ratio=self.ratio, goal=self.goal, passed=self.passed, unit=self.unit,
        )


def table(rows: list[Row]) -> str:
    head = ["target", "metric", "secondorder", "PyHessian 0.1", "ratio", "goal", "result"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    lines += ["| " + " | ".join(r.cells()) + " |" for r in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# target 1: per-HVP time, 16 probes on one batch (+ the HVP / gradient cost ratio)
# ---------------------------------------------------------------------------------------
def per_hvp_times(name, model, X, y, reps, K=16):
    ph = import_pyhessian()
    loss_fn = nn.CrossEntropyLoss()
    model.eval()  # PyHessian forces eval(); differentiate the same function
    A = secondorder.HessianOperator(model, loss_fn, (X, y))
    P = A.shape[0]
    gen = torch.Generator().manual_seed(0)
    V = torch.randn(P, K, generator=gen).to(DEVICE)
    cuda = DEVICE.type == "cuda"

    H = ph.hessian(copy.deepcopy(model), loss_fn, data=(X, y), cuda=cuda)
    vs = [flat_to_list(V[:, k], H.params) for k in range(K)]

    def ours():
        return A @ V

    def theirs():
        return [ph.hessian_vector_product(H.gradsH, H.params, v) for v in vs]

    # same matrix? compare the 16 columns
    HV = ours()
    HV_ph = torch.stack([list_to_flat(hv) for hv in theirs()], dim=1)
    agree = float((HV - HV_ph).norm() / HV_ph.norm())

    v1 = V[:, :1].contiguous()
    copies = [copy.deepcopy(model) for _ in range(reps + 1)]

    def build():  # PyHessian's one-off graph construction (forward + create_graph backward in __init__)
        ph.hessian(copies.pop(), loss_fn, data=(X, y), cuda=cuda)

    def gradient():
        return torch.autograd.grad(loss_fn(model(X), y), list(model.parameters()))

    # forward-over-reverse, vmap(jvp(grad)): the alternative to the double backward that
    # secondorder uses (the choice is documented in benchmarks/README.md)
    from torch.func import functional_call, grad, jvp, vmap

    names = [n for n, _ in model.named_parameters()]
    pdict = {n: p.detach() for n, p in model.named_parameters()}
    rows_ = V.T.contiguous()
    tangents, offset = {}, 0
    for n in names:
        k = pdict[n].numel()
        tangents[n] = rows_[:, offset : offset + k].reshape(K, *pdict[n].shape)
        offset += k
    grad_fn = grad(lambda p: loss_fn(functional_call(model, p, (X,)), y))

    def fwd_rev():
        return vmap(lambda t: jvp(grad_fn, (pdict,), (t,))[1])(tangents)

    fr = fwd_rev()
    fr_flat = torch.cat([fr[n].reshape(K, -1) for n in names], dim=1).T
    agree_fr = float((fr_flat - HV_ph).norm() / HV_ph.norm())

    V_col = V.T.contiguous().T  # same values, column-major: the layout of the library's own probes
    A_vmap = secondorder.HessianOperator(model, loss_fn, (X, y), backend="vmap")
    A_jvp = secondorder.HessianOperator(model, loss_fn, (X, y), backend="jvp")
    agree_jvp = float(((A_jvp @ V) - HV_ph).norm() / HV_ph.norm())
    t_ours, t_theirs, t_single, t_grad, t_build, t_fr, t_col, t_vmap, t_jvp = best_times(
        [ours, theirs, lambda: A @ v1, gradient, build, fwd_rev, lambda: A @ V_col, lambda: A_vmap @ V_col,
         lambda: A_jvp @ V_col], reps
    )
    t_ours, t_theirs, t_fr, t_col, t_vmap, t_jvp = (t / K for t in (t_ours, t_theirs, t_fr, t_col, t_vmap, t_jvp))
    # PyHessian's per-HVP time excludes its graph construction; ours includes the forward and
    # backward that every call makes (amortized over the K probes).
    print(
        f"{name}: P={P}, batch {X.shape[0]}, K={K}; per HVP: secondorder {t_ours * 1e3:.3f} ms "
        f"(a single-probe product: {t_single * 1e3:.3f} ms), "
        f"PyHessian {t_theirs * 1e3:.3f} ms (+ {t_build * 1e3:.1f} ms one-off graph build); "
        f"one gradient (forward+backward) {t_grad * 1e3:.3f} ms; "
        f"relative difference of the 16 products {agree:.2e}; forward-over-reverse vmap(jvp(grad)) "
        f"{t_fr * 1e3:.3f} ms per HVP (difference {agree_fr:.1e})",
        flush=True,
    )
    return dict(P=P, ours=t_ours, theirs=t_theirs, build=t_build, grad=t_grad, agree=agree, single=t_single,
                fwd_rev=t_fr, colmajor=t_col, vmap=t_vmap, jvp=t_jvp, agree_jvp=agree_jvp)


def target1(args) -> tuple[list[Row], dict]:
    section("Target 1: time per Hessian-vector product, K = 16 probes on one batch")
    reps = 3 if args.quick else 10
    rows, raw = [], {}
    torch.manual_seed(0)
    model = mlp().to(DEVICE)
    X, y = torch.randn(256, 784).to(DEVICE), torch.randint(0, 10, (256,)).to(DEVICE)
    r = per_hvp_times("1a MLP 784-256-256-10 tanh", model, X, y, reps)
    raw["mlp"] = r
    ok = r["agree"] < 1e-4
    rows.append(Row("1a", "MLP 784-256-256-10, batch 256: time per HVP", r["ours"] * 1e3, r["theirs"] * 1e3,
                    r["ours"] / r["theirs"], "<= 0.6", ok and r["ours"] / r["theirs"] <= 0.6, "ms"))
    torch.manual_seed(0)
    model = cnn().to(DEVICE)
    X, y = torch.randn(128, 1, 28, 28).to(DEVICE), torch.randint(0, 10, (128,)).to(DEVICE)
    c = per_hvp_times("1b CNN conv8-conv16-pool-linear", model, X, y, reps)
    raw["cnn"] = c
    ok = c["agree"] < 1e-4
    rows.append(Row("1b", "CNN 1x28x28, batch 128: time per HVP", c["ours"] * 1e3, c["theirs"] * 1e3,
                    c["ours"] / c["theirs"], "<= 0.6", ok and c["ours"] / c["theirs"] <= 0.6, "ms"))
    for tag, d, label in (("1a (info)", r, "MLP"), ("1b (info)", c, "CNN")):
        rows.append(Row(tag, f"{label}: time per HVP, column-major V (the library's probe layout)",
                        d["colmajor"] * 1e3, d["theirs"] * 1e3, d["colmajor"] / d["theirs"], "info", None, "ms"))
        rows.append(Row(tag, f"{label}: time per HVP, backend='vmap' (batched double backward), column-major V",
                        d["vmap"] * 1e3, d["theirs"] * 1e3, d["vmap"] / d["theirs"], "info", None, "ms"))
        rows.append(Row(tag, f"{label}: time per HVP, forward-over-reverse vmap(jvp(grad)), 16 probes",
                        d["fwd_rev"] * 1e3, d["theirs"] * 1e3, d["fwd_rev"] / d["theirs"], "info", None, "ms"))
        rows.append(Row(tag, f"{label}: time per HVP, backend='jvp' (the operator's forward-over-reverse; "
                        f"difference {d['agree_jvp']:.0e})", d["jvp"] * 1e3, d["theirs"] * 1e3,
                        d["jvp"] / d["theirs"], "info", None, "ms"))
    ratio = r["ours"] / r["grad"]
    single = r["single"] / r["grad"]
    print(f"HVP / gradient (MLP): batched {r['ours'] * 1e3:.3f} ms / {r['grad'] * 1e3:.3f} ms = {ratio:.2f}; "
          f"single probe {r['single'] * 1e3:.3f} ms / {r['grad'] * 1e3:.3f} ms = {single:.2f} "
          "(Pearlmutter limit about 2 for one unbatched product)", flush=True)
    rows.append(Row("HVP/grad", "MLP: per-probe HVP time (16-probe batch) / one gradient (forward+backward)", ratio,
                    None, None, "info (~2)", None, "x"))
    rows.append(Row("HVP/grad", "MLP: single-probe HVP time / one gradient (forward+backward)", single,
                    None, None, "info (~2)", None, "x"))
    return rows, raw


# ---------------------------------------------------------------------------------------
# target 2: Hutchinson trace over a loader of 8 batches, 32 probes
# ---------------------------------------------------------------------------------------
def target2(args) -> tuple[list[Row], dict]:
    section("Target 2: Hutchinson trace over 8 batches of 256 (MLP), 32 probes")
    ph = import_pyhessian()
    reps = 1 if args.quick else 3
    torch.manual_seed(0)
    model = mlp().eval().to(DEVICE)
    loss_fn = nn.CrossEntropyLoss()
    batches = [(torch.randn(256, 784).to(DEVICE), torch.randint(0, 10, (256,)).to(DEVICE)) for _ in range(8)]
    A = secondorder.HessianOperator(model, loss_fn, batches)
    H = ph.hessian(copy.deepcopy(model), loss_fn, dataloader=batches, cuda=DEVICE.type == "cuda")

    # the same operator? one dataset-level product each
    v = torch.randn(A.shape[0], generator=torch.Generator().manual_seed(1)).to(DEVICE)
    _, hv_ph = H.dataloader_hv_product(flat_to_list(v, H.params))
    agree = float(((A @ v) - list_to_flat(hv_ph)).norm() / list_to_flat(hv_ph).norm())

    out = {}

    def ours():
        out["ours"] = secondorder.trace(A, 32, method="hutchinson", seed=0)

    def theirs():
        torch.manual_seed(0)
        out["theirs"] = H.trace(maxIter=32, tol=NEVER_STOP)

    # warm-up with short runs (a full PyHessian run is the expensive part)
    secondorder.trace(A, 4, method="hutchinson", seed=0)
    H.trace(maxIter=2, tol=NEVER_STOP)
    t_ours, t_theirs = best_times([ours, theirs], reps, warmup=0)
    samples = out["theirs"]
    assert len(samples) == 32, f"PyHessian ran {len(samples)} probes, not 32"
    assert out["ours"].num_matvecs == 32
    est_ph, se_ph = float(np.mean(samples)), float(np.std(samples, ddof=1) / math.sqrt(32))
    res = out["ours"]
    print(
        f"P={A.shape[0]}; secondorder {t_ours:.3f} s, trace {res.value:.4f} +- {res.stderr:.4f}; "
        f"PyHessian {t_theirs:.3f} s ({len(samples)} samples), trace {est_ph:.4f} +- {se_ph:.4f}; "
        f"relative difference of one data-set HVP {agree:.2e}",
        flush=True,
    )
    if abs(res.value - est_ph) <= 1e-5 * abs(est_ph):
        print("(same estimate: trace(..., method='hutchinson', seed=0) draws the same Rademacher probes as "
              "PyHessian after torch.manual_seed(0))", flush=True)
    ratio = t_ours / t_theirs
    row = Row("2", "trace, 32 Hutchinson probes, 8 batches x 256 (MLP): time", t_ours, t_theirs, ratio,
              "<= 0.35", agree < 1e-4 and ratio <= 0.35, "s")
    raw = dict(ours=t_ours, theirs=t_theirs, agree=agree, value=res.value, stderr=res.stderr,
               value_ph=est_ph, stderr_ph=se_ph, samples_ph=len(samples))
    return [row], raw


# ---------------------------------------------------------------------------------------
# targets 3 and 4: accuracy on a trained small network against its exact Hessian
# ---------------------------------------------------------------------------------------
_TRAINED = {}


def trained_problem(quiet=False):
    """A 20-32-32-4 tanh MLP trained in float64 on a seeded Gaussian mixture, and its exact Hessian."""
    if "problem" in _TRAINED:
        return _TRAINED["problem"]
    g = torch.Generator().manual_seed(0)
    n, d, c = 512, 20, 4
    centers = torch.randn(c, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, c, (n,), generator=g)
    X = centers[y] + torch.randn(n, d, generator=g, dtype=torch.float64)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(d, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, c)).double()
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.Adam(model.parameters())  # default lr 1e-3
    for _ in range(300):
        opt.zero_grad()
        loss = loss_fn(model(X), y)
        loss.backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    model.eval()
    with torch.no_grad():
        out = model(X)
        final_loss, acc = float(loss_fn(out, y)), float((out.argmax(1) == y).double().mean())

    names = [n_ for n_, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def f(flat):
        d_, off = {}, 0
        for name, shape in zip(names, shapes):
            k = math.prod(shape)
            d_[name] = flat[off : off + k].view(shape)
            off += k
        return loss_fn(torch.func.functional_call(model, d_, (X,)), y)

    t0 = time.perf_counter()
    Hx = torch.autograd.functional.hessian(f, flat0, vectorize=True)
    t_exact = time.perf_counter() - t0
    asym = float((Hx - Hx.T).abs().max())
    scale = float(Hx.abs().max())
    assert asym <= 1e-10 * scale, f"exact Hessian not symmetric: max|H-H^T| = {asym}, max|H| = {scale}"
    Hx = (Hx + Hx.T) / 2
    evals = torch.linalg.eigvalsh(Hx)
    by_mag = evals.abs().sort(descending=True).values
    frob10 = float((by_mag[:10] ** 2).sum() / (by_mag**2).sum())
    prob = dict(model=model, X=X, y=y, loss_fn=loss_fn, H=Hx, trace=float(Hx.diagonal().sum()), evals=evals,
                loss=final_loss, acc=acc, asym=asym, t_exact=t_exact, frob10=frob10)
    print(
        f"trained 20-32-32-4 tanh MLP (float64, P={flat0.numel()}, 512 samples, 300 Adam steps, lr 1e-3): loss "
        f"{final_loss:.4f}, train accuracy {acc:.3f}; exact Hessian in {t_exact:.1f} s, max|H-H^T| = {asym:.1e}; "
        f"tr(H) = {prob['trace']:.6f}; eigenvalues in [{float(evals[0]):.4g}, {float(evals[-1]):.4g}], "
        f"{int((evals < 0).sum())} negative; the 10 largest |eigenvalues| hold {100 * frob10:.1f}% of ||H||_F^2 "
        f"(what Hutch++'s 10-vector sketch at 30 matvecs can remove)",
        flush=True,
    )
    # our operator against the exact matrix
    A = secondorder.HessianOperator(model, loss_fn, (X, y))
    V = torch.randn(A.shape[0], 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    err = float(((A @ V) - Hx @ V).norm() / (Hx @ V).norm())
    print(f"secondorder HessianOperator vs exact Hessian on 4 random vectors: relative error {err:.1e}", flush=True)
    prob["operator_err"] = err
    _TRAINED["problem"] = prob
    return prob


def target3(args) -> tuple[list[Row], dict]:
    section("Target 3: trace accuracy at 30 matvecs on a trained network (float64)")
    ph = import_pyhessian()
    prob = trained_problem()
    model, X, y, loss_fn, exact, Hx = prob["model"], prob["X"], prob["y"], prob["loss_fn"], prob["trace"], prob["H"]
    n_target = 6 if args.quick else 20  # the seeds the targets are judged on
    n_all = n_target if args.quick else 200  # more seeds, as a check of how much 20 seeds can say
    m = 30
    A = secondorder.HessianOperator(model, loss_fn, (X, y))
    H = ph.hessian(copy.deepcopy(model), loss_fn, data=(X, y), cuda=False)
    err = {"hutch++": [], "xtrace": [], "pyhessian": []}
    cover = {"hutch++": [], "xtrace": []}
    for s in range(n_all):
        for method in ("hutch++", "xtrace"):
            r = secondorder.trace(A, m, method=method, seed=s)
            assert r.num_matvecs == m
            lo, hi = r.confidence_interval(0.95)
            err[method].append(abs(r.value - exact) / abs(exact))
            cover[method].append(lo <= exact <= hi)
        torch.manual_seed(s)  # PyHessian draws its probes from the global RNG
        samples = H.trace(maxIter=m, tol=NEVER_STOP)
        assert len(samples) == m, f"PyHessian ran {len(samples)} probes, not {m}"
        err["pyhessian"].append(abs(float(np.mean(samples)) - exact) / abs(exact))

    def stats(n):
        med = {k: statistics.median(v[:n]) for k, v in err.items()}
        cov = {k: sum(v[:n]) / n for k, v in cover.items()}
        return med, cov

    # Hutchinson with Rademacher probes: variance 2 (||H||_F^2 - sum_i H_ii^2) / m exactly; for a
    # near-normal mean, the median absolute error is 0.6745 standard deviations.
    sd = math.sqrt(2 * float((Hx**2).sum() - (Hx.diagonal() ** 2).sum()) / m)
    expected_ph = 0.6745 * sd / abs(exact)
    med, cov = stats(n_target)
    print(f"exact tr(H) = {exact:.6f}; {m} matvecs per estimate", flush=True)
    for n in sorted({n_target, n_all}):
        med_n, cov_n = stats(n)
        print(f"  seeds 0..{n - 1}:", flush=True)
        for k in err:
            extra = f", 95% CI coverage {cov_n[k]:.3f}" if k in cov_n else ""
            print(f"    {k:10s} median relative error {med_n[k]:.3e} (max {max(err[k][:n]):.3e}){extra}", flush=True)
    print(f"  Hutchinson's expected median relative error from the exact variance: {expected_ph:.3e}", flush=True)
    rows = []
    for tag, method in (("3a", "hutch++"), ("3b", "xtrace")):
        ratio = med[method] / med["pyhessian"]
        rows.append(Row(tag, f"trace, 30 matvecs, {n_target} seeds: median rel. error ({method} vs Hutchinson)",
                        med[method], med["pyhessian"], ratio, "<= 1/3", ratio <= 1 / 3))
    for tag, method in (("3c", "hutch++"), ("3d", "xtrace")):
        rows.append(Row(tag, f"95% CI covers exact trace ({method}), fraction of {n_target} seeds", cov[method], None,
                        None, ">= 0.9", cov[method] >= 0.9))
    if n_all > n_target:
        med_a, cov_a = stats(n_all)
        for method in ("hutch++", "xtrace"):
            rows.append(Row("3 (info)", f"as 3a/3b over {n_all} seeds: median rel. error ({method} vs Hutchinson)",
                            med_a[method], med_a["pyhessian"], med_a[method] / med_a["pyhessian"], "info", None))
        rows.append(Row("3 (info)", f"95% CI coverage over {n_all} seeds (hutch++ / xtrace)",
                        f"{cov_a['hutch++']:.3f} / {cov_a['xtrace']:.3f}", None, None, "info", None))
    rows.append(Row("3 (info)", "Hutchinson's expected median rel. error (exact variance, 30 probes)", None,
                    expected_ph, None, "info", None))
    raw = dict(exact=exact, seeds_target=n_target, seeds_all=n_all, errors=err, median=med, coverage=cov,
               expected_hutchinson_median=expected_ph, frob_share_top10=prob["frob10"])
    return rows, raw


def target4(args) -> tuple[list[Row], dict]:
    section("Target 4: top-5 eigenvalues of the trained network (float64)")
    ph = import_pyhessian()
    prob = trained_problem()
    model, X, y, loss_fn, evals = prob["model"], prob["X"], prob["y"], prob["loss_fn"], prob["evals"]
    k = 5
    exact_top = evals.flip(0)[:k]  # algebraic largest
    exact_mag = evals[evals.abs().argsort(descending=True)][:k]  # largest magnitude (what power iteration finds)

    A = secondorder.HessianOperator(model, loss_fn, (X, y))
    # the target asks for 1e-6: a relative residual tolerance of 1e-6 certifies |lambda - theta| <= 1e-6 ||A||
    # (Bauer-Fike); the library's default (1e-10 in float64) is reported as an info row
    tol = 1e-6
    t0 = time.perf_counter()
    res = secondorder.eigenvalues(A, k, seed=0, tol=tol)
    t_ours = time.perf_counter() - t0
    strict = secondorder.eigenvalues(A, k, seed=0)
    err_strict = float(((strict.eigenvalues.double() - exact_top).abs() / exact_top.abs()).max())
    ours = res.eigenvalues.double()
    err_ours = float(((ours - exact_top).abs() / exact_top.abs()).max())

    mod = ph  # count the HVPs that hessian.eigenvalues makes (it calls the name imported into pyhessian.hessian)
    counter = {"n": 0}
    original = mod.hessian_vector_product

    def counting(gradsH, params, v):
        counter["n"] += 1
        return original(gradsH, params, v)

    H = mod.hessian(copy.deepcopy(model), loss_fn, data=(X, y), cuda=False)
    mod.hessian_vector_product = counting
    try:
        torch.manual_seed(0)
        t0 = time.perf_counter()
        vals, _ = H.eigenvalues(top_n=k)  # defaults: maxIter=100, tol=1e-3
        t_theirs = time.perf_counter() - t0
    finally:
        mod.hessian_vector_product = original
    n_ph = counter["n"]
    theirs = torch.tensor(vals, dtype=torch.float64)
    theirs_sorted = theirs[theirs.abs().argsort(descending=True)]
    err_ph = float(((theirs_sorted - exact_mag).abs() / exact_mag.abs()).max())
    same_set = bool(torch.equal(exact_top.sort().values, exact_mag.sort().values))
    print(f"exact top-5 (algebraic):  {[round(float(v), 8) for v in exact_top]}", flush=True)
    if not same_set:
        print(f"exact top-5 by magnitude: {[round(float(v), 8) for v in exact_mag]}", flush=True)
    print(
        f"secondorder eigenvalues(A, 5): {[round(float(v), 8) for v in ours]}, converged "
        f"{bool(res.converged.all())}, {res.num_matvecs} matvecs, {res.num_restarts} restarts, {t_ours:.2f} s; "
        f"max relative error {err_ours:.1e}",
        flush=True,
    )
    print(
        f"PyHessian eigenvalues(top_n=5), returned order: {[round(v, 8) for v in vals]}; {n_ph} HVPs, "
        f"{t_theirs:.2f} s; max relative error (sorted by magnitude) {err_ph:.1e}",
        flush=True,
    )
    ratio = res.num_matvecs / n_ph
    rows = [
        Row("4a", "top-5 eigenvalues (tol=1e-6): max relative error", err_ours, err_ph, None, "ours <= 1e-6",
            err_ours <= 1e-6 and bool(res.converged.all())),
        Row("4b", "top-5 eigenvalues: matvecs (tol=1e-6)", res.num_matvecs, n_ph, ratio, "<= 1/3", ratio <= 1 / 3),
        Row("4 (info)", f"default tol 1e-10: matvecs (max rel. error {err_strict:.1e})", strict.num_matvecs, n_ph,
            strict.num_matvecs / n_ph, "info", None),
        Row("4 (info)", f"top-5 eigenvalues (tol=1e-6): wall time (default block of {res.block_size})",
            f"{t_ours:.3f} s", f"{t_theirs:.3f} s", t_ours / t_theirs, "info", None),
    ]
    # the default start block of k vectors certifies every copy of a repeated eigenvalue; smaller
    # blocks cost fewer products but certify nothing ranked after a value found block_size times
    for b in (1, 2):
        small = secondorder.eigenvalues(A, k, seed=0, tol=tol, block_size=b)
        rows.append(Row("4 (info)", f"top-5 eigenvalues (tol=1e-6), block_size={b}: matvecs "
                        f"({int(small.converged.sum())} of {k} certified)", small.num_matvecs, n_ph,
                        small.num_matvecs / n_ph, "info", None))
    # both counts depend on the random start: repeat over seeds 1..9 (info)
    sweep = {"ours": [res.num_matvecs], "theirs": [n_ph], "err_ours": [err_ours], "err_ph": [err_ph]}
    if not args.quick:
        mod.hessian_vector_product = counting
        try:
            for seed in range(1, 10):
                r = secondorder.eigenvalues(A, k, seed=seed, tol=tol)
                sweep["ours"].append(r.num_matvecs)
                sweep["err_ours"].append(float(((r.eigenvalues.double() - exact_top).abs() / exact_top.abs()).max()))
                counter["n"] = 0
                torch.manual_seed(seed)
                v = torch.tensor(H.eigenvalues(top_n=k)[0], dtype=torch.float64)
                v = v[v.abs().argsort(descending=True)]
                sweep["theirs"].append(counter["n"])
                sweep["err_ph"].append(float(((v - exact_mag).abs() / exact_mag.abs()).max()))
        finally:
            mod.hessian_vector_product = original
        print(f"seeds 0..9: secondorder matvecs {sweep['ours']}, max rel. error <= {max(sweep['err_ours']):.1e}; "
              f"PyHessian HVPs {sweep['theirs']}, max rel. error {min(sweep['err_ph']):.1e} .. "
              f"{max(sweep['err_ph']):.1e}", flush=True)
        mo, mt = statistics.median(sweep["ours"]), statistics.median(sweep["theirs"])
        rows.append(Row("4 (info)", "top-5 eigenvalues, seeds 0..9: median matvecs", mo, mt, mo / mt, "info", None))
    raw = dict(exact=exact_top.tolist(), ours=ours.tolist(), theirs=vals, err_ours=err_ours, err_ph=err_ph,
               matvecs_ours=res.num_matvecs, matvecs_ph=n_ph, time_ours=t_ours, time_ph=t_theirs,
               magnitude_order_differs=not same_set, seed_sweep=sweep)
    return rows, raw


# ---------------------------------------------------------------------------------------
# target 5: peak memory of a chunked 64-probe trace vs one probe (fresh subprocesses)
# ---------------------------------------------------------------------------------------
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def anon_bytes() -> int:
    """Anonymous resident memory (heap and mmapped tensors, no shared-library code pages)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


def maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


def memory_child(config: str) -> None:
    """Run one trace configuration and print its peak RSS increase (bytes) as JSON."""
    loss_fn = nn.CrossEntropyLoss()
    # Warm-up: a plain gradient on the real model, and both HVP code paths (vmapped batch of
    # probes, single probe) on a tiny model, so that lazily loaded library code, functorch and
    # thread pools are in the baseline and only the data of the measured run is counted.
    tiny = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)).eval()
    tiny_data = (torch.randn(16, 8), torch.randint(0, 3, (16,)))
    secondorder.trace(secondorder.HessianOperator(tiny, loss_fn, tiny_data, chunk_size=2), 4,
                      method="hutchinson", seed=0, probe_chunk=2)
    secondorder.trace(secondorder.HessianOperator(tiny, loss_fn, tiny_data), 1, method="hutchinson", seed=0)
    torch.manual_seed(0)
    model = mlp().eval()
    X, y = torch.randn(256, 784), torch.randint(0, 10, (256,))
    for _ in range(3):
        torch.autograd.grad(loss_fn(model(X), y), list(model.parameters()))
    # config "k<probes>" or "k<probes>_chunk<probe_chunk>" (also the operator's chunk_size), e.g. "k64_chunk8", "k1"
    try:
        probes, _, chunk = config.partition("_chunk")
        m, chunk_size = int(probes.removeprefix("k")), (int(chunk) if chunk else None)
    except ValueError:
        raise SystemExit(f"unknown memory config {config!r}; use k<probes>[_chunk<size>]") from None
    A = secondorder.HessianOperator(model, loss_fn, (X, y), chunk_size=chunk_size)
    gc.collect()
    base, base_anon = rss_bytes(), anon_bytes()
    peak_before = maxrss_bytes()
    sampled = {"max": base, "anon": base_anon, "stop": False}

    def sampler():
        while not sampled["stop"]:
            sampled["max"] = max(sampled["max"], rss_bytes())
            sampled["anon"] = max(sampled["anon"], anon_bytes())
            time.sleep(0.0002)

    th = threading.Thread(target=sampler, daemon=True)
    th.start()
    r = secondorder.trace(A, m, method="hutchinson", seed=0, probe_chunk=chunk_size)
    sampled["stop"] = True
    th.join()
    peak_after = maxrss_bytes()
    # ru_maxrss is exact but covers the whole process life; it tells the run's peak only if
    # the run raised it. Otherwise the sampled peak (every 0.2 ms) is the best we have.
    peak = max(sampled["max"], peak_after if peak_after > peak_before else 0)
    print(json.dumps(dict(config=config, base=base, peak=peak, increase=peak - base, sampled=sampled["max"],
                          anon_increase=sampled["anon"] - base_anon, maxrss_raised=peak_after > peak_before,
                          value=r.value, matvecs=r.num_matvecs)))


def run_child(config: str, fixed_mmap: bool = False) -> dict:
    env = dict(os.environ, BENCH_THREADS=str(NUM_THREADS))
    if fixed_mmap:
        # A fixed glibc mmap threshold (64 KiB) returns every large freed block to the OS at
        # once, so the peak is the library's live memory, without the heap that glibc's
        # default (dynamic) threshold keeps and fragments between chunks.
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    out = subprocess.run([sys.executable, __file__, "--memory-child", config], capture_output=True, text=True,
                         env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"memory child {config} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def target5(args) -> tuple[list[Row], dict]:
    section("Target 5: peak RSS increase, 64-probe trace with probe_chunk=8 vs one probe (MLP, batch 256)")
    repeats = 1 if args.quick else 3
    runs = {"k64_chunk8": [], "k1": []}
    for _ in range(repeats):
        for config in runs:
            runs[config].append(run_child(config))
    if not args.quick:  # context: one unchunked chunk of 8, 64 probes one at a time, a fixed mmap threshold
        for config in ("k8", "k64_chunk1"):
            runs[config] = [run_child(config)]
        for config in ("k64_chunk8", "k1"):
            runs[config + "+mmap64k"] = [run_child(config, fixed_mmap=True)]
    mib = {c: statistics.median(r["increase"] for r in v) / 2**20 for c, v in runs.items()}
    for c, v in runs.items():
        print(f"  {c}: peak RSS increases over baseline "
              f"{[round(r['increase'] / 2**20, 1) for r in v]} MiB (baseline RSS "
              f"{v[0]['base'] / 2**20:.0f} MiB), median {mib[c]:.1f} MiB; sampled anonymous-memory increases "
              f"{[round(r['anon_increase'] / 2**20, 1) for r in v]} MiB", flush=True)
    one = mib["k1"]
    ratio = mib["k64_chunk8"] / one if one > 0 else math.inf
    print(f"ratio 64 probes (probe_chunk=8) / 1 probe: {ratio:.2f}", flush=True)
    rows = [Row("5", "trace peak RSS increase: 64 probes, probe_chunk=8 / 1 probe (MLP, batch 256)",
                f"{mib['k64_chunk8']:.1f} / {one:.1f} MiB", None, ratio, "<= 1.5", ratio <= 1.5)]
    for config, label in (("k8", "8 probes, no chunking"), ("k64_chunk1", "64 probes, probe_chunk=1")):
        if config in mib:
            rows.append(Row("5 (info)", f"trace peak RSS increase: {label} / 1 probe", f"{mib[config]:.1f} / {one:.1f} MiB",
                            None, mib[config] / one if one > 0 else math.inf, "info", None))
    if "k64_chunk8+mmap64k" in mib:
        a, b = mib["k64_chunk8+mmap64k"], mib["k1+mmap64k"]
        rows.append(Row("5 (info)", "same as 5 with MALLOC_MMAP_THRESHOLD_=65536 (no glibc heap retention)",
                        f"{a:.1f} / {b:.1f} MiB", None, a / b if b > 0 else math.inf, "info", None))
    return rows, dict(runs=runs, median_mib=mib, ratio=ratio)


# ---------------------------------------------------------------------------------------
TARGETS = {"1": target1, "2": target2, "3": target3, "4": target4, "5": target5}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fast smoke run (fewer repetitions and seeds)")
    parser.add_argument("--json", metavar="PATH", help="also write the results to this JSON file")
    parser.add_argument("--targets", default="1,2,3,4,5", help="comma-separated targets to run (default all)")
    parser.add_argument("--device", default="cpu", help="torch device for the timed targets 1 and 2 (default cpu)")
    parser.add_argument("--memory-child", metavar="CONFIG", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    global DEVICE
    DEVICE = torch.device(args.device)
    if args.memory_child:
        memory_child(args.memory_child)
        return 0
    wanted = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = [t for t in wanted if t not in TARGETS]
    if unknown:
        parser.error(f"unknown targets {unknown}; choose from {sorted(TARGETS)}")
    if DEVICE.type != "cpu" and set(wanted) - TIMED:
        parser.error(f"--device {DEVICE} runs the timed targets only: pass --targets 1,2")
    import_pyhessian()
    print(f"# secondorder {secondorder.__version__} (commit {git_commit()}) vs PyHessian 0.1"
          f"{' (quick)' if args.quick else ''}")
    print(f"machine: {machine(DEVICE)}")
    t_start = time.perf_counter()
    rows, raw, shared = [], {}, {}
    for t in wanted:
        contention = Contention()
        r, d = TARGETS[t](args)
        shared[t] = warn_contention(t, contention)
        d["other_cpu_share"] = shared[t]
        rows += r
        raw[t] = d
    elapsed = time.perf_counter() - t_start
    print(f"\n## Results ({'quick' if args.quick else 'full'} run, {elapsed:.0f} s)\nmachine: {machine(DEVICE)}; "
          f"secondorder commit {git_commit()}\n")
    print("ratio = secondorder / PyHessian (lower is better)\n")
    print(table(rows), flush=True)
    busy = [t for t, v in shared.items() if v > 0.05 and t in TIMED]
    if busy:
        print(f"\nWARNING: other processes competed for the CPU during targets {', '.join(busy)}; "
              "their timings are unreliable.")
    if args.json:
        payload = dict(machine=machine(DEVICE), commit=git_commit(), cpu=cpu_model(), torch=torch.__version__, threads=torch.get_num_threads(),
                       quick=args.quick, elapsed_s=elapsed, rows=[r.as_dict() for r in rows], details=raw)
        Path(args.json).write_text(json.dumps(payload, indent=2, default=str))
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
