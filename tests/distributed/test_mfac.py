"""Data-parallel MFAC on 2 and 4 local gloo processes equals one process on the concatenated batch
(1e-12 in float64): parameters, losses, the window (gradients, Gram matrix, count) and the momentum
buffers, with unequal shards weighted by their sample counts and with equal micro-batches
returning bare losses. Every rank holds the same window bit for bit, a step makes one bucketed
all-reduce, and ranks that disagree (settings, hyperparameters, counters, windows) get a clear
ValueError on every rank instead of a hang, with nothing changed."""


import pytest
import torch

from secondorder.distributed import launch

from . import mfac_workers as w
from .compare import assert_refusals, differences, one_thread
from .optim_workers import N

TOLERANCE = 1e-12


@pytest.fixture(scope="module")
def single_process():
    with one_thread():
        return {run: w.train(run, [torch.arange(N)]) for run in w.RUNS}


@pytest.fixture(scope="module")
def two_ranks():
    return launch(w.two_ranks, 2, timeout=60)


@pytest.fixture(scope="module")
def four_ranks():
    return launch(w.equivalence, 4, timeout=60)


def runs_of(per_rank: list[dict]) -> list[dict]:
    return [rank.get("equivalence", rank)["runs"] for rank in per_rank]


def assert_equal_to_single_process(per_rank: list[dict], single: dict) -> None:
    problems = []
    for rank, runs in enumerate(runs_of(per_rank)):
        assert list(runs) == w.RUNS
        for run, got in runs.items():
            problems += [f"rank {rank} run {run}: {d}" for d in differences(got, single[run], TOLERANCE)]
    assert not problems, f"{len(problems)} differences from the single process on {len(per_rank)} ranks:\n" + \
        "\n".join(problems[:40])


def test_the_single_process_runs_use_their_window_momentum_and_weights(single_process):
    """The windows wrapped (6 steps, windows of 3 and 4), the momentum run keeps buffers, and the
    runs move the parameters."""
    for run, got in single_process.items():
        window = got["state"]["second_order"]["window"]
        assert window["num_added"] == w.STEPS and window["window"] < w.STEPS
        assert bool(got["state"]["state"]) == bool(w.CONFIGS[run]["options"].get("momentum"))
        assert got["losses"][-1] < got["losses"][0]


def test_two_processes_equal_the_single_process_run(two_ranks, single_process):
    assert_equal_to_single_process(two_ranks, single_process)


def test_four_processes_equal_the_single_process_run(four_ranks, single_process):
    assert_equal_to_single_process(four_ranks, single_process)


@pytest.mark.parametrize("world", [2, 4])
def test_every_rank_holds_the_same_window_bit_for_bit(world, two_ranks, four_ranks):
    per_rank = runs_of(two_ranks if world == 2 else four_ranks)
    for rank, runs in enumerate(per_rank):
        for run, got in runs.items():
            assert differences(got, per_rank[0][run], 0.0) == [], f"rank {rank} run {run} differs from rank 0"


@pytest.mark.parametrize("world", [2, 4])
def test_one_bucketed_all_reduce_per_step(world, two_ranks, four_ranks):
    for rank in two_ranks if world == 2 else four_ranks:
        assert rank.get("equivalence", rank)["all_reduces"] == {run: w.STEPS for run in w.RUNS}


def test_disagreeing_ranks_fail_clearly_on_every_rank(two_ranks):
    """Window, damping, blocks, hyperparameters, counters or the windows' contents: a ValueError
    naming it on every rank at the handshake, with parameters, counters and window untouched."""
    settings = r"the ranks disagree on settings: rank 0: \{'window': 3, 'damping': 0.001, 'block_size': None, "
    expected = [
        settings + r".*\}, rank 1: \{'window': 4, ",
        settings + r".*\}, rank 1: \{'window': 3, 'damping': 0.002, ",
        settings + r".*\}, rank 1: \{'window': 3, 'damping': 0.001, 'block_size': 20, ",
        r"the ranks disagree on hyperparameters: rank 0: \[\{'lr': 0.02, .*\}\], rank 1: \[\{'lr': 0.04, ",
        r"the ranks disagree on steps: rank 0: \(0, 0, 0\), rank 1: \(1, 0, 1\)",
        r"the ranks disagree on window digest: rank 0: [0-9a-f]{16}, rank 1: [0-9a-f]{16}; every rank must build "
        r"the same model and optimizer",
        r"^no error$",
    ]
    for rank in two_ranks:
        assert_refusals(rank["bad"], expected)
