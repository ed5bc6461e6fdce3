"""`secondorder batch-scaling`: the summary is the API's result, the files are written, bad input exits 2 with
nothing written."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from secondorder.analysis import BatchScaling, batch_scaling
from secondorder.cli import main

OWN = ["batch-scaling", "--model", "clinets:make_net", "--data", "clinets:batches", "--quiet"]


def test_summary_is_the_api_result_and_the_files_are_written(project, capsys):
    root, clinets = project
    assert main([*OWN, "--batch-sizes", "40,5", "--num-batches", "3", "--optimizers", "sgd", "--steps", "3",
                 "--lr-rtol", "0.5", "--seed", "2", "--json", "--out", "bs"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((root / "bs" / "summary.json").read_text())
    got = BatchScaling.from_dict(printed["result"])
    batches = clinets.batches()
    data = (torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]))
    want = batch_scaling(clinets.make_net(), F.cross_entropy, data, [5, 40], num_batches=3, optimizers=("sgd",),
                         steps=3, lr_rtol=0.5, seed=2)
    assert got.batch_sizes == (5, 40) and [p.values for p in got.eigenvalues] == [p.values for p in want.eigenvalues]
    assert got.full == want.full and got.fit == want.fit and got.lr == want.lr
    assert printed["context"]["data"] == "clinets:batches: 40 samples"
    assert "| 5 | 3 |" in (root / "bs" / "report.md").read_text()
    assert (root / "bs" / "batch_scaling.png").stat().st_size > 10_000


@pytest.mark.parametrize("args, message", [
    (["--batch-sizes", "5,41"], "exceed the 40 samples of --data"),
    (["--batch-sizes", "8"], "at least two distinct"),
    (["--batch-sizes", "8,0"], "must be positive"),
    (["--batch-sizes", "8,x"], "comma-separated integers"),
    (["--num-batches", "1"], "--num-batches must be >= 2"),
    (["--optimizers", "sgd,rmsprop"], "choose from sgd, adam"),
    (["--divergence", "1"], "--divergence must be a finite number above 1"),
    (["--lr-rtol", "0"], "--lr-rtol must lie in (0, 1)"),
])
def test_bad_input_exits_2_with_nothing_written(refused, args, message):
    refused([*OWN, *args, "--out", "bs"], message)


def test_help_explains_the_numbers(capsys):
    with pytest.raises(SystemExit):
        main(["batch-scaling", "--help"])
    text = capsys.readouterr().out
    assert "secondorder batch-scaling --no-lr" in text and "2 / lambda_B" in text and "1/B - 1/n" in text
