"""`secondorder analyze`: the user's model through factories, the default model, the report, bad input."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import torch
import torch.nn.functional as F

from secondorder.analysis import HessianAnalysis, analyze
from secondorder.cli import main

FAST = ["--top-k", "2", "--probes", "9", "--slq-probes", "1", "--slq-steps", "8", "--quiet"]

def own(*extra: str) -> list[str]:
    return ["analyze", "--model", "clinets:make_net", "--data", "clinets:batches", *FAST, *extra]


def test_report_numbers_equal_the_api(project, capsys):
    root, clinets = project
    assert main(own("--checkpoint", "last.pt", "--json", "--out", "rep")) == 0
    printed = json.loads(capsys.readouterr().out)
    saved = json.loads((root / "rep" / "summary.json").read_text())
    assert printed == saved
    model = clinets.make_net()
    model.load_state_dict(torch.load(root / "last.pt"))
    api = analyze(model, F.cross_entropy, clinets.batches(), top_k=2, trace_matvecs=9, slq_probes=1, slq_steps=8,
                  max_matvecs=300, seed=0)
    got = HessianAnalysis.from_dict(saved["analysis"])
    assert torch.equal(got.top.eigenvalues, api.top.eigenvalues) and got.trace == api.trace and got.layers == api.layers
    assert got.loss == api.loss and got.landscape_1d == api.landscape_1d
    for name in ("report.html", "report.md", "density.png", "layers.png", "landscape_1d.png", "landscape_2d.png",
                 "convergence.png"):
        assert (root / "rep" / name).stat().st_size > 500, name
    html = (root / "rep" / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 5 and "http" not in html and "<script" not in html


def test_several_checkpoints_give_the_evolution(project, capsys):
    root, _ = project
    assert main(own("--checkpoint", "first.pt", "--checkpoint", "last.pt", "--no-landscape", "--out", "rep")) == 0
    saved = json.loads((root / "rep" / "summary.json").read_text())
    assert [p["step"] for p in saved["evolution"]] == [0, 1]
    assert saved["analysis"]["landscape_1d"] is None
    assert (root / "rep" / "evolution.png").exists()
    assert "Top eigenvalues" in capsys.readouterr().out


def test_kfac_beside_the_gauss_newton_matrix(project, capsys):
    root, clinets = project
    assert main(own("--curvature", "kfac", "--kfac-probes", "12", "--no-landscape", "--out", "rep")) == 0
    printed = capsys.readouterr().out
    assert "K-FAC against the Gauss-Newton matrix" in printed and "ggn, compared with its K-FAC" in printed
    saved = HessianAnalysis.from_dict(json.loads((root / "rep" / "summary.json").read_text())["analysis"])
    api = analyze(clinets.make_net(), F.cross_entropy, clinets.batches(), curvature="kfac", top_k=2, trace_matvecs=9,
                  slq_probes=1, slq_steps=8, max_matvecs=300, landscape=False, kfac_probes=12, seed=0)
    assert saved.kfac == api.kfac and saved.kfac.num_probes == 12
    assert "K-FAC per layer" in (root / "rep" / "report.md").read_text()
    assert main(own("--curvature", "kfac", "--kfac-probes", "1", "--out", "bad")) == 2
    assert "--kfac-probes must be >= 2" in capsys.readouterr().err and not (root / "bad").exists()


@pytest.mark.parametrize("args, message", [
    (["--model", "nope_module:make", "--data", "clinets:batches"], "cannot import 'nope_module'"),
    (["--model", "clinets", "--data", "clinets:batches"], "must look like MODULE:NAME"),
    (["--model", "clinets:missing", "--data", "clinets:batches"], "has no attribute 'missing'"),
    (["--model", "clinets:make_net"], "--model and --data go together"),
    (["--model", "clinets:make_net", "--data", "clinets:broken"], "no data here"),
    (["--model", "clinets:make_net", "--data", "clinets:batches", "--checkpoint", "other.pt"], "does not match"),
    (["--model", "clinets:make_net", "--data", "clinets:batches", "--checkpoint", "absent.pt"], "cannot read"),
    (["--model", "clinets:make_net", "--data", "clinets:wrong_shape"], "rejected the first batch"),
    (["--model", "clinets:make_net", "--data", "clinets:nan_batches"], "nan"),
    (["--model", "clinets:make_net", "--data", "clinets:batches", "--loss", "x:y"], "cannot import 'x'"),
    (["--model", "clinets:make_net", "--data", "clinets:batches", "--top-k", "0"], "top_k"),
    (["--checkpoint", "first.pt"], "--model and --data go together"),
    (["--lr", "-1"], "positive finite"),
    (["--momentum", "1.5"], "momentum must be in [0, 1)"),
    (["--optimizer-state", "adam.pt"], "is for your --model"),
    (["--model", "clinets:make_net", "--data", "clinets:batches", "--momentum", "0.9"], "--momentum needs --lr"),
    (["--model", "clinets:make_net", "--data", "clinets:batches", "--optimizer-state", "adam.pt", "--lr", "1"],
     "give it or --lr"),
    (["--model", "clinets:make_net", "--data", "clinets:batches", "--optimizer-state", "absent.pt"], "cannot read"),
    (["--model", "clinets:make_net", "--data", "clinets:batches", "--optimizer-state", "fresh.pt"],
     "take at least one step"),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(project, capsys, args, message):
    root, clinets = project
    net = clinets.make_net()
    torch.save(torch.optim.Adam(net.parameters()).state_dict(), root / "fresh.pt")  # no step taken
    before = sorted(p.name for p in root.iterdir())
    assert main(["analyze", *args, "--quiet", "--out", "rep"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("secondorder: error:") and len(err.splitlines()) == 1 and message in err, err
    assert sorted(p.name for p in root.iterdir()) == before  # no rep/, no temporary directory left


def test_stability_from_the_learning_rate_or_the_saved_optimizer(project, capsys):
    root, clinets = project
    net = clinets.make_net()
    opt = torch.optim.Adam(net.parameters(), lr=0.02)
    X, y = clinets.batches()[0]
    F.cross_entropy(net(X), y).backward()
    opt.step()
    torch.save(net.state_dict(), root / "net.pt")
    torch.save(opt.state_dict(), root / "adam.pt")
    assert main(own("--checkpoint", "net.pt", "--optimizer-state", "adam.pt", "--no-landscape", "--out", "a")) == 0
    assert "Linear stability at the training learning rate (adam, lr 0.02" in capsys.readouterr().out
    saved = HessianAnalysis.from_dict(json.loads((root / "a" / "summary.json").read_text())["analysis"])
    api = analyze(net, F.cross_entropy, clinets.batches(), top_k=2, trace_matvecs=9, slq_probes=1, slq_steps=8,
                  max_matvecs=300, landscape=False, seed=0, optimizer=opt)
    assert saved.stability == api.stability and saved.stability.preconditioned.threshold == pytest.approx(38 / 0.02)
    assert main(own("--lr", "0.5", "--momentum", "0.9", "--no-landscape", "--out", "b")) == 0
    s = HessianAnalysis.from_dict(json.loads((root / "b" / "summary.json").read_text())["analysis"]).stability
    assert s.rule == "heavy-ball" and s.sharpness.threshold == pytest.approx(3.8 / 0.5) and s.trace is not None
    assert "value / bound" in (root / "b" / "report.md").read_text()


def test_a_library_error_is_not_masked_as_bad_input(project, monkeypatch):
    def broken(*args, **kwargs):
        raise ValueError("an internal bug")

    monkeypatch.setattr("secondorder.cli.analyze.analyze", broken)
    with pytest.raises(ValueError, match="an internal bug"):  # its traceback shows, not exit status 2
        main(own("--out", "rep"))
    assert not (project[0] / "rep").exists()


@pytest.mark.slow  # ~10-25 s on 2 cores: CI runs it (--run-slow)
def test_default_model_and_global_rng(tmp_path, capsys):
    state = torch.get_rng_state()
    out = tmp_path / "default"
    assert main(["analyze", "--epochs", "1", "--bottom-k", "0", "--no-landscape", *FAST, "--out", str(out)]) == 0
    assert torch.equal(torch.get_rng_state(), state)
    saved = json.loads((out / "summary.json").read_text())
    assert saved["analysis"]["num_parameters"] == 3018 and saved["analysis"]["num_samples"] == 4000
    assert [p["step"] for p in saved["evolution"]] == [0, 32]
    assert all(p["stability"]["sharpness"]["threshold"] == pytest.approx(38.0) for p in saved["evolution"])
    assert saved["analysis"]["stability"]["rule"] == "heavy-ball" and saved["analysis"]["stability"]["lr"] == 0.1
    assert "test accuracy" in saved["context"]
    assert "report:" in capsys.readouterr().out


def test_unknown_params_fail_before_training(tmp_path, capsys):
    state = torch.get_rng_state()
    assert main(["analyze", "--params", "conv3", "--quiet", "--out", str(tmp_path / "x")]) == 2
    assert "conv3" in capsys.readouterr().err and not (tmp_path / "x").exists()
    assert torch.equal(torch.get_rng_state(), state)


def test_help_teaches():
    with pytest.raises(SystemExit) as exit_:
        main(["analyze", "--help"])
    assert exit_.value.code == 0
    assert main([]) == 2


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed (apt-get install chromium)")
def test_report_renders_in_headless_chromium(project):
    root, _ = project
    assert main(own("--out", "rep")) == 0
    shot = root / "shot.png"
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                    "--window-size=1200,2400", (root / "rep" / "report.html").as_uri()],
                   check=True, capture_output=True, timeout=120)
    from PIL import Image

    image = Image.open(shot).convert("L")
    assert image.size == (1200, 2400)
    colours = image.getcolors(maxcolors=1 << 16)
    assert colours is not None and len(colours) > 50  # text, tables and plots, not a blank page


ANALYZE_SMALL = ["analyze", "--epochs", "1", "--probes", "12", "--slq-probes", "1", "--slq-steps", "10",
                 "--top-k", "2", "--bottom-k", "0", "--max-matvecs", "60", "--no-landscape", "--quiet"]


@pytest.mark.slow  # ~10-25 s on 2 cores: CI runs it (--run-slow)
def test_under_torchrun_ranks_share_the_batches_and_rank_0_writes_the_single_process_report(tmp_path):
    from secondorder.distributed import launch

    from . import workers

    codes = launch(workers.run_main_as_torchrun_rank, 2, ([*ANALYZE_SMALL, "--out", str(tmp_path / "two")],),
                   timeout=120)
    assert codes == [0, 0]
    assert main([*ANALYZE_SMALL, "--out", str(tmp_path / "one")]) == 0
    two = json.loads((tmp_path / "two" / "summary.json").read_text())["analysis"]
    one = json.loads((tmp_path / "one" / "summary.json").read_text())["analysis"]
    # the same Hessian of all 4000 samples, summed in another order (float32)
    assert two["trace"]["value"] == pytest.approx(one["trace"]["value"], rel=1e-5)
    assert two["top"]["eigenvalues"]["data"] == pytest.approx(one["top"]["eigenvalues"]["data"], rel=1e-5)
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-6)


def _ranks_reducer(rank: int, size: int):
    from secondorder.distributed import World
    from secondorder.distributed.reducer import Reducer

    class Ranks(Reducer):  # a reducer that only says which rank it is
        world = World(rank, size, "gloo", 60.0)

    return Ranks()


def test_too_few_batches_for_the_processes_is_a_usage_error():
    from secondorder.cli.analyze import _my_shard
    from secondorder.cli.common import UsageError

    batch = (torch.zeros(2, 3), torch.zeros(2))
    assert _my_shard([batch] * 5, _ranks_reducer(1, 2)) == [batch, batch]
    with pytest.raises(UsageError, match="has 1 item\\(s\\) for 2 processes"):
        _my_shard(batch, _ranks_reducer(0, 2))


def test_a_tuple_of_batches_is_sharded_batch_by_batch():
    """Issue 13: a --data factory returning a tuple of 4 batches gave 'has 1 batch(es) for 2 processes'."""
    from secondorder.cli.analyze import _my_shard

    batches = tuple((torch.full((2, 3), float(i)), torch.zeros(2)) for i in range(4))
    assert _my_shard(batches, _ranks_reducer(1, 2)) == [batches[1], batches[3]]
    assert _my_shard(batches, _ranks_reducer(0, 2)) == [batches[0], batches[2]]
