"""The `secondorder summary` command: outputs, JSON, errors, nothing half-written."""

from __future__ import annotations

import json

import pytest
import torch

import secondorder as so
from secondorder.cli import main
from secondorder.datasets import default_problem

FAST = ["--probes", "9", "--top-k", "2", "--slq-probes", "2", "--slq-steps", "10", "--quiet"]


def test_summary_json_matches_the_api(tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["summary", *FAST, "--out", str(out), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert json.loads((out / "summary.json").read_text())["trace"] == printed["trace"]
    assert (out / "spectral_density.png").stat().st_size > 1000
    problem = default_problem(0)
    H = so.HessianOperator(problem.model, problem.loss_fn, problem.data, seed=0)
    top = so.eigenvalues(H, 2, seed=0).eigenvalues
    assert [e["value"] for e in printed["top_eigenvalues"]] == pytest.approx(top.tolist(), rel=1e-4)
    assert printed["trace"]["value"] == pytest.approx(so.trace(H, 9, seed=0).value, rel=1e-5)
    assert sum(layer["trace"] for layer in printed["layers"]) == pytest.approx(printed["trace"]["value"], rel=1e-5)


def test_summary_table_and_global_rng(tmp_path, capsys):
    state = torch.get_rng_state()
    assert main(["summary", *FAST, "--curvature", "ggn", "--out", str(tmp_path)]) == 0
    assert torch.equal(torch.get_rng_state(), state)
    text = capsys.readouterr().out
    assert "ggn of the default model" in text and "top-2 eigenvalues" in text and "per-layer trace" in text


def test_bad_arguments_exit_2_and_write_nothing(tmp_path, capsys):
    out = tmp_path / "never"
    assert main(["summary", "--probes", "2", "--quiet", "--out", str(out)]) == 2  # hutch++ needs >= 3
    assert "num_matvecs >= 3" in capsys.readouterr().err
    assert not out.exists() and list(tmp_path.iterdir()) == []
    assert main(["summary", "--top-k", "0", "--quiet", "--out", str(out)]) == 2
    assert main([]) == 2
