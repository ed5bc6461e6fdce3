"""`secondorder quantize`: the allocation equals the API's, budgets hold, bad input exits 2 with nothing written."""

from __future__ import annotations

import json

import pytest
import torch.nn.functional as F

from secondorder.cli import main
from secondorder.cli.quantize import evaluate
from secondorder.quant import allocate_bits, gptq_quantize, layer_sensitivities

OWN = ["quantize", "--model", "clinets:make_net", "--data", "clinets:batches", "--probes", "9", "--quiet"]


def test_allocation_equals_the_api_and_the_budget_holds(project, capsys):
    root, clinets = project
    assert main([*OWN, "--budget-bits", "3", "--finetune-epochs", "1", "--json", "--out", "q"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((root / "q" / "summary.json").read_text())
    sens = layer_sensitivities(clinets.make_net(), F.cross_entropy, clinets.batches(), trace_matvecs=9, seed=0)
    want = allocate_bits(sens.hawq_v2(), sens.sizes(), 3 * 42)
    a = printed["allocation"]
    assert a["bits"] == want.bits and a["sensitivity"] == pytest.approx(want.sensitivity, rel=1e-12)
    assert a["size_bits"] <= 3 * 42 and a["solver"] == "dp"
    assert set(printed["results"]) == {"full precision", "quantized (PTQ)", "quantized + 1 QAT epochs"}
    assert all(0 <= r["accuracy"] <= 1 for r in printed["results"].values())
    sizes = [f["size_bits"] for f in printed["frontier"]]
    assert sizes == sorted(sizes) and a["size_bits"] in sizes
    for name in ("report.md", "pareto.png", "layers.png"):
        assert (root / "q" / name).stat().st_size > 300


def test_bops_budget_uses_the_ilp(project, capsys):
    root, _ = project
    assert main([*OWN, "--bits", "4,8", "--budget-bits", "8", "--bops", "0.5", "--pin", "2=8", "--out", "q"]) == 0
    saved = json.loads((root / "q" / "summary.json").read_text())
    a = saved["allocation"]
    assert a["solver"] == "milp" and a["bops"] <= saved["context"]["BOPs budget"] and a["bits"]["2"] == 8
    assert "| layer |" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--budget-bits", "1"], "below the smallest feasible"),
    (["--pin", "fc=8"], "fc"),
    (["--pin", "fc"], "LAYER=BITS"),
    (["--bits", "0,4"], "1..32"),
    (["--bits", "four"], "comma-separated integers"),
    (["--bops", "1.5", "--bits", "4,8"], "alpha"),
    (["--rounding", "gptq", "--finetune-epochs", "1"], "post-training"),
    (["--act-order"], "--rounding gptq only"),
])
def test_bad_input_exits_2_and_writes_nothing(project, capsys, args, message):
    root, _ = project
    before = sorted(p.name for p in root.iterdir())
    assert main([*OWN, *args, "--out", "q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("secondorder: error:") and len(err.splitlines()) == 1 and message in err, err
    assert sorted(p.name for p in root.iterdir()) == before


def test_gptq_rounding_equals_the_api(project, capsys):
    root, clinets = project
    assert main([*OWN, "--budget-bits", "3", "--rounding", "gptq", "--act-order", "--json", "--out", "q"]) == 0
    printed = json.loads(capsys.readouterr().out)
    bits = printed["allocation"]["bits"]
    want = gptq_quantize(clinets.make_net(), bits, clinets.batches(), act_order=True)
    assert printed["gptq"] == [layer.as_dict() for layer in want.layers.values()]
    assert [g["name"] for g in printed["gptq"]] == ["0", "2"] and all(g["samples"] == 40 for g in printed["gptq"])
    assert printed["results"]["quantized (GPTQ)"] == evaluate(want.model, F.cross_entropy, clinets.batches(), "cpu")
    assert set(printed["results"]) == {"full precision", "quantized (PTQ)", "quantized (GPTQ)"}
    assert "| error GPTQ |" in (root / "q" / "report.md").read_text()


def test_params_choose_the_layers(project):
    root, _ = project
    assert main([*OWN, "--params", "2", "--budget-bits", "3", "--out", "q"]) == 0
    saved = json.loads((root / "q" / "summary.json").read_text())
    assert [x["name"] for x in saved["layers"]] == ["2"] and list(saved["allocation"]["bits"]) == ["2"]


def test_model_without_quantizable_layers(project, capsys):
    assert main(["quantize", "--model", "clinets:no_weights", "--data", "clinets:batches", "--quiet"]) == 2
    assert "no quantizable layers" in capsys.readouterr().err
