"""`secondorder prune`: the summary equals the API's, checkpoints hold the masks, bad input exits 2 with
nothing written."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from secondorder.cli import main
from secondorder.prune import PruningMask, prune

OWN = ["prune", "--model", "clinets:make_net", "--data", "clinets:batches", "--block-size", "8", "--probes", "8",
       "--quiet"]


def test_summary_equals_the_api_and_checkpoints_hold_the_masks(project, capsys):
    root, clinets = project
    assert main([*OWN, "--method", "magnitude,mfac,diagonal", "--sparsity", "0.7,0.5", "--steps", "2", "--json",
                 "--out", "p"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((root / "p" / "summary.json").read_text())
    runs = {(r["method"], r["target"]): r for r in printed["runs"]}
    assert sorted(runs) == [(m, s) for m in ("diagonal", "magnitude", "mfac") for s in (0.5, 0.7)]
    for (method, target), run in runs.items():
        model = clinets.make_net()
        want = prune(model, F.cross_entropy, clinets.batches(), target, method=method,
                     steps=2 if method == "mfac" else 1, block_size=8, num_matvecs=8, damping=1e-5)
        got = run["pruning"]
        assert got["num_pruned"] == want.num_pruned == round(target * 42) and got["steps"] == want.steps
        assert got["loss_after"] == pytest.approx(want.loss_after, rel=1e-6)
        assert run["pruned"]["loss"] == pytest.approx(want.loss_after, rel=1e-6) and run["fine_tuned"] is None
        saved = torch.load(root / "p" / run["checkpoint"], weights_only=True)
        mask = PruningMask.from_state_dict(saved["masks"])
        again = clinets.make_net()
        again.load_state_dict(saved["state_dict"])
        assert mask == want.mask and mask.holds(again) and saved["method"] == method
        torch.testing.assert_close(again.state_dict(), model.state_dict(), rtol=1e-6, atol=1e-7)
    assert printed["dense"]["accuracy"] is not None and 0 <= printed["dense"]["accuracy"] <= 1
    for name in ("report.md", "accuracy.png"):
        assert (root / "p" / name).stat().st_size > 300


def test_gradual_with_fine_tuning_keeps_the_masks(project, capsys):
    root, _ = project
    assert main([*OWN, "--method", "mfac", "--gradual", "--sparsity", "0.3,0.6", "--steps", "2",
                 "--fine-tune-epochs", "1", "--out", "p"]) == 0
    table = capsys.readouterr().out
    assert "| sparsity | mfac | mfac + fine-tuning |" in table and "report:" in table
    saved = json.loads((root / "p" / "summary.json").read_text())
    first, second = (torch.load(root / "p" / r["checkpoint"], weights_only=True) for r in saved["runs"])
    m1, m2 = PruningMask(first["masks"]), PruningMask(second["masks"])
    assert m1.num_pruned() == 13 and m2.num_pruned() == 25 and m1.union(m2) == m2  # nested: m2 prunes all of m1's
    assert all(r["fine_tuned"] is not None for r in saved["runs"])


@pytest.mark.parametrize("args, message", [
    (["--sparsity", "1.0"], "[0, 1)"),
    (["--sparsity", "half"], "comma-separated numbers"),
    (["--method", "random"], "unknown; choose from magnitude, mfac, diagonal"),
    (["--params", "nothere"], "nothere"),
    (["--gradual"], "--fine-tune-epochs"),
    (["--gradual", "--fine-tune-epochs", "1", "--sparsity", "0.5,0.3"], "increasing"),
    (["--steps", "0"], "--steps"),
    (["--probes", "2"], "--probes"),
    (["--fine-tune-epochs", "-1"], "--fine-tune-epochs"),
])
def test_bad_input_exits_2_and_writes_nothing(refused, args, message):
    refused([*OWN, *args, "--out", "p"], message)


def test_model_without_prunable_layers(refused):
    refused(["prune", "--model", "clinets:no_weights", "--data", "clinets:batches", "--quiet", "--out", "p"],
            "no parameters to prune")


def test_unknown_params_fail_before_training(tmp_path, capsys):
    state = torch.get_rng_state()
    assert main(["prune", "--params", "conv3", "--quiet", "--out", str(tmp_path / "x")]) == 2
    assert "did you mean" in capsys.readouterr().err and not (tmp_path / "x").exists()
    assert torch.equal(torch.get_rng_state(), state)


def test_help_teaches(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["prune", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert all(word in text for word in ("examples:", "methods:", "E_Q", "checkpoints/", "--gradual"))


@pytest.mark.slow  # trains the default model for one epoch, then prunes: ~10-30 s on 2 cores
def test_default_model_and_global_rng(tmp_path, capsys):
    state = torch.get_rng_state()
    out = tmp_path / "default"
    assert main(["prune", "--epochs", "1", "--sparsity", "0.5", "--steps", "2", "--gradients", "8", "--probes", "4",
                 "--quiet", "--out", str(out)]) == 0
    assert torch.equal(torch.get_rng_state(), state)
    saved = json.loads((out / "summary.json").read_text())
    assert [r["method"] for r in saved["runs"]] == ["magnitude", "mfac", "diagonal"]
    assert all(r["pruning"]["num_weights"] == 2960 and r["pruning"]["num_pruned"] == 1480 for r in saved["runs"])
    assert "test samples" in saved["context"]["evaluation"] and "report:" in capsys.readouterr().out
