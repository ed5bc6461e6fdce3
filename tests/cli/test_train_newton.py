"""`secondorder train --optimizer trust-region|arc|newton-mr`: the records equal the library's run, every
optimizer on the embedded default, mini-batches and Gauss-Newton, resume, refused combinations exit 2."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import fields

import pytest
import torch
import torch.nn.functional as F

from secondorder.cli import main
from secondorder.cli.train import NEWTON_EPOCH_COLUMNS, NEWTON_STEP_COLUMNS
from secondorder.optim import CubicRegularization, NewtonMR, NewtonStep, TrustRegion

OWN = ["train", "--model", "clinets:make_net", "--data", "clinets:batches", "--seed", "3", "--quiet"]
OPTIMIZERS = {"trust-region": (TrustRegion, "radius"), "arc": (CubicRegularization, "sigma"),
              "newton-mr": (NewtonMR, "step_size")}


def read_csv(path):
    return list(csv.DictReader(path.open()))


def strict_json(path):
    def refuse(name):
        raise ValueError(f"{name} in strict JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def without_seconds(rows):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_records_equal_the_library_run(project, capsys, optimizer):
    root, clinets = project
    assert main([*OWN, "--optimizer", optimizer, "--epochs", "3", "--test-data", "clinets:batches",
                 "--out", "run"]) == 0
    table = capsys.readouterr().out
    assert f"--optimizer {optimizer}" in table and "final: test accuracy" in table
    summary = strict_json(root / "run" / "summary.json")
    cls, parameter = OPTIMIZERS[optimizer]
    batches = clinets.batches()
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    model = clinets.make_net().eval()
    opt = cls(model.parameters(), seed=3, distributed=False)

    def closure(indices=None):
        xs, ys = (x, y) if indices is None else (x[indices], y[indices])
        return F.cross_entropy(model(xs), ys, reduction="none")

    want = []
    for _ in range(3):
        opt.step(closure)
        want.append({k: None if isinstance(v, float) and math.isnan(v) else v
                     for k, v in opt.last_step.to_dict().items()})
    steps = summary["steps"]
    assert [{k: s[k] for k in want[0]} for s in steps] == want  # bitwise: full batch, one step per epoch
    assert [s["step"] for s in steps] == [s["epoch"] for s in steps] == [1, 2, 3]
    assert [s["total_propagations"] for s in steps] == [sum(w["propagations"] for w in want[:i + 1])
                                                        for i in range(3)]
    epochs = summary["epochs"]
    assert [r["train_loss"] for r in epochs] == [w["new_loss"] for w in want]
    assert [r[parameter] for r in epochs] == [w[parameter] for w in want]
    assert all(0 <= r["test_accuracy"] <= 1 for r in epochs)
    assert summary["final"]["iterations"] == 3 and summary["final"][parameter] == want[-1][parameter]
    assert summary["context"]["batch size"] == 40 and summary["context"]["hessian samples per step"] == 2
    rows = read_csv(root / "run" / "steps.csv")
    assert tuple(rows[0]) == NEWTON_STEP_COLUMNS and len(rows) == 3
    assert [float(r["new_loss"]) for r in rows] == [w["new_loss"] for w in want]
    assert tuple(read_csv(root / "run" / "epochs.csv")[0]) == NEWTON_EPOCH_COLUMNS
    assert (root / "run" / "training.png").stat().st_size > 1000


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_each_optimizer_on_the_default_model(tmp_path, capsys, optimizer):
    out = tmp_path / "run"
    assert main(["train", "--optimizer", optimizer, "--epochs", "2", "--subproblem-iterations", "3",
                 "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "Mnist1dCNN" in captured.out and "training" in captured.err  # the table, the progress bar
    summary = strict_json(out / "summary.json")
    steps = summary["steps"]
    assert len(steps) == 2 and {f.name for f in fields(NewtonStep)} <= set(steps[0])
    assert all(s["samples"] == 4000 and s["hessian_samples"] == 200 for s in steps)  # full batch, 5 %
    assert all(s["subproblem_iterations"] <= 3 * s["trials"] for s in steps)
    parameter = OPTIMIZERS[optimizer][1]
    assert all((s[p] is not None) == (p == parameter) for s in steps for p in ("radius", "sigma", "step_size"))
    assert (optimizer == "newton-mr") == all(s["ratio"] is None for s in steps)  # no ratio test: null, not NaN
    assert len(read_csv(out / "steps.csv")) == 2
    assert all(0 <= float(r["test_accuracy"]) <= 1 for r in read_csv(out / "epochs.csv"))
    assert summary["context"]["model mode"].startswith("eval") and (out / "training.png").exists()


def test_gauss_newton_on_mini_batches(project, capsys):
    root, _ = project
    assert main([*OWN, "--optimizer", "arc", "--curvature", "gauss-newton", "--batch-size", "16",
                 "--hessian-fraction", "0.5", "--epochs", "2", "--json", "--out", "run"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary == strict_json(root / "run" / "summary.json")
    steps = summary["steps"]
    assert [s["samples"] for s in steps] == [16, 16, 8] * 2 and [s["hessian_samples"] for s in steps] == [8, 8, 4] * 2
    assert [s["epoch"] for s in steps] == [1, 1, 1, 2, 2, 2]
    assert [r["iterations"] for r in summary["epochs"]] == [3, 6]
    first = summary["epochs"][0]
    assert first["train_loss"] == pytest.approx(sum(s["new_loss"] * s["samples"] for s in steps[:3]) / 40)
    assert summary["context"]["curvature"] == "gauss-newton" and summary["context"]["test data"] == "none"


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_resume_equals_an_uninterrupted_run(project, capsys, optimizer):
    root, _ = project
    run = [*OWN, "--optimizer", optimizer, "--batch-size", "16", "--hessian-fraction", "0.5",
           "--test-data", "clinets:batches"]
    assert main([*run, "--epochs", "3", "--out", "whole"]) == 0
    assert main([*run, "--epochs", "1", "--out", "part"]) == 0
    assert main([*run, "--epochs", "3", "--resume", "part/trainer_state.pt", "--out", "part"]) == 0
    capsys.readouterr()
    whole, resumed = (strict_json(root / d / "summary.json") for d in ("whole", "part"))
    assert len(whole["steps"]) == 9 and without_seconds(resumed["steps"]) == without_seconds(whole["steps"])
    assert without_seconds(resumed["epochs"]) == without_seconds(whole["epochs"])
    assert resumed["final"] == whole["final"] and resumed["context"]["resumed from"] == "part/trainer_state.pt"
    a, b = (torch.load(root / d / "trainer_state.pt", weights_only=True) for d in ("whole", "part"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["optimizer"]["second_order"]["num_steps"] == b["optimizer"]["second_order"]["num_steps"] == 9
    assert torch.equal(a["order_generator"], b["order_generator"])
    assert without_seconds(read_csv(root / "part" / "steps.csv")) == without_seconds(read_csv(root / "whole" / "steps.csv"))


def test_resume_errors(project, capsys):
    root, _ = project
    assert main([*OWN, "--optimizer", "arc", "--epochs", "1", "--out", "newton"]) == 0
    assert main([*OWN, "--epochs", "1", "--batch-size", "8", "--out", "sgd"]) == 0
    capsys.readouterr()
    for args, message in (
            (["--optimizer", "arc", "--epochs", "1"], "already trained 1 epochs"),
            (["--optimizer", "arc", "--epochs", "2", "--sigma", "2"], "does not match this run: --sigma 1.0 there, 2.0 here"),
            (["--optimizer", "arc", "--epochs", "2", "--batch-size", "8"], "--batch-size 40 there, 8 here"),
            (["--optimizer", "arc", "--epochs", "2", "--seed", "4"], "--seed 3 there, 4 here"),
            (["--optimizer", "newton-mr", "--epochs", "2"], "written by secondorder train --optimizer arc"),
            (["--epochs", "2"], "written by secondorder train --optimizer arc")):
        assert main([*OWN, *args, "--resume", "newton/trainer_state.pt", "--out", "more"]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    assert main([*OWN, "--optimizer", "trust-region", "--resume", "sgd/trainer_state.pt", "--out", "more"]) == 2
    assert "written by secondorder train --optimizer sgd" in capsys.readouterr().err
    assert not (root / "more").exists()


@pytest.mark.parametrize("args, message", [
    (["--optimizer", "arc", "--lr", "0.1"], "--lr applies to --optimizer sgd or kfac; --optimizer arc takes --sigma"),
    (["--optimizer", "trust-region", "--schedule", "fixed"], "--schedule belongs to the SGD schedule"),
    (["--optimizer", "newton-mr", "--max-batch-size", "32"], "--max-batch-size belongs to the SGD schedule"),
    (["--optimizer", "arc", "--eigen-matvecs", "5"], "--eigen-matvecs belongs to the SGD schedule"),
    (["--optimizer", "arc", "--radius", "2"], "--radius applies to --optimizer trust-region; --optimizer arc takes "
                                              "--sigma"),
    (["--optimizer", "trust-region", "--inexactness", "0.1"], "--inexactness applies to --optimizer newton-mr"),
    (["--sigma", "2"], "--sigma applies to --optimizer arc, not to sgd"),
    (["--hessian-fraction", "0.1"], "--hessian-fraction applies to --optimizer trust-region, arc or newton-mr"),
    (["--curvature", "gauss-newton"], "--curvature applies to --optimizer"),
    (["--optimizer", "arc", "--hessian-fraction", "1.5"], "--hessian-fraction must lie in (0, 1]"),
    (["--optimizer", "trust-region", "--radius", "0"], "--radius must be a positive finite number"),
    (["--optimizer", "newton-mr", "--inexactness", "1"], "--inexactness must lie in (0, 1)"),
    (["--optimizer", "arc", "--subproblem-iterations", "0"], "--subproblem-iterations must be >= 1"),
    (["--optimizer", "arc", "--epochs", "0"], "--epochs must be >= 1"),
    (["--optimizer", "arc", "--batch-size", "64"], "--batch-size 64 exceeds the 40 training samples"),
    (["--optimizer", "arc", "--params", "0"], "--params does not apply"),
    (["--optimizer", "arc", "--seed", "-1"], "--seed must lie in 0..2**62"),
    (["--optimizer", "arc", "--loss", "clinets:make_net"], "rejected the first batch"),
    (["--optimizer", "arc", "--data", "clinets:nan_batches"], "is not finite"),
    (["--optimizer", "arc", "--resume", "missing.pt"], "--resume missing.pt: cannot read it"),
])
def test_bad_input_exits_2_and_writes_nothing(refused, args, message):
    refused([*OWN, "--epochs", "2", *args, "--out", "run"], message)


def test_a_loss_without_per_sample_values_is_refused(project, capsys):
    root, _ = project
    (root / "losses.py").write_text("import torch.nn.functional as F\n\n"
                                    "def mean_only(out, y):\n    return F.cross_entropy(out, y)\n")
    assert main([*OWN, "--optimizer", "newton-mr", "--loss", "losses:mean_only", "--out", "run"]) == 2
    err = capsys.readouterr().err
    assert "takes no reduction='none'" in err and "per-sample losses" in err and not (root / "run").exists()


def test_help_teaches_the_newton_options(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for needle in ("--optimizer {sgd,trust-region,arc,newton-mr,kfac}", "secondorder train --optimizer trust-region",
                   "--resume mr/trainer_state.pt", "steps.csv", "--hessian-fraction", "--subproblem-iterations",
                   "whole training set"):
        assert needle in text, needle
