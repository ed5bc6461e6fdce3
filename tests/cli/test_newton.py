"""`secondorder newton`: the three outputs, errors equal to `simulate`'s, bad input exits 2 with nothing written."""

from __future__ import annotations

import csv
import json

import pytest

from secondorder.cli import main
from secondorder.datasets.glm import load_dataset
from secondorder.distributed import launch
from secondorder.newton import LogisticRegression, simulate

from . import workers

RUN = ["newton", "--dataset", "synthetic", "--machines", "3", "--iterations", "4", "--seed", "5"]


@pytest.mark.parametrize("extra, sketch, combine, scaled", [
    ([], "uniform", "uniform", None),
    (["--sketch", "leverage", "--combine", "determinantal", "--scaled-regularization"],
     "leverage", "determinantal", True),
])
def test_writes_the_outputs_and_matches_simulate(tmp_path, capsys, extra, sketch, combine, scaled):
    out = tmp_path / "run"
    assert main([*RUN, "--sketch-size", "50", *extra, "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert len([line for line in captured.err.splitlines() if line.startswith("iteration ")]) == 4
    assert "relative error" in captured.out
    for name in ("iterations.csv", "convergence.png", "summary.json"):
        assert (out / name).stat().st_size > 100
    rows = list(csv.DictReader((out / "iterations.csv").open()))
    x, y = load_dataset("synthetic", seed=5)
    want = simulate(LogisticRegression(x, y, 1e-2), machines=3, sketch_size=50, iterations=4, sketch=sketch,
                    averaging=combine, scaled_regularization=scaled, seed=5)
    assert [int(r["iteration"]) for r in rows] == list(range(5))
    assert [float(r["relative_error"]) for r in rows] == pytest.approx(want.relative_errors.tolist(), rel=1e-9)
    assert [float(r["step_size"]) for r in rows[1:]] == want.step_sizes.tolist()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["context"]["sketch_size"] == 50 and summary["context"]["scaled_regularization"] == bool(scaled)


def test_json_equals_summary_and_quiet_is_silent(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*RUN, "--sketch", "surrogate", "--json", "--quiet", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    printed = json.loads(captured.out)
    assert printed == json.loads((out / "summary.json").read_text()) and captured.err == ""
    assert printed["context"]["sketch_size"] == 60  # default 3 d
    assert printed["context"]["scaled_regularization"] is True
    assert len(printed["iterations"]) == 5 and printed["final_relative_error"] < 1.0


@pytest.mark.parametrize("args, message", [
    (["--sketch-size", "20"], "must exceed the dimension d=20"),
    (["--machines", "0"], "--machines must be >= 1"),
    (["--dataset", "mnist"], "unknown; choose one of australian"),
    (["--lambda", "-1"], "--lambda"),
    (["--iterations", "0"], "--iterations"),
    (["--sketch", "surrogate", "--no-scaled-regularization"], "scaled regularizer"),
    (["--combine", "determinantal", "--local-solver", "cg"], "needs the local log-determinants"),
    (["--local-solver", "cg", "--cg-iterations", "0"], "--cg-iterations must be >= 1"),
    (["--engine", "processes"], "start the script with torchrun"),
])
def test_bad_input_exits_2_and_writes_nothing(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    assert main([*RUN, *args, "--out", "run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("secondorder: error:") and len(err.splitlines()) == 1 and message in err, err
    assert list(tmp_path.iterdir()) == []


def test_processes_engine_writes_what_the_sharded_simulator_computes(tmp_path, capsys):
    argv = [*RUN[:3], "--iterations", "3", "--seed", "5", "--combine", "determinantal", "--quiet"]
    codes = launch(workers.run_main, 2, ([*argv, "--engine", "processes", "--out", str(tmp_path / "p")],),
                   timeout=60)
    assert codes == [0, 0]
    assert main([*argv, "--engine", "simulator", "--sharded", "--machines", "2", "--out", str(tmp_path / "s")]) == 0
    real = json.loads((tmp_path / "p" / "summary.json").read_text())
    simulated = json.loads((tmp_path / "s" / "summary.json").read_text())
    assert real["context"]["engine"] == "processes" and real["context"]["machines"] == 2
    assert [r["relative_error"] for r in real["iterations"]] == pytest.approx(
        [r["relative_error"] for r in simulated["iterations"]], rel=1e-9)


def test_processes_engine_refuses_a_machine_count_other_than_the_world_size(tmp_path):
    argv = [*RUN[:3], "--machines", "3", "--engine", "processes", "--out", str(tmp_path / "p")]
    assert launch(workers.run_main, 2, (argv,), timeout=30) == [2, 2]
    assert not (tmp_path / "p").exists()
