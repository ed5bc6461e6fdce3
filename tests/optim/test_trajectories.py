"""The optimizers' numbers are those recorded before the optimizer core was rebuilt (bitwise)."""

from __future__ import annotations

import pytest
import torch

from tests.optim.trajectories import CASES, RECORDING, VARIANTS, run


@pytest.fixture(scope="module")
def recorded():
    return torch.load(RECORDING)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_trajectory_is_bitwise_the_recorded_one(recorded, case, variant):
    now, then = run(case, variant), recorded[(case, variant)]
    for key in ("params", "losses", "state"):
        assert len(now[key]) == len(then[key])
        for step, (a, b) in enumerate(zip(now[key], then[key])):
            assert torch.equal(a, b), f"{key} differ at entry {step}"
