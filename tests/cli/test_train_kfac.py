"""`secondorder train --optimizer kfac`: the records equal the library's run, the embedded default,
resume, refused combinations exit 2 and write nothing."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from secondorder.cli import main
from secondorder.cli.train_kfac import EPOCH_COLUMNS, STEP_COLUMNS
from secondorder.optim import KFAC
from tests.cli.test_train_newton import OWN, read_csv, strict_json, without_seconds

RUN = [*OWN, "--optimizer", "kfac", "--batch-size", "16", "--factor-every", "2", "--inverse-every", "3",
       "--damping", "0.01", "--lr", "0.05", "--weight-decay", "1e-3", "--test-data", "clinets:batches"]


def test_records_equal_the_library_run(project, capsys):
    root, clinets = project
    assert main([*RUN, "--epochs", "2", "--fisher", "empirical", "--out", "run"]) == 0
    table = capsys.readouterr().out
    assert "KFAC (--optimizer kfac, fisher empirical)" in table and "final: test accuracy" in table
    summary = strict_json(root / "run" / "summary.json")
    batches = clinets.batches()
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    model = clinets.make_net()
    opt = KFAC(model, F.cross_entropy, lr=0.05, damping=0.01, weight_decay=1e-3, factor_every=2, inverse_every=3,
               fisher="empirical", seed=3, distributed=False)
    order = torch.Generator().manual_seed(3)
    losses = []
    for _ in range(2):
        perm = torch.randperm(40, generator=order)
        for first in range(0, 40, 16):
            idx = perm[first:first + 16]
            losses.append(float(opt.step(lambda idx=idx: (F.cross_entropy(out := model(x[idx]), y[idx]), out))))
    steps = summary["steps"]
    assert [s["loss"] for s in steps] == losses  # bitwise
    assert [s["epoch"] for s in steps] == [1, 1, 1, 2, 2, 2]
    assert [s["factor_update"] for s in steps] == [True, False, True, False, True, False]
    assert [s["inverse_update"] for s in steps] == [True, False, False, True, False, False]
    state = torch.load(root / "run" / "trainer_state.pt", weights_only=True)
    assert all(torch.equal(state["model"][k], v) for k, v in model.state_dict().items())
    epochs = summary["epochs"]
    assert epochs[0]["train_loss"] == pytest.approx(sum(l * n for l, n in zip(losses[:3], (16, 16, 8))) / 40)
    assert all(0 <= r["test_accuracy"] <= 1 for r in epochs) and summary["final"]["iterations"] == 6
    assert summary["context"]["preconditioned layers"] == ["0", "2"] and summary["context"]["damping"] == 0.01
    assert tuple(read_csv(root / "run" / "steps.csv")[0]) == STEP_COLUMNS
    assert tuple(read_csv(root / "run" / "epochs.csv")[0]) == EPOCH_COLUMNS
    assert (root / "run" / "training.png").stat().st_size > 1000


def test_the_default_model(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--optimizer", "kfac", "--epochs", "1", "--json", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert "Mnist1dCNN" in summary["context"]["model"] and "training" in captured.err  # the progress bar
    assert len(summary["steps"]) == 32 and summary["context"]["batch size"] == 128  # 4000 samples, the last 32
    assert summary["context"]["preconditioned layers"] == ["conv1", "conv2", "fc"]
    assert summary["context"]["plain parameters"] == [] and summary["context"]["fisher"] == "mc"
    assert summary["final"]["train_loss"] < 2.3 and summary["final"]["test_accuracy"] > 0.2  # it learns in 32 steps


def test_resume_equals_an_uninterrupted_run(project, capsys):
    root, _ = project
    assert main([*RUN, "--epochs", "3", "--out", "whole"]) == 0
    assert main([*RUN, "--epochs", "1", "--out", "part"]) == 0
    assert main([*RUN, "--epochs", "3", "--resume", "part/trainer_state.pt", "--out", "part"]) == 0
    capsys.readouterr()
    whole, resumed = (strict_json(root / d / "summary.json") for d in ("whole", "part"))
    assert without_seconds(resumed["steps"]) == without_seconds(whole["steps"]) and len(whole["steps"]) == 9
    assert without_seconds(resumed["epochs"]) == without_seconds(whole["epochs"])
    a, b = (torch.load(root / d / "trainer_state.pt", weights_only=True) for d in ("whole", "part"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(u, v) for f, g in zip(a["optimizer"]["second_order"]["factors"],
                                                 b["optimizer"]["second_order"]["factors"]) for u, v in zip(f, g))
    for args, message in ((["--epochs", "3"], "already trained 3 epochs"),
                          (["--epochs", "4", "--damping", "0.1"], "--damping 0.01 there, 0.1 here"),
                          (["--epochs", "4", "--fisher", "ggn"], "--fisher mc there, ggn here")):
        assert main([*RUN, *args, "--resume", "whole/trainer_state.pt", "--out", "more"]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    assert main([*OWN, "--optimizer", "arc", "--epochs", "4", "--resume", "whole/trainer_state.pt",
                 "--out", "more"]) == 2
    assert "written by secondorder train --optimizer kfac" in capsys.readouterr().err
    assert not (root / "more").exists()


@pytest.mark.parametrize("args, message", [
    (["--optimizer", "kfac", "--radius", "2"], "--radius applies to --optimizer trust-region; --optimizer kfac takes "
                                                "--lr and --damping"),
    (["--optimizer", "kfac", "--schedule", "abs"], "--schedule belongs to the SGD schedule"),
    (["--damping", "0.1"], "--damping applies to --optimizer kfac, not to sgd"),
    (["--optimizer", "arc", "--lr", "0.1"], "--lr applies to --optimizer sgd or kfac; --optimizer arc takes --sigma"),
    (["--optimizer", "kfac", "--damping", "0"], "--optimizer kfac: --damping"),
    (["--optimizer", "kfac", "--momentum", "1"], "--momentum must be in [0, 1)"),
    (["--optimizer", "kfac", "--factor-every", "0"], "--factor-every"),
    (["--optimizer", "kfac", "--kl-clip", "-1"], "--kl-clip"),
    (["--optimizer", "kfac", "--batch-size", "64"], "--batch-size 64 exceeds the 40 training samples"),
    (["--optimizer", "kfac", "--fisher", "ggn", "--loss", "clinets:make_net"], "rejected the first batch"),
    (["--optimizer", "kfac", "--model", "clinets:no_weights"], "no trainable"),
    (["--optimizer", "kfac", "--data", "clinets:nan_batches"], "not finite"),
])
def test_bad_input_exits_2_and_writes_nothing(refused, args, message):
    refused([*OWN, "--epochs", "2", *args, "--out", "run"], message)


def test_kl_clip_none_turns_it_off_and_a_word_is_refused(project, capsys):
    root, _ = project
    assert main([*RUN, "--epochs", "1", "--kl-clip", "none", "--out", "run"]) == 0
    assert strict_json(root / "run" / "summary.json")["context"]["kl clip"] is None
    with pytest.raises(SystemExit) as exit_:
        main([*RUN, "--kl-clip", "off", "--out", "other"])
    assert exit_.value.code == 2 and "expected a positive number or 'none'" in capsys.readouterr().err


def test_help_teaches_kfac(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for needle in ("kfac", "--damping", "--factor-every", "--inverse-every", "--kl-clip", "--fisher {mc,empirical,ggn}",
                   "factored Tikhonov", "secondorder train --optimizer kfac"):
        assert needle in text, needle
