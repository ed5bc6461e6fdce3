"""Data-parallel curvature operators on 2 and 4 gloo processes equal the single-process operator
on the concatenated data: products, loss and gradient, trace, diagonal, eigenvalues, spectral
density, solves and the whole analyze report (1e-12 in float64, 1e-6 in float32)."""

import pytest
import torch
import torch.nn.functional as F

from secondorder import GGNOperator, HessianOperator
from secondorder.distributed import DistributedError, launch

from . import operator_workers as workers


def assert_same(got, want, tol):
    if isinstance(want, dict):
        assert got.keys() == want.keys()
        for k in want.keys() - {"seconds"}:  # the analysis' wall time
            assert_same(got[k], want[k], tol)
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert_same(g, w, tol)
    elif isinstance(want, torch.Tensor):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    elif isinstance(want, float):
        assert got == pytest.approx(want, rel=tol, abs=tol)
    else:
        assert got == want


def single_process(curvature, world_size, dtype):
    model, shards = workers.shard_batches(world_size, dtype)
    data = [batch for shard in shards for batch in shard]  # the concatenated data, rank order
    op = (HessianOperator if curvature == "hessian" else GGNOperator)(model, F.cross_entropy, data)
    return workers.everything(op, model, data, False)


@pytest.mark.parametrize("world_size", [2, 4])
def test_every_algorithm_equals_the_single_process_run_float64(world_size):
    results = launch(workers.on_my_shard, world_size, ("hessian", "float64"), timeout=60)
    want = single_process("hessian", world_size, torch.float64)
    assert want["n"] == 48
    for got in results:
        assert_same(got, want, 1e-12)


def test_ggn_in_float32_equals_the_single_process_run():
    results = launch(workers.on_my_shard, 2, ("ggn", "float32"), timeout=60)
    want = single_process("ggn", 2, torch.float32)
    for got in results:
        for key in ("HV", "quad", "grad", "loss", "trace", "eig"):
            assert_same(got[key], want[key], 1e-6)
    assert_same(results[0], results[1], 0.0)  # every rank holds the same bits


def test_ranks_selecting_different_parameters_fail_at_construction():
    with pytest.raises(DistributedError, match="the ranks disagree on parameters"):
        launch(workers.mismatched_parameters, 2, timeout=20)


def test_single_process_distributed_flag_is_a_world_of_one():
    model, shards = workers.shard_batches(1)
    plain = HessianOperator(model, F.cross_entropy, shards[0])
    flagged = HessianOperator(model, F.cross_entropy, shards[0], distributed=True)
    V = torch.randn(plain.shape[0], 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert not flagged.reducer.distributed and torch.equal(plain @ V, flagged @ V)


def test_ranks_drawing_different_probes_get_a_clear_error():
    with pytest.raises(DistributedError, match="the ranks multiplied different vectors"):
        launch(workers.per_rank_seeds, 2, timeout=20)
