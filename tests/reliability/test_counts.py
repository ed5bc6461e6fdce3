"""The README's reliability paragraph states the suite's counts; this keeps them true."""

from __future__ import annotations

import re
from pathlib import Path

from tests.reliability import test_algorithms, test_cli_faults, test_optimizers

README = Path(__file__).resolve().parents[2] / "README.md"


def test_the_readme_states_the_counts_of_the_standing_suite():
    refusals = sum(len(m.CASES) for m in (test_optimizers, test_algorithms, test_cli_faults))
    kills = len(test_cli_faults.KILLS)
    text = " ".join(README.read_text().split())
    found = re.search(r"(\d+) refused calls \((\d+) optimizer, (\d+) algorithm and operator, (\d+) command-line\)"
                      r".*?(\d+) kills of a command", text)
    assert found, "README.md lost its reliability paragraph"
    assert [int(g) for g in found.groups()] == [refusals, len(test_optimizers.CASES), len(test_algorithms.CASES),
                                                len(test_cli_faults.CASES), kills]
