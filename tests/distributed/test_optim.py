"""Data-parallel AdaHessian, SophiaH and SophiaG on 2 and 4 local gloo processes equal the
single-process runs on the concatenated data (1e-12 in float64, 1e-6 in float32), with and
without DDP and with gradient accumulation; ranks keep identical state, disagreeing ranks get a
clear error and a failing rank makes the others fail instead of hanging."""

import re
import time

import pytest
import torch

from secondorder.distributed import DistributedError, launch, sum_over_ranks
from secondorder.optim import AdaHessian, SophiaG

from . import optim_workers as w

TOLERANCE = {"float64": 1e-12, "float32": 1e-6}


@pytest.fixture(scope="module")
def two_ranks():
    return launch(w.equivalence, 2, (w.RUNS, True), timeout=60)


@pytest.fixture(scope="module")
def single_process():
    return {(dtype, i): w.train(*w.CONFIGS[i], w.DTYPES[dtype], [torch.arange(w.N)]) for dtype, i in w.RUNS}


def assert_same_run(got: dict, expected: dict, tol: float) -> None:
    for p, q in zip(got["params"], expected["params"]):
        torch.testing.assert_close(p, q, rtol=0, atol=tol)
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(expected["losses"]), rtol=0, atol=tol)


def assert_states_equal(a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_states_equal(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_states_equal(x, y)
    else:
        assert a == b


def test_two_processes_equal_the_single_process_run(two_ranks, single_process):
    for (dtype, i), expected in single_process.items():
        for rank in range(2):
            assert_same_run(two_ranks[rank]["plain"][dtype, i], expected, TOLERANCE[dtype])


def test_four_processes_equal_the_single_process_run(single_process):
    per_rank = launch(w.equivalence, 4, (w.RUNS, False), timeout=60)
    for (dtype, i), expected in single_process.items():
        for rank in range(4):
            assert_same_run(per_rank[rank]["plain"][dtype, i], expected, TOLERANCE[dtype])


def test_one_bucketed_all_reduce_per_step(two_ranks):
    """AdaHessian and SophiaH: one all-reduce per step (gradient, curvature and loss in one buffer);
    SophiaG adds one for the sample counts on each of its 10 refresh steps (k=2)."""
    per_config = [w.STEPS, w.STEPS, w.STEPS, w.STEPS + 10]
    assert two_ranks[0]["all_reduces"][:-1] == [per_config[i] for _, i in w.RUNS]


def test_sum_over_ranks_sums_in_size_capped_buckets(two_ranks):
    """3 float64 buckets and 1 float32 bucket of at most 64 bytes: 4 all-reduces, exact sums."""
    expected = [a + b for a, b in zip(w.bucket_tensors(0), w.bucket_tensors(1))]
    for rank in range(2):
        assert two_ranks[rank]["all_reduces"][-1] == 4
        for got, want in zip(two_ranks[rank]["buckets"], expected):
            assert got.shape == want.shape and got.dtype == want.dtype and torch.equal(got, want)


def test_every_rank_holds_identical_state(two_ranks):
    for key, run in two_ranks[0]["plain"].items():
        assert_states_equal(run["state"], two_ranks[1]["plain"][key]["state"])
        assert all(torch.equal(p, q) for p, q in zip(run["params"], two_ranks[1]["plain"][key]["params"]))


def test_an_overflow_on_one_rank_skips_the_step_on_every_rank(two_ranks):
    """The all-reduced derivatives are non-finite everywhere, so every rank skips step 3 and backs
    its loss scale off alike: 4 steps taken, scale 1024 / 2, identical state."""
    runs = [two_ranks[rank]["overflow"] for rank in range(2)]
    for run in runs:
        assert run["num_steps"] == 4 and run["scale"] == 512.0
    assert_states_equal(runs[0]["state"], runs[1]["state"])
    assert all(torch.equal(p, q) for p, q in zip(runs[0]["params"], runs[1]["params"]))


def test_gradient_accumulation_equals_the_concatenated_batch(two_ranks):
    """Two micro-batches per rank: one process on the rows in micro-batch-major order (what
    SophiaG's label draws follow) with a single closure."""
    order = w.micro_major(2, 2)
    for i, (name, options) in enumerate(w.CONFIGS):
        expected = w.train(name, options, torch.float64, [order])
        for rank in range(2):
            assert_same_run(two_ranks[rank]["accumulated"][i], expected, 1e-12)


def test_a_ddp_wrapped_model_gives_the_same_run(two_ranks):
    """DDP (plain, find_unused_parameters, static_graph) around an eval-mode BatchNorm MLP; rank 1
    perturbs its running mean at step 5 and DDP's forward broadcast of rank 0's buffers undoes it.
    With find_unused_parameters, rank 1 never uses one parameter (its gradient is rank 0's
    halved, as on the concatenated batch) and no rank uses another (it is never updated)."""
    for i, (_ddp, branchy) in enumerate(zip(w.DDP_OPTIONS, w.BRANCHY)):
        name, options = w.CONFIGS[i % 2 * 3]
        expected = w.train(name, options, torch.float64, [torch.arange(w.N)], bn=True, branchy=branchy)
        for rank in range(2):
            assert_same_run(two_ranks[rank]["ddp"][i], expected, 1e-12)
        if branchy:
            extra, never = expected["params"][:2]  # a module's own parameters come before its children's
            assert not torch.equal(extra, torch.full((3,), 0.5, dtype=torch.float64))
            assert torch.equal(never, torch.zeros(2, dtype=torch.float64))
            for run in [expected, two_ranks[0]["ddp"][i], two_ranks[1]["ddp"][i]]:
                states = run["state"]["state"]  # by parameter index; never is 1
                assert 1 not in states and len(states) == len(run["params"]) - 1


def test_disagreeing_ranks_fail_clearly_on_every_rank():
    expected = [
        r"the ranks disagree on parameters \(shape, dtype, device type\): rank 0: \[\(\(6, 5\)",
        r"the ranks disagree on seed: rank 0: 0, rank 1: 1; every rank must build the same model",
        r"the ranks disagree on hyperparameters: rank 0: \[\{'lr': 0.1,",
        r"the ranks disagree on settings: rank 0: \{'curvature_every': 1, 'estimator': 'HutchinsonRademacher', "
        r"'num_probes': 1, 'absolute': True\}",
        r"the ranks passed different numbers of closures to step 1: rank 0: 1, rank 1: 2",
        r"the ranks passed different numbers of closures to step 1: rank 0: 1, rank 1: 2",
    ]
    results = launch(w.bad_inputs, 2, timeout=20)
    for rank, result in enumerate(results):
        assert len(result["messages"]) == len(expected)
        for message, pattern in zip(result["messages"], expected):
            assert re.search(pattern, message), (pattern, message)
        # distributed=False: each rank trains on its own shard alone
        own = w.train("SophiaH", w.CONFIGS[2][1], torch.float64, w.rank_shards(2, rank), distributed="auto")
        assert_same_run(result["local"], own, 0.0)


def test_a_rank_failing_in_its_closure_makes_the_others_fail():
    start = time.monotonic()
    with pytest.raises(DistributedError) as err:
        launch(w.fails_at_step_3, 2, timeout=10)
    text = str(err.value)
    assert text.startswith("rank 1 of 2 failed: RuntimeError: the data loader of rank 1 broke at step 3")
    assert "rank 0: DistributedError: rank 0 of 2: collective 'AdaHessian gradient and curvature' failed" in text
    assert time.monotonic() - start < 30


def test_bad_distributed_argument_and_no_process_group():
    net = w.model(torch.float64)
    with pytest.raises(ValueError, match="distributed must be 'auto', True or False, got 'yes'"):
        AdaHessian(net.parameters(), distributed="yes")
    opt = SophiaG(net.parameters(), distributed=True)
    X, y = w.batch(torch.float64)
    with pytest.raises(ValueError, match="distributed=True but torch.distributed is not initialized"):
        opt.step(w.closure("SophiaG", net, X, y))
    assert opt.num_steps == 0


def test_sum_over_ranks_in_a_world_of_one_copies():
    """The bucketed round trip returns every tensor unchanged, as new tensors."""
    tensors = w.bucket_tensors(0)
    out = sum_over_ranks(tensors, what="test", bucket_bytes=64)
    for t, o in zip(tensors, out):
        assert o.shape == t.shape and o.dtype == t.dtype and torch.equal(o, t) and o.data_ptr() != t.data_ptr()
    with pytest.raises(ValueError, match="bucket_bytes must be positive"):
        sum_over_ranks(tensors, what="test", bucket_bytes=0)
