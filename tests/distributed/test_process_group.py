"""The process-group layer: collectives in a world of one, the local launcher, and failures
that surface as clear errors instead of hangs."""

import time

import pytest
import torch

from secondorder.distributed import (
    DisagreementError,
    DistributedError,
    all_gather_objects,
    all_reduce,
    current_world,
    launch,
)

from . import workers


def test_world_of_one_without_torch_distributed():
    world = current_world()
    assert (world.rank, world.size, world.distributed) == (0, 1, False)
    t = torch.tensor([2.0])
    assert all_reduce(t, "max", what="x") is t and float(t) == 2.0
    assert all_gather_objects({"a": 1}, what="x") == [{"a": 1}]
    with pytest.raises(ValueError, match="op must be one of"):
        all_reduce(t, "mean", what="x")


def test_launch_runs_a_collective_on_every_rank():
    assert launch(workers.rank_sum, 3) == [(0, 3, 6.0), (1, 3, 6.0), (2, 3, 6.0)]


def test_a_rank_that_raises_is_reported_first_with_its_error():
    with pytest.raises(DistributedError) as err:
        launch(workers.one_rank_raises, 2, timeout=10)
    text = str(err.value)
    assert text.startswith("rank 1 of 2 failed: ValueError: shard 1 is empty")
    assert "rank 0: DistributedError" in text and "'after the bad shard'" in text


def test_a_rank_that_dies_makes_the_others_fail_at_once():
    start = time.monotonic()
    with pytest.raises(DistributedError, match="exited with code 3 without a result") as err:
        launch(workers.one_rank_dies, 2, timeout=30)
    assert "collective 'gradient' failed" in str(err.value)
    assert time.monotonic() - start < 25  # the survivors did not wait for the 30 s timeout


def test_a_rank_that_hangs_makes_the_others_fail_within_the_timeout():
    start = time.monotonic()
    with pytest.raises(DistributedError, match="rank 1 of 2 failed: hung") as err:
        launch(workers.one_rank_hangs, 2, timeout=3)
    assert "rank 0: DistributedError" in str(err.value) and "3 s timeout" in str(err.value)
    assert time.monotonic() - start < 30


def test_bad_launch_arguments():
    with pytest.raises(ValueError, match="world_size"):
        launch(workers.rank_sum, 0)
    with pytest.raises(ValueError, match="timeout"):
        launch(workers.rank_sum, 2, timeout=0)


def test_a_disagreement_is_a_value_error_and_a_distributed_error():
    assert issubclass(DisagreementError, ValueError) and issubclass(DisagreementError, DistributedError)


def test_objects_of_different_sizes_are_gathered_in_rank_order():
    expected = [{"rank": r, "text": "x" * (r * 1000)} for r in range(3)]
    assert launch(workers.objects_of_every_size, 3, timeout=20) == [expected] * 3


def test_a_fact_only_one_rank_has_fails_every_rank():
    for name, both, message in launch(workers.facts_only_some_ranks_have, 2, timeout=20):
        assert (name, both) == ("DisagreementError", True)
        assert message == "the ranks disagree on extra: rank 0: None, rank 1: 1; pass the same facts"


def test_after_a_failed_collective_the_next_one_fails_at_once():
    timeout = 2.0
    rank0, rank1 = launch(workers.collective_after_a_failed_one, 2, (timeout,), timeout=timeout)
    message, waited = rank0["first"]
    assert "collective 'first sum' failed" in message and waited < timeout + 3, rank0
    message, waited = rank0["second"]
    assert message.startswith("rank 0 of 2: collective 'second sum' not started: collective 'first sum' failed "
                              "before and the process group is unusable") and waited < 0.5, rank0
    assert "collective 'first sum' failed" in rank1["first"][0], rank1  # rank 0 left: no stale pairing
