"""The quickstart example runs and its numbers agree with each other."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch


def test_quickstart_runs(capsys):
    path = Path(__file__).resolve().parents[1] / "examples" / "quickstart.py"
    spec = importlib.util.spec_from_file_location("quickstart", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = module.main()
    assert out["eigenvalues"].converged.all()
    assert sum(b.value for b in out["trace"].blocks) == pytest.approx(out["trace"].value)
    assert max(float(r.eigenvalues[0]) for r in out["layers"].values()) <= float(out["eigenvalues"].eigenvalues[0]) + 1e-6
    assert bool(out["step"].converged.all())
    assert "top-5 eigenvalues" in capsys.readouterr().out


def test_torchrun_example_runs_on_two_processes(capsys):
    from secondorder.distributed import launch
    from tests.distributed import workers

    ranks = launch(workers.torchrun_example, 2, (1,), timeout=120)
    assert [r["samples"] for r in ranks] == [4000, 4000]  # the Hessian covers both shards
    assert torch.equal(ranks[0]["parameters"], ranks[1]["parameters"])  # the replicas stayed identical
    assert torch.equal(ranks[0]["eigenvalues"], ranks[1]["eigenvalues"]) and ranks[0]["trace"] == ranks[1]["trace"]
    assert float(ranks[0]["eigenvalues"][0]) > 0
