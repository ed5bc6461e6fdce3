"""`secondorder train`: the CSV equals the library's run, resume, the default model, bad input exits 2."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
import torch.nn.functional as F

from secondorder.cli import main
from secondorder.cli.train import CSV_COLUMNS
from secondorder.schedules import AdaptiveBatchSize, AdaptiveBatchTrainer

OWN = ["train", "--model", "clinets:make_net", "--data", "clinets:batches", "--batch-size", "8",
       "--max-batch-size", "32", "--patience", "1", "--lr", "0.05", "--seed", "3", "--quiet"]


def read_csv(path):
    return list(csv.DictReader(path.open()))


def test_csv_equals_the_library_run(project, capsys):
    root, clinets = project
    assert main([*OWN, "--schedule", "absa", "--epochs", "4", "--lr-milestones", "3", "--epsilon", "0.1",
                 "--out", "run"]) == 0
    assert "final: test accuracy -" in capsys.readouterr().out  # no --test-data: no accuracy
    rows = read_csv(root / "run" / "epochs.csv")
    assert tuple(rows[0]) == CSV_COLUMNS and len(rows) == 4
    batches = clinets.batches()
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    controller = AdaptiveBatchSize(8, 0.05, max_batch_size=32, patience=1, adversarial_fraction=0.2,
                                   adversarial_epochs=2, lr_milestones=(3,))
    want = AdaptiveBatchTrainer(clinets.make_net(), F.cross_entropy, (x, y), controller, epsilon=0.1,
                                seed=3).train(4)
    assert [int(r["batch_size"]) for r in rows] == [r.batch_size for r in want] == [8, 16, 32, 32]
    assert [int(r["iterations"]) for r in rows] == [r.iterations for r in want] == [5, 8, 10, 12]
    for got, ref in zip(rows, want):
        assert float(got["lr"]) == ref.lr and float(got["adversarial_fraction"]) == ref.adversarial_fraction
        assert float(got["top_eigenvalue"]) == ref.top_eigenvalue and float(got["train_loss"]) == ref.train_loss
        assert got["test_accuracy"] == "" and got["batch_increase"] == ref.batch_increase
    summary = json.loads((root / "run" / "summary.json").read_text())
    assert summary["final"]["iterations"] == 12 and len(summary["epochs"]) == 4
    assert [b["reason"] for b in summary["batch_increases"]] == ["patience", "patience"]
    assert (root / "run" / "schedule.png").stat().st_size > 1000


def test_resume_continues_the_same_run(project, capsys):
    root, _ = project
    extra = ["--schedule", "abs", "--test-data", "clinets:batches", "--json"]
    assert main([*OWN, *extra, "--epochs", "5", "--out", "whole"]) == 0
    whole = json.loads(capsys.readouterr().out)
    assert whole == json.loads((root / "whole" / "summary.json").read_text())
    assert main([*OWN, *extra, "--epochs", "2", "--lr-milestones", "2,3,4", "--adversarial-epochs", "2",
                 "--out", "part"]) == 0
    capsys.readouterr()
    assert main([*OWN, *extra, "--epochs", "5", "--resume", "part/trainer_state.pt", "--out", "part"]) == 0
    resumed = json.loads(capsys.readouterr().out)
    assert resumed["epochs"] == whole["epochs"] and whole["context"]["lr milestones"] == [2, 3, 4]
    assert all(0 <= r["test_accuracy"] <= 1 for r in whole["epochs"])
    assert read_csv(root / "part" / "epochs.csv") == read_csv(root / "whole" / "epochs.csv")


def test_default_model_smoke(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--epochs", "2", "--eigen-matvecs", "5", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "Mnist1dCNN" in captured.out and "training" in captured.err  # the table, the progress bar
    rows = read_csv(out / "epochs.csv")
    assert [int(r["iterations"]) for r in rows] == [32, 64]  # 4000 samples in batches of 128
    assert [float(r["adversarial_fraction"]) for r in rows] == [0.2, 0.0]  # FGSM in the first half only
    assert all(0 <= float(r["test_accuracy"]) <= 1 for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["context"]["max batch size"] == 4000 and summary["context"]["epsilon"] == pytest.approx(0.05, 0.01)


@pytest.mark.parametrize("args, message", [
    (["--epochs", "0"], "--epochs must be >= 1"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--max-batch-size", "64"], "--max-batch-size 64 exceeds the 40 training samples"),
    (["--schedule", "fixed", "--batch-size", "64", "--max-batch-size", "64"], "--batch-size 64 exceeds"),
    (["--max-batch-size", "4"], "must be >= --batch-size"),
    (["--adversarial-fraction", "1.5"], "--adversarial-fraction must lie in [0, 1]"),
    (["--schedule", "abs", "--adversarial-fraction", "0.1"], "use --schedule absa"),
    (["--lr", "0"], "--lr must be positive"),
    (["--ratio", "1"], "--ratio must exceed 1"),
    (["--lr-milestones", "ten"], "comma-separated epochs"),
    (["--params", "0"], "--params does not apply"),
    (["--schedule", "slq"], "--lr does not apply to --schedule slq"),
    (["--slq-every", "2"], "--slq-every applies to --schedule slq, not to --schedule absa"),
    (["--resume", "missing.pt"], "--resume missing.pt: cannot read it"),
    (["--model", "clinets:make_net", "--data", "clinets:wrong_shape"], "rejected the first batch"),
    (["--test-data", "clinets:broken"], "--test-data clinets:broken failed"),
])
def test_bad_input_exits_2_and_writes_nothing(refused, args, message):
    refused([*OWN, "--epochs", "2", *args, "--out", "run"], message)


def test_resume_errors(project, capsys):
    root, _ = project
    assert main([*OWN, "--epochs", "2", "--out", "run"]) == 0
    capsys.readouterr()
    for args, message in ((["--epochs", "2"], "already trained 2 epochs"),
                          (["--epochs", "4", "--patience", "3"], "does not match this run")):
        assert main([*OWN, *args, "--resume", "run/trainer_state.pt", "--out", "more"]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    assert not (root / "more").exists()


def test_slq_schedule_records_the_learned_lr_and_momentum_and_resumes(project, capsys):
    root, _ = project
    slq = ["train", "--model", "clinets:make_net", "--data", "clinets:batches", "--batch-size", "8", "--schedule",
           "slq", "--slq-every", "2", "--slq-steps", "4", "--slq-batch", "16", "--seed", "3", "--quiet", "--json"]
    assert main([*slq, "--epochs", "2", "--out", "whole"]) == 0
    whole = json.loads(capsys.readouterr().out)
    refreshes = whole["slq_refreshes"]
    assert [r["step"] for r in refreshes] == list(range(0, 10, 2)) and all(r["matvecs"] == 4 for r in refreshes)
    for r in refreshes:  # the heavy-ball optimum of the recorded (smoothed, capped) condition number
        root_k = math.sqrt(r["kappa"])
        assert r["momentum"] == pytest.approx(((root_k - 1) / (root_k + 1)) ** 2, rel=1e-12)
        assert 0 < r["lr"] <= (1 + math.sqrt(r["momentum"])) ** 2 / r["lambda_max"] * (1 + 1e-12)
    in_force = {5: refreshes[2], 10: refreshes[4]}  # 5 steps per epoch
    assert [(e["lr"], e["top_eigenvalue"]) for e in whole["epochs"]] == \
        [(in_force[e["iterations"]]["lr"], in_force[e["iterations"]]["lambda_max"]) for e in whole["epochs"]]
    assert whole["final"]["momentum"] == refreshes[-1]["momentum"]
    assert [float(r["lr"]) for r in read_csv(root / "whole" / "slq.csv")] == [r["lr"] for r in refreshes]
    assert main([*slq, "--epochs", "1", "--out", "part"]) == 0
    capsys.readouterr()
    assert main([*slq, "--epochs", "2", "--resume", "part/trainer_state.pt", "--out", "part"]) == 0
    resumed = json.loads(capsys.readouterr().out)
    assert resumed["epochs"] == whole["epochs"] and resumed["slq_refreshes"] == refreshes
    assert main([*slq, "--epochs", "2", "--slq-steps", "5", "--resume", "part/trainer_state.pt", "--out", "x"]) == 2
    assert "num_steps=4" in capsys.readouterr().err


def test_default_model_refuses_test_data_alone(tmp_path, capsys):
    assert main(["train", "--test-data", "x:y", "--out", str(tmp_path / "r")]) == 2
    assert "--test-data needs --model and --data" in capsys.readouterr().err
