"""The standing bad-input suite's unit: a :class:`Refusal` is a call that must fail with one clear
error and leave everything as it was (see :class:`~tests.reliability.snapshot.Snapshot`).

Every module of this package lists its cases in ``CASES``; ``test_counts.py`` checks the counts
that the README's reliability paragraph states.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pytest

from tests.reliability.snapshot import Snapshot

Setup = Callable[[], tuple[Callable[[], object], Snapshot]]
"""Builds the scene and returns the call that must be refused and the snapshot of what it must not change."""


@dataclass(frozen=True)
class Refusal:
    """``setup()`` gives ``(call, snapshot)``; ``call()`` must raise ``error`` matching ``match``."""

    name: str
    setup: Setup
    error: type[BaseException]
    match: str

    def check(self) -> None:
        call, snapshot = self.setup()
        with pytest.raises(self.error, match=self.match) as caught:
            call()
        message = str(caught.value)
        assert message and "\n" not in message.strip(), f"not a one-line error: {message!r}"
        snapshot.assert_unchanged()


def parametrize(cases: list[Refusal]):
    """``@parametrize(CASES)``: one test per case, named by it."""
    return pytest.mark.parametrize("case", cases, ids=[c.name for c in cases])
