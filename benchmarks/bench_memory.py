"""Peak memory of trace, eigenvalues and SLQ against the number of parameters P (issue 14).

Each measurement runs in a fresh process: build an MLP of about P parameters and its Hessian
operator on one batch of 64, note the resident set, run one algorithm, and report the peak
resident set above that baseline (``ru_maxrss``), with the wall time. SLQ is run with full
reorthogonalization (all probes at once, and chunked by ``memory_budget``) and without it.

    python benchmarks/bench_memory.py [--sizes 1e6,5e6] [--runs slq] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

RUNS = {
    "hvp x10": "for _ in range(10): H @ v",
    "trace hutch++ 30": "secondorder.trace(H, 30, seed=0)",
    "eigenvalues k=10": "secondorder.eigenvalues(H, k=10, seed=0, max_matvecs=60)",
    "slq 4x80 full reorth": "secondorder.spectral_density(H, 4, 80, seed=0)",
    "slq 4x80 full reorth, budget 256 MB": "secondorder.spectral_density(H, 4, 80, seed=0, memory_budget=2**28)",
    "slq 4x80 no reorth": "secondorder.spectral_density(H, 4, 80, seed=0, reorthogonalize=False)",
}


def _child(size: int, run: str) -> None:
    import torch
    import torch.nn.functional as F
    from torch import nn

    import secondorder

    torch.set_num_threads(2)
    width = int((size / 2) ** 0.5)  # two width x width layers
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 10))
    X, y = torch.randn(64, 64), torch.randint(0, 10, (64,))
    H = secondorder.HessianOperator(model, F.cross_entropy, (X, y))
    v = torch.randn(H.shape[0])
    H @ v  # warm up: the allocator's first pass counts in the baseline
    base = _rss_kb()
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    try:
        exec(RUNS[run], {"secondorder": secondorder, "H": H, "v": v})
        error = ""
    except ValueError as err:
        error = str(err)
    seconds = time.perf_counter() - t0
    peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, peak_before)
    print(json.dumps({"P": H.shape[0], "run": run, "peak_mb": (peak - base) / 1024, "seconds": seconds,
                      "error": error}))


def _rss_kb() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1e6,5e6", help="parameter counts, comma-separated (default 1e6,5e6)")
    parser.add_argument("--runs", help="only the runs whose names contain this text (e.g. slq)")
    parser.add_argument("--json", help="also write the rows as JSON to this path")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(int(float(args.child[0])), args.child[1])
        return
    rows = []
    print("| P | run | peak above baseline (MB) | seconds |\n|---|---|---|---|")
    for size in (int(float(s)) for s in args.sizes.split(",")):
        for run in (r for r in RUNS if args.runs is None or args.runs in r):
            out = subprocess.run([sys.executable, __file__, "--child", str(size), run], capture_output=True,
                                 text=True, check=True).stdout
            row = json.loads(out.strip().splitlines()[-1])
            rows.append(row)
            shown = f"refused: {row['error'][:60]}" if row["error"] else f"{row['peak_mb']:.0f}"
            print(f"| {row['P']:,} | {run} | {shown} | {row['seconds']:.1f} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
