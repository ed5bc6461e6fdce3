"""The torch.distributed engine on 2 and 4 local gloo processes equals the simulator with the
same shards and seed (iterates to 1e-10 in float64), and fails clearly on bad input, dead and
hung ranks."""

import re

import pytest
import torch

from secondorder.distributed import DistributedError, launch
from secondorder.newton import newton_solve, simulate

from . import workers

RUNS_2 = [
    dict(kind="logistic", n=90, d=4, seed=1, iterations=6, line_search=True,
         config=dict(sketch_size=12, sketch="uniform", averaging="determinantal")),
    dict(kind="logistic", n=90, d=4, seed=2, iterations=5, line_search=False,
         config=dict(sketch_size=12, sketch="less", scaled_regularization=True, effective_dim="estimated")),
    dict(kind="ridge", n=80, d=5, seed=3, iterations=4, line_search=True,
         config=dict(sketch_size=15, sketch="leverage", averaging="determinantal", scaled_regularization=True)),
]
RUNS_4 = [
    dict(kind="logistic", n=120, d=4, seed=4, iterations=6, line_search=True,
         config=dict(sketch_size=10, sketch="surrogate", effective_dim="exact")),
    dict(kind="logistic", n=120, d=4, seed=5, iterations=5, line_search=True,
         config=dict(sketch_size=10, sketch="poisson", averaging="determinantal", effective_dim="estimated")),
]


@pytest.mark.parametrize("world_size, runs", [(2, RUNS_2), (4, RUNS_4)], ids=["2 processes", "4 processes"])
def test_processes_reproduce_the_simulator_with_the_same_shards(world_size, runs):
    per_rank = launch(workers.run_configs, world_size, (runs,), timeout=60)
    for i, r in enumerate(runs):
        problem = workers.make_problem(r["kind"], r["n"], r["d"], r["seed"])
        sim = simulate(problem, machines=world_size, iterations=r["iterations"], line_search=r["line_search"],
                       shards=workers.shards_of(r["n"], world_size, r["seed"]), seed=r["seed"], **r["config"])
        for rank in range(world_size):
            got = per_rank[rank][i]
            torch.testing.assert_close(got["iterates"], sim.iterates, rtol=0, atol=1e-10)
            torch.testing.assert_close(got["dims"], sim.effective_dims, rtol=1e-10, atol=0)
            torch.testing.assert_close(got["ess"], sim.effective_sample_sizes, rtol=1e-8, atol=0)
            # w* by exact Newton through the all-reduced gradient and Hessian
            torch.testing.assert_close(got["w_star"], newton_solve(problem).w, rtol=0, atol=1e-10)
        assert float(sim.relative_errors[-1]) < float(sim.relative_errors[0])


def test_bad_input_fails_clearly_on_every_rank():
    expected = ["3 data shards for a world of 2 processes", r"shards \[1\] are empty",
                "sketch size m=3 must exceed the dimension d=3",
                r"the ranks disagree on config: rank 0: \{'sketch_size': 9"]
    for messages in launch(workers.bad_inputs, 2, timeout=20):
        assert len(messages) == len(expected)
        for message, pattern in zip(messages, expected):
            assert re.search(pattern, message), (pattern, message)


def test_bad_labels_on_one_rank_name_that_rank():
    with pytest.raises(DistributedError, match=r"rank 1 of 2 failed: ValueError: logistic regression labels") as err:
        launch(workers.own_shard_with_bad_labels, 2, timeout=20)
    assert "collective 'handshake' failed" in str(err.value)


def test_a_rank_dying_mid_run_fails_the_others_clearly():
    with pytest.raises(DistributedError, match="exited with code 5") as err:
        launch(workers.rank_dies_mid_run, 2, timeout=30)
    assert "rank 0: DistributedError: rank 0 of 2: collective" in str(err.value)


def test_a_rank_hanging_mid_run_fails_the_others_within_the_timeout():
    with pytest.raises(DistributedError, match="hung") as err:
        launch(workers.rank_hangs_mid_run, 2, timeout=3)
    assert "3 s timeout" in str(err.value)


def test_ranks_given_different_run_options_fail_clearly_on_every_rank():
    expected = [r"^the ranks disagree on iterations: rank 0: 2, rank 1: 3; every rank must run the same",
                r"^the ranks disagree on line search: rank 0: True, rank 1: False;",
                r"^the ranks disagree on w0: rank 0: [0-9a-f]{16}, rank 1: [0-9a-f]{16};",
                r"^the ranks disagree on w_star: rank 0: None, rank 1: [0-9a-f]{16};",
                r"^the ranks disagree on iterations: rank 0: 1, rank 1: 2;"]
    for messages in launch(workers.disagreeing_run_options, 2, timeout=20):
        assert len(messages) == len(expected)
        for message, pattern in zip(messages, expected):
            assert re.search(pattern, message), (pattern, message)
