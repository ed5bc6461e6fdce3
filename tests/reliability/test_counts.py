"""The README's reliability paragraph states the suite's counts; this keeps them true."""

from __future__ import annotations

import re
from pathlib import Path

from tests.reliability import test_algorithms, test_cli_faults, test_optimizers, test_rank_faults

README = Path(__file__).resolve().parents[2] / "README.md"


def cases(module) -> int:
    """The test cases ``module`` collects: one per test function, or one per parameter set."""
    total = 0
    for name, function in vars(module).items():
        if name.startswith("test_") and callable(function):
            sets = [len(mark.args[1]) for mark in getattr(function, "pytestmark", []) if mark.name == "parametrize"]
            total += sets[0] if sets else 1
    return total


def test_the_readme_states_the_counts_of_the_standing_suite():
    refusals = sum(len(m.CASES) for m in (test_optimizers, test_algorithms, test_cli_faults))
    kills = len(test_cli_faults.KILLS)
    text = " ".join(README.read_text().split())
    found = re.search(r"(\d+) refused calls \((\d+) optimizer, (\d+) algorithm and operator, (\d+) command-line\)"
                      r".*?(\d+) kills of a command.*?(\d+) rank faults", text)
    assert found, "README.md lost its reliability paragraph"
    assert [int(g) for g in found.groups()] == [refusals, len(test_optimizers.CASES), len(test_algorithms.CASES),
                                                len(test_cli_faults.CASES), kills, cases(test_rank_faults)]
