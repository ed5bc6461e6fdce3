"""Data-parallel TrustRegion, CubicRegularization and NewtonMR on 2 and 4 local gloo processes with
unequal shards equal one process on the concatenated batch (1e-12 in float64), with the Hessian and
the Gauss-Newton matrix, whole-batch and sub-sampled curvature (ranks holding none of the sample
included): parameters, every step's record, the Hessian samples and the generator. Ranks hold
identical bits, and ranks that disagree get a clear ValueError on every rank instead of a hang."""

import math
import re

import pytest
import torch

from secondorder.distributed import launch

from . import newton_type_workers as w
from .compare import assert_refusals, one_thread

TOLERANCE = 1e-12
# 4 ranks on 2 cores make every collective slow: there, only the sub-sampled configs (the
# whole-batch closure() path runs on 2 ranks)
SUBSAMPLED = [i for i, (_, options) in enumerate(w.CONFIGS) if options["hessian_fraction"] < 1]


@pytest.fixture(scope="module")
def single_process():
    with one_thread():
        return [w.train(name, options, torch.arange(w.N)) for name, options in w.CONFIGS]


@pytest.fixture(scope="module")
def two_ranks():
    return launch(w.two_ranks, 2, timeout=60)


def same_value(got, want, tol: float) -> bool:
    if isinstance(want, float) and isinstance(got, float):
        if math.isnan(want) or math.isnan(got):
            return math.isnan(want) and math.isnan(got)
        return abs(got - want) <= tol * max(1.0, abs(want))
    return type(got) is type(want) and got == want


def differences(got: dict, want: dict, tol: float) -> list[str]:
    """Where two runs differ: parameters (beyond ``tol``), losses and the ``last_step`` records
    (floats beyond ``tol``, the rest at all), the optimizer's state (the generator bitwise)."""
    out = []
    for k, (p, q) in enumerate(zip(got["params"], want["params"], strict=True)):
        if not (p - q).abs().max() <= tol:
            out.append(f"parameter {k} differs by {float((p - q).abs().max()):.1e}")
    for step, (a, b) in enumerate(zip(got["records"], want["records"], strict=True), 1):
        assert a.keys() == b.keys()
        out += [f"step {step} {k}: {a[k]!r}, expected {b[k]!r}" for k in b if not same_value(a[k], b[k], tol)]
    out += [f"loss before step {step}: {a!r}, expected {b!r}"
            for step, (a, b) in enumerate(zip(got["losses"], want["losses"], strict=True), 1)
            if not same_value(a, b, tol)]
    mine, theirs = got["state"]["second_order"], want["state"]["second_order"]
    assert mine.keys() == theirs.keys() and mine["num_steps"] == theirs["num_steps"] == w.STEPS
    if not torch.equal(mine["generator"], theirs["generator"]):
        out.append("the generator was consumed differently")
    for key in mine.keys() - {"optimizer", "num_steps", "generator"}:  # radius, sigma, curvature_step_size
        if not same_value(mine[key], theirs[key], tol):
            out.append(f"final {key}: {mine[key]!r}, expected {theirs[key]!r}")
    return out


def assert_equal_to_single_process(per_rank: list[dict], single: list[dict]) -> None:
    """Every rank's every run against the single process (all differences listed at once); the
    ranks' Hessian samples (their rows of it) make up the single process's; the ranks hold the
    same bits."""
    size = len(per_rank)
    starts = [rank["rows"][0] for rank in per_rank]
    assert [len(rank["rows"]) for rank in per_rank] == w.SHARDS[size]
    held_none, problems = set(), []
    for i in per_rank[0]["runs"]:
        (name, options), want = w.CONFIGS[i], single[i]
        runs = [rank["runs"][i] for rank in per_rank]
        for rank, run in enumerate(runs):
            assert differences(run, runs[0], 0.0) == [], f"{name} {options}: rank {rank} differs from rank 0"
        problems += [f"{name} {options}: {d}" for d in differences(runs[0], want, TOLERANCE)]
        for step, expected in enumerate(want["samples"]):
            parts = [run["samples"][step] for run in runs]
            if options["hessian_fraction"] == 1:
                assert expected is None and parts == [None] * size  # closure() on every rank
                continue
            assert sorted(start + k for start, part in zip(starts, parts) for k in part or []) == expected
            if None in parts:
                held_none.add((name, options["curvature"]))
            if options["hessian_fraction"] == 0.05:  # |S| = 1: one rank holds it
                assert parts.count(None) == size - 1
    assert not problems, f"{len(problems)} differences from the single process on {size} ranks:\n" + "\n".join(
        problems[:40])
    assert held_none == {(name, c) for name in w.OPTIMIZERS for c in ("hessian", "gauss-newton")}


def test_the_single_process_runs_take_every_branch(single_process):
    """The configs reject trial steps, take both NewtonMR branches and every sub-problem exit that
    matters, so the equivalence below covers them."""
    def records(name, curvature=None):
        return [r for (n, o), run in zip(w.CONFIGS, single_process) if n == name and curvature in (None, o["curvature"])
                for r in run["records"]]
    for name in ("TrustRegion", "CubicRegularization"):
        assert any(r["trials"] > 1 for r in records(name))
    assert {r["exit"] for r in records("TrustRegion")} == {"boundary", "negative curvature"}
    assert {r["exit"] for r in records("CubicRegularization")} == {"breakdown", "gradient"}
    assert {r["exit"] for r in records("NewtonMR", "hessian")} == {"negative curvature"}
    assert {r["exit"] for r in records("NewtonMR", "gauss-newton")} == {"solution"}
    assert any(r["trials"] > 1 for r in records("NewtonMR", "gauss-newton"))  # backtracking
    assert all(r["accepted"] for run in single_process for r in run["records"])


def test_two_processes_equal_the_single_process_run(two_ranks, single_process):
    assert all(list(rank["equivalence"]["runs"]) == list(range(len(w.CONFIGS))) for rank in two_ranks)
    assert_equal_to_single_process([rank["equivalence"] for rank in two_ranks], single_process)


def test_four_processes_equal_the_single_process_run(single_process):
    per_rank = launch(w.equivalence, 4, (SUBSAMPLED,), timeout=60)
    assert all(list(rank["runs"]) == SUBSAMPLED for rank in per_rank)
    assert_equal_to_single_process(per_rank, single_process)


def test_disagreeing_ranks_fail_clearly_on_every_rank(two_ranks):
    """Seeds, hyperparameters, the method's state (also after loading a checkpoint), curvature,
    optimizer, parameter shapes or the generator state: a DisagreementError (a ValueError) naming
    it on every rank at the handshake, with the parameters, counters and generator untouched."""
    advice = "; every rank must build the same model and optimizer (same seed) and load the same checkpoint"
    expected = [
        r"the ranks disagree on seed: rank 0: 0, rank 1: 1" + re.escape(advice),
        r"the ranks disagree on hyperparameters: rank 0: \{'max_radius': inf, .*'hessian_fraction': 0.05\}, "
        r"rank 1: \{.*'hessian_fraction': 0.1\}",
        r"the ranks disagree on state: rank 0: \{'radius': 1.0\}, rank 1: \{'radius': 2.0\}",
        r"the ranks disagree on state: rank 0: \{'sigma': 1.0\}, rank 1: \{'sigma': 2.0\}",
        r"the ranks disagree on hyperparameters: rank 0: \{'inexactness': 0.01, .*\}, rank 1: \{'inexactness': 0.02,",
        r"the ranks disagree on state: rank 0: \{'curvature_step_size': 1.0\}, rank 1: \{'curvature_step_size': 2.0\}",
        r"the ranks disagree on curvature: rank 0: hessian, rank 1: gauss-newton",
        r"the ranks disagree on optimizer: rank 0: TrustRegion, rank 1: NewtonMR",
        r"the ranks disagree on parameters \(shape, dtype\): rank 0: \[\(\(6, 5\), 'torch.float64'\), .*\], "
        r"rank 1: \[\(\(7, 5\), 'torch.float64'\)",
        r"the ranks disagree on generator state: rank 0: [0-9a-f]{16}, rank 1: [0-9a-f]{16}" + re.escape(advice),
        r"the ranks disagree on state: rank 0: \{'radius': (?P<mine>[\d.]+)\}, rank 1: \{'radius': (?P<theirs>[\d.]+)\}",
        r"^no error$",
    ]
    for rank in two_ranks:
        assert_refusals(rank["bad"], expected)
        reloaded = re.search(expected[-2], rank["bad"]["messages"][-2])  # after a step, rank 1 loaded twice the radius
        assert float(reloaded["theirs"]) == 2 * float(reloaded["mine"]) != 2.0
