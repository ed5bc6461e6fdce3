"""The quickstart example runs and its numbers agree with each other."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest


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
