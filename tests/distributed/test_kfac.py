"""Data-parallel KFAC on 2 and 4 local gloo processes with unequal shards equals one process on
the concatenated batch (1e-12 in float64): parameters, losses, running factors, inverses,
momentum buffers and the generator, for sampled-label, empirical and Gauss-Newton factors, on a
Conv2d and two Linear layers with an excluded parameter, with the inverses on every rank or
spread over the ranks by layer. Ranks hold identical bits, a step makes one bucketed all-reduce
(plus the shard sizes for sampled labels and the inverses when spread), and ranks that disagree
get a clear ValueError on every rank instead of a hang."""

import re

import pytest
import torch

from secondorder.distributed import launch
from secondorder.optim.kfac import spread_layers

from . import kfac_workers as w
from .compare import assert_refusals, differences, one_thread

TOLERANCE = 1e-12


@pytest.fixture(scope="module")
def single_process():
    with one_thread():
        return {run: w.train(*run, torch.arange(w.N)) for run in w.RUNS}


@pytest.fixture(scope="module")
def two_ranks():
    return launch(w.two_ranks, 2, timeout=60)


@pytest.fixture(scope="module")
def four_ranks():
    return launch(w.equivalence, 4, timeout=60)


def runs_of(per_rank: list[dict]) -> list[dict]:
    """Every rank's runs by :data:`~kfac_workers.RUNS` key (the 2-rank launch nests them)."""
    return [rank.get("equivalence", rank)["runs"] for rank in per_rank]


def assert_equal_to_single_process(per_rank: list[dict], single: dict) -> None:
    """Every rank's every run against the single process (all differences listed at once), the
    layers each rank inverted aside."""
    problems = []
    for rank, runs in enumerate(runs_of(per_rank)):
        assert list(runs) == w.RUNS
        for run, got in runs.items():
            problems += [f"rank {rank} {run}: {d}" for d in differences(
                {**got, "inverted": None}, {**single[run], "inverted": None}, TOLERANCE)]
    assert not problems, f"{len(problems)} differences from the single process on {len(per_rank)} ranks:\n" + \
        "\n".join(problems[:40])


def test_the_single_process_runs_clip_exclude_and_spread_exactly(single_process):
    """The configs clip the step (kl_clip changes the run), exclude ``scale`` (plain momentum),
    invert every layer on each inverse step, and spread placement in a world of one is the
    replicated run bit for bit."""
    with one_thread():
        for (config, placement), run in single_process.items():
            assert run["plain"] == ["scale"]
            free = w.train(config, placement, torch.arange(w.N), kl_clip=None)
            assert differences(free["params"], run["params"], 1e-3), f"{config}: KL clipping never binds"
            inverse_steps = len(range(1, w.STEPS + 1, w.CONFIGS[config]["inverse_every"]))
            assert run["inverted"] == w.LAYERS * inverse_steps
    for config in range(len(w.CONFIGS)):
        spread, replicated = single_process[config, "spread"], single_process[config, "replicated"]
        assert differences(spread, replicated, 0.0) == []


def test_two_processes_equal_the_single_process_run(two_ranks, single_process):
    assert_equal_to_single_process(two_ranks, single_process)


def test_four_processes_equal_the_single_process_run(four_ranks, single_process):
    assert_equal_to_single_process(four_ranks, single_process)


@pytest.mark.parametrize("world", [2, 4])
def test_every_rank_holds_identical_state_and_spread_inverses_are_the_replicated_ones(world, two_ranks, four_ranks):
    """Bitwise, every rank against rank 0, and each spread run against the replicated one (the
    inverting rank's bits reach the others unchanged, through sums with zeros)."""
    per_rank = runs_of(two_ranks if world == 2 else four_ranks)
    for rank, runs in enumerate(per_rank):
        for run, got in runs.items():
            assert differences({**got, "inverted": None}, {**per_rank[0][run], "inverted": None}, 0.0) == [], \
                f"rank {rank} {run} differs from rank 0"
    for config in range(len(w.CONFIGS)):
        spread, replicated = per_rank[0][config, "spread"], per_rank[0][config, "replicated"]
        assert differences({**spread, "inverted": None}, {**replicated, "inverted": None}, 0.0) == []


@pytest.mark.parametrize("world", [2, 4])
def test_each_rank_inverts_only_its_layers(world, two_ranks, four_ranks):
    """Replicated: every rank inverts every layer; spread: each layer on the one rank
    :func:`spread_layers` gives it (conv's factors 19 + 3, hidden's 28 + 6, out's 7 + 3: on two
    ranks hidden alone, conv and out together; on four one rank each and rank 3 none)."""
    per_rank = runs_of(two_ranks if world == 2 else four_ranks)
    owners = {2: [1, 0, 1], 4: [1, 0, 2]}[world]
    for config, options in enumerate(w.CONFIGS):
        inverse_steps = len(range(1, w.STEPS + 1, options["inverse_every"]))
        for rank, runs in enumerate(per_rank):
            assert runs[config, "replicated"]["inverted"] == w.LAYERS * inverse_steps
            mine = [name for name, owner in zip(w.LAYERS, owners) if owner == rank]
            assert runs[config, "spread"]["inverted"] == mine * inverse_steps


@pytest.mark.parametrize("world", [2, 4])
def test_one_bucketed_all_reduce_per_step(world, two_ranks, four_ranks):
    """Gradients, factors, loss and count in one all-reduce per step; sampled labels add one for
    the shard sizes on each factor step, and spread inverses one on each inverse step."""
    per_rank = two_ranks if world == 2 else four_ranks
    for rank in per_rank:
        counts = rank.get("equivalence", rank)["all_reduces"]
        for (config, placement), count in counts.items():
            options = w.CONFIGS[config]
            factor_steps = len(range(1, w.STEPS + 1, options["factor_every"]))
            inverse_steps = len(range(1, w.STEPS + 1, options["inverse_every"]))
            expected = w.STEPS + factor_steps * (options["fisher"] == "mc") + inverse_steps * (placement == "spread")
            assert count == expected, (config, placement)


def test_spread_layers_balances_the_inversion_cost():
    assert spread_layers([8, 1, 5, 4], 2) == [0, 0, 1, 1]
    assert spread_layers([3, 3, 3], 2) == [0, 1, 0]  # ties: layer order, lowest rank
    assert spread_layers([3, 7], 4) == [1, 0]
    assert spread_layers([5, 2], 1) == [0, 0]
    with pytest.raises(ValueError, match="inverse_placement must be one of 'replicated', 'spread'; got 'sharded'"):
        w.optimizer(w.model(), 0, "sharded")


def test_disagreeing_ranks_fail_clearly_on_every_rank(two_ranks):
    """Settings, hyperparameters, the preconditioned layers, the generator state or the step
    counters: a DisagreementError (a ValueError) naming it on every rank at the handshake, with
    the parameters, counters and generator untouched."""
    advice = "; every rank must build the same model and optimizer (same seed) and load the same checkpoint"
    settings = r"the ranks disagree on settings: rank 0: \{'factor_every': 1, 'inverse_every': 2, 'fisher': 'mc', "
    expected = [
        settings + r"'inverse_placement': 'replicated', 'seed': 3\}, rank 1: \{'factor_every': 2, ",
        settings + r".*\}, rank 1: \{'factor_every': 1, 'inverse_every': 3, ",
        settings + r"'inverse_placement': 'replicated', .*\}, rank 1: \{.*'inverse_placement': 'spread', ",
        settings + r".*\}, rank 1: \{'factor_every': 1, 'inverse_every': 2, 'fisher': 'ggn', ",
        settings + r"'inverse_placement': 'replicated', 'seed': 0\}, rank 1: \{.*'seed': 1\}" + re.escape(advice),
        r"the ranks disagree on hyperparameters: rank 0: \{'lr': 0.2, 'damping': 0.01, .*\}, "
        r"rank 1: \{'lr': 0.2, 'damping': 0.02, ",
        r"the ranks disagree on preconditioned layers: rank 0: \['conv', 'hidden', 'out'\], "
        r"rank 1: \['conv', 'hidden'\]",
        r"the ranks disagree on generator state: rank 0: [0-9a-f]{16}, rank 1: [0-9a-f]{16}" + re.escape(advice),
        r"the ranks disagree on steps: rank 0: \(0, 0\), rank 1: \(1, 0\)",
        r"^no error$",
    ]
    for rank in two_ranks:
        assert_refusals(rank["bad"], expected)
