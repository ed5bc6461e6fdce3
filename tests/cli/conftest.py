"""The factories module and checkpoints the command-line tests run against."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch

NETS = textwrap.dedent('''
    import torch
    from torch import nn

    def make_net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))

    def make_other():
        return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))

    def batches():
        g = torch.Generator().manual_seed(1)
        X, y = torch.randn(40, 4, generator=g), torch.randint(0, 3, (40,), generator=g)
        return [(X[:25], y[:25]), (X[25:], y[25:])]

    def wrong_shape():
        return [(torch.randn(8, 7), torch.zeros(8, dtype=torch.long))]

    def later_wrong_inputs():  # the first batch fits; the third has 7 features instead of 4
        good = batches()
        return [*good, (torch.randn(5, 7), torch.zeros(5, dtype=torch.long))]

    def later_wrong_targets():  # the second batch's targets are [15, 2] instead of [15]
        (x0, y0), (x1, _) = batches()
        return [(x0, y0), (x1, torch.zeros(15, 2, dtype=torch.long))]

    def nan_batches():
        return [(torch.full((8, 4), float("nan")), torch.zeros(8, dtype=torch.long))]

    def broken():
        raise RuntimeError("no data here")

    def no_weights():
        return nn.Sequential(nn.Flatten())
''')


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A directory with a module ``clinets`` of factories and two checkpoints, as the cwd."""
    (tmp_path / "clinets.py").write_text(NETS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("clinets", None)
    import clinets

    net = clinets.make_net()
    torch.save(net.state_dict(), tmp_path / "first.pt")
    with torch.no_grad():
        net[0].weight.mul_(1.5)
    torch.save(net.state_dict(), tmp_path / "last.pt")
    torch.save(clinets.make_other().state_dict(), tmp_path / "other.pt")
    yield tmp_path, clinets
    sys.modules.pop("clinets", None)


@pytest.fixture
def refused(project, capsys):
    """``refused(argv, message)``: the command exits 2 with one error line holding ``message`` and
    leaves the project directory as it was."""
    from secondorder.cli import main

    root, _ = project

    def check(argv: list[str], message: str) -> None:
        before = sorted(p.name for p in root.iterdir())
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("secondorder: error:") and len(err.splitlines()) == 1 and message in err, err
        assert sorted(p.name for p in root.iterdir()) == before

    return check
