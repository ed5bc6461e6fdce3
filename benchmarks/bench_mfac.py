#!/usr/bin/env python
r"""M-FAC (``secondorder.MFACOperator``): inverse-Hessian-vector products against :math:`d\cdot m`, and
one sliding-window step against the paper's rank-one Woodbury recursion.

* **Scaling.** For :math:`d \in \{10^3, \dots, 10^6\}` and :math:`m \in \{16, 64, 256\}` (float32,
  Gaussian rows, :math:`\lambda = 10^{-5}`), the time of one inverse product
  :math:`\hat F^{-1}x = \lambda^{-1}(x - G^\top K^{-1}Gx)` and of one window insertion
  (:meth:`~secondorder.MFACOperator.add`: a row of :math:`GG^\top`, :math:`O(dm)`, and a Cholesky
  refactorisation, :math:`O(m^3)`), each the median of ``--reps`` calls, and the product time per
  :math:`d\cdot m` (flat if the cost is linear in both), and the window's memory (:math:`md` floats;
  half in float16). The floor of a product is two passes over the window (:math:`2dm` multiply-adds,
  memory-bound: :math:`md` floats read twice).
* **Against the Woodbury recursion** (the paper's :math:`\hat F_i^{-1} = \hat F_{i-1}^{-1} - \frac{\hat
  F_{i-1}^{-1}g_ig_i^\top\hat F_{i-1}^{-1}}{m + g_i^\top\hat F_{i-1}^{-1}g_i}`, held as the vectors
  :math:`v_i = \hat F_{i-1}^{-1}g_i`): a sliding window changes the first gradient, so every step
  recomputes all :math:`v_i`, :math:`O(dm^2)`, then applies :math:`O(dm)`. One step of each
  (insert a gradient, one inverse product) at :math:`d = 10^5, m = 64`; the target is >= 10x. The
  two agree to rounding (checked, relative difference printed).

    python benchmarks/bench_mfac.py            # about 2 minutes on 2 cores
    python benchmarks/bench_mfac.py --quick    # smoke run (d <= 1e5, m <= 64)
    python benchmarks/bench_mfac.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from machine import Contention, prepare

THREADS = prepare()

from secondorder import MFACOperator  # noqa: E402

DAMPING = 1e-5


def median_time(fn, reps: int) -> float:
    fn()  # warm
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def filled(d: int, m: int, storage: torch.dtype = torch.float32) -> MFACOperator:
    gen = torch.Generator().manual_seed(0)
    G = torch.randn(m, d, generator=gen)
    return MFACOperator.from_gradients(G, DAMPING, storage_dtype=storage)


def new_rows(d: int):
    """Fresh gradients to insert, cycling through 8 (re-inserting one gradient would make the window
    rank-deficient, and a float32 Gram of it indefinite at this damping: the float64 fallback)."""
    rows = torch.randn(8, d, generator=torch.Generator().manual_seed(1))
    i = 0
    while True:
        yield rows[i % 8]
        i += 1


def woodbury_step(G: torch.Tensor, x: torch.Tensor, damping: float) -> torch.Tensor:
    """The rank-one recursion from scratch (a changed window) and one product: O(d m^2)."""
    m = G.shape[0]
    V = torch.empty_like(G)
    denominators = torch.empty(m, dtype=G.dtype)
    for i in range(m):
        g = G[i]
        v = g / damping
        if i:
            v = v - V[:i].T @ ((V[:i] @ g) / denominators[:i])
        V[i], denominators[i] = v, m + g @ v
    return x / damping - V.T @ ((V @ x) / denominators)


def scaling(dims: list[int], windows: list[int], reps: int) -> list[dict]:
    rows = []
    for d in dims:
        for m in windows:
            op = filled(d, m)
            x, fresh = torch.randn(d), new_rows(d)
            product = median_time(lambda: op.inverse_product(x), reps)
            insert = median_time(lambda: op.add(next(fresh)), reps)
            half = filled(d, m, torch.float16)
            rows.append({"d": d, "m": m, "product_ms": 1e3 * product, "insert_ms": 1e3 * insert,
                         "ns_per_dm": 1e9 * product / (d * m),
                         "window_MB": op.gradients.numel() * op.gradients.element_size() / 2**20,
                         "window_MB_float16": half.gradients.numel() * half.gradients.element_size() / 2**20})
    return rows


def against_woodbury(d: int, m: int, reps: int) -> dict:
    op = filled(d, m)
    x, fresh = torch.randn(d), new_rows(d)

    def ours():
        op.add(next(fresh))
        return op.inverse_product(x)

    window = op.gradients[:, :d]
    ours_s = median_time(ours, reps)
    theirs_s = median_time(lambda: woodbury_step(window, x, DAMPING), max(3, reps // 5))
    exact = filled(d, m).inverse_product(x).double()
    recursion = woodbury_step(filled(d, m).gradients[:, :d].double(), x.double(), DAMPING)
    return {"d": d, "m": m, "ours_ms": 1e3 * ours_s, "woodbury_ms": 1e3 * theirs_s, "speedup": theirs_s / ours_s,
            "relative_difference": float((exact - recursion).norm() / recursion.norm())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smaller sizes (smoke run)")
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args()
    dims = [1_000, 10_000, 100_000] + ([] if args.quick else [1_000_000])
    windows = [16, 64] + ([] if args.quick else [256])
    contention = Contention()
    rows = scaling(dims, windows, args.reps)
    race = against_woodbury(100_000, 64, args.reps)
    other, wall, share = contention.share()
    print(f"## M-FAC inverse products ({THREADS} threads, float32, lambda {DAMPING:g})\n")
    print("| d | m | product (ms) | ns per d*m | insertion (ms) | window MB (float16) |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['d']:,} | {r['m']} | {r['product_ms']:.3f} | {r['ns_per_dm']:.3f} | {r['insert_ms']:.3f} | "
              f"{r['window_MB']:.1f} ({r['window_MB_float16']:.1f}) |")
    print(f"\none sliding-window step (insert + product) at d = {race['d']:,}, m = {race['m']}: M-FAC "
          f"{race['ours_ms']:.2f} ms, Woodbury recursion {race['woodbury_ms']:.1f} ms: {race['speedup']:.1f}x "
          f"(target >= 10x); relative difference {race['relative_difference']:.1e}")
    print(f"other processes took {other:.0f} CPU s of {wall:.0f} s wall ({100 * share:.0f}% of the machine)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"scaling": rows, "woodbury": race, "threads": THREADS, "contention": share}, f, indent=2)


if __name__ == "__main__":
    main()
