"""`secondorder quantize`: the allocation equals the API's, budgets hold, bad input exits 2 with nothing written."""

from __future__ import annotations

import json
import math

import pytest
import torch.nn.functional as F

from secondorder.cli import main
from secondorder.data import evaluate
from secondorder.quant import (
    activation_sensitivities,
    allocate_bits,
    allocate_joint,
    gptq_quantize,
    interpolated_budget,
    layer_macs,
    layer_sensitivities,
    measure_dependencies,
    quantize,
    uniform_cost,
)
from secondorder.quant.uncertainty import confidence_omega

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
    (["--max-drop", "1", "--budget-bits", "3"], "drop --budget-bits"),
    (["--max-drop", "-1"], ">= 0"),
    (["--max-drop", "1", "--bits", "8"], "at least two candidate"),
    (["--robust", "1", "--sensitivity", "v1"], "--sensitivity v2"),
    (["--redraws", "-1"], "--redraws"),
    (["--activations", "--act-bits", "0,4"], "--act-bits must lie in 1..32"),
    (["--activations", "--bits", "4,8", "--budget-bits", "8", "--bops", "0", "--pin", "0=8"], "BOPs budget"),
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


def test_max_drop_bisects_inside_the_window(project, capsys):
    root, clinets = project
    assert main([*OWN, "--bits", "2,3,8", "--max-drop", "5", "--pairs", "all", "--json", "--out", "q"]) == 0
    printed = json.loads(capsys.readouterr().out)
    b = printed["bisection"]
    assert b["metric"] == "accuracy" and b["max_drop"] == 0.05 and b["pairs"] == [["0", "2"]]
    deps = measure_dependencies(clinets.make_net(), F.cross_entropy, clinets.batches(), bits=(2, 3, 8), pairs="all")
    assert b["dependency_metric"] == "loss" and b["single"] == {k: {str(w): d for w, d in v.items()} for k, v in deps.single.items()}
    chosen = b["searches"]["dependencies"]
    assert printed["allocation"]["bits"] == chosen["bits"] and printed["allocation"]["solver"] == "bisection"
    full = evaluate(clinets.make_net(), F.cross_entropy, clinets.batches())["accuracy"]
    assert printed["results"]["quantized (PTQ)"]["accuracy"] >= full - 0.05 - 1e-12  # evaluation = calibration data
    for search in b["searches"].values():
        assert search["damage"] <= 0.05 and len(search["probed"]) <= 1 + math.ceil(math.log2(search["path_length"]))
    assert "Bisection inside the window" in (root / "q" / "report.md").read_text()


def test_robust_allocation_and_stability(project, capsys):
    root, clinets = project
    assert main([*OWN, "--budget-bits", "3", "--robust", "2", "--redraws", "50", "--json", "--out", "q"]) == 0
    printed = json.loads(capsys.readouterr().out)
    sens = layer_sensitivities(clinets.make_net(), F.cross_entropy, clinets.batches(), trace_matvecs=9, seed=0)
    want = allocate_bits(confidence_omega(sens.layers, 2.0), sens.sizes(), 3 * 42)
    assert printed["allocation"]["bits"] == want.bits
    rb, st = printed["robust"], printed["stability"]
    assert rb["z"] == 2.0 and 0 <= rb["P(robust beats plain)"] <= 1
    assert rb["same as plain"] == (rb["plain bits"] == want.bits)
    assert st["redraws"] == 50 and 0 <= st["frequency"] <= 1 and st["method"] == "parametric"
    assert "Stability: the same bits come back" in (root / "q" / "report.md").read_text()


def test_activations_are_allocated_jointly_under_the_bops_budget(project, capsys):
    root, clinets = project
    assert main([*OWN, "--activations", "--bits", "2,4,8", "--act-bits", "4,8", "--budget-bits", "6", "--bops", "0.4",
                 "--json", "--out", "q"]) == 0
    printed = json.loads(capsys.readouterr().out)
    model, data = clinets.make_net(), clinets.batches()
    sens = layer_sensitivities(model, F.cross_entropy, data, bits=(2, 4, 8), trace_matvecs=9, seed=0)
    acts = activation_sensitivities(model, F.cross_entropy, data, bits=(4, 8), trace_matvecs=9, seed=0)
    macs = layer_macs(model, data[0][0])
    low = uniform_cost(sens.sizes(), 2, macs, dict.fromkeys(macs, 4))[1]
    high = uniform_cost(sens.sizes(), 8, macs, dict.fromkeys(macs, 8))[1]
    budget = interpolated_budget(low, high, 0.4)
    want = allocate_joint(sens.hawq_v2(), acts.hawq_v2(), sens.sizes(), macs, size_budget_bits=6 * 42,
                          bops_budget=budget)
    a = printed["allocation"]
    assert a["bits"] == want.bits and a["act_bits"] == want.act_bits and a["bops"] <= budget
    assert printed["context"]["BOPs budget"] == pytest.approx(budget, rel=1e-12)
    w = printed["weight only"]
    assert w["bops"] <= budget and set(w["act_bits"].values()) == {w["uniform activation bits"]}
    assert a["sensitivity"] <= w["sensitivity"] + 1e-12  # the joint optimum includes the weight-only configurations
    calibrated = quantize(model, want.bits, want.act_bits, calibration=data)
    assert printed["results"]["quantized (PTQ)"] == evaluate(calibrated, F.cross_entropy, data)
    assert any(k.startswith("weight only, activations") for k in printed["results"])
    assert all("act_bits" in layer for layer in printed["layers"])
    for name in ("frontier.png", "report.md"):
        assert (root / "q" / name).stat().st_size > 300
