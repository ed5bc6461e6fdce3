"""The optimizers' numbers are those recorded before the optimizer core was rebuilt: bitwise on a
machine with a recording, within float rounding of the recordings made on other machines."""

from __future__ import annotations

import pytest
import torch

from tests.optim.trajectories import CASES, VARIANTS, machine, recordings, run

# Another CPU's kernels round differently; over the 7 steps the relative (norm-wise) difference
# between an Intel Xeon's and an AMD EPYC's run was 15 eps in float64 and 146 eps in float32.
# 1000 eps leaves room for other CPUs; a change of the algorithm moves the numbers by far more.
ROUNDING = {torch.float64: 1000 * torch.finfo(torch.float64).eps, torch.float32: 1000 * torch.finfo(torch.float32).eps}


@pytest.fixture(scope="module")
def recorded():
    found = recordings()
    assert found, "no recorded trajectories: run python -m tests.optim.trajectories"
    return found


def _entries(now, then):
    for key in ("params", "losses", "state"):
        assert len(now[key]) == len(then[key]), key
        yield from ((key, step, a, b) for step, (a, b) in enumerate(zip(now[key], then[key])))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_trajectory_is_bitwise_this_machines_recording_and_within_rounding_of_the_others(recorded, case, variant):
    now = run(case, variant)
    if machine() in recorded:
        for key, step, a, b in _entries(now, recorded[machine()][(case, variant)]):
            assert torch.equal(a, b), f"{key} differ at entry {step}"
    for where, cases in recorded.items():
        for key, step, a, b in _entries(now, cases[(case, variant)]):
            assert a.dtype == b.dtype and a.shape == b.shape, (where, key, step)
            gap = float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300))
            assert gap <= ROUNDING[a.dtype], f"{key} entry {step}: {gap:.2e} from the recording on {where}"
