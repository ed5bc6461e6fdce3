"""The command line's --out under faults: a run killed at any step of its write (SIGKILL, SIGTERM, SIGINT)
leaves the old or the new output, never a mix, and a refused run leaves an earlier output as it was.

The kills use the test-only hook ``SECONDORDER_TEST_KILL_AT=K[:SIGNAL]`` of
:mod:`secondorder.cli.output`: the process sends itself the signal at step K of the write.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from secondorder.cli import _parser, main
from secondorder.cli.common import UsageError
from secondorder.cli.output import KILL_AT, MARKER
from tests.reliability.faults import Refusal, parametrize

NEWTON = ["newton", "--dataset", "synthetic", "--machines", "3", "--iterations", "2", "--quiet"]
NEW_FILES = {MARKER, "summary.json", "iterations.csv", "convergence.png"}
STEPS = 6  # 1 staging made, 2 staged, 3 old set aside, 4 new in place, 5 old renamed for deletion, 6 done
KILLS = [(k, "KILL") for k in range(1, STEPS + 1)] + [(3, "TERM"), (3, "INT")]  # TERM: no handler, as KILL


def tree(root: Path) -> dict[str, bytes | None]:
    """Every entry under ``root`` by relative name: a file's bytes, ``None`` for a directory."""
    return {str(p.relative_to(root)): None if p.is_dir() else p.read_bytes() for p in sorted(root.rglob("*"))}


def _old_output(out: Path) -> dict[str, bytes | None]:
    """An earlier run's output (marker, summary.json, a file the new run does not write)."""
    out.mkdir(parents=True)
    (out / MARKER).write_text(json.dumps({"written_by": "secondorder newton", "files": ["notes.txt"]}))
    (out / "summary.json").write_text('{"old": true}')
    (out / "iterations.csv").write_text("old\n")
    (out / "notes.txt").write_text("from the earlier run")
    return tree(out)


def _is_new(files: dict[str, bytes | None], old: dict[str, bytes | None]) -> bool:
    """Whether ``files`` are exactly one uninterrupted new run's (seed 7): all of them, none of the old's."""
    if set(files) != NEW_FILES or any(files[name] == old.get(name) for name in files):
        return False
    marker, summary = json.loads(files[MARKER] or b""), json.loads(files["summary.json"] or b"")
    return set(marker["files"]) == NEW_FILES - {MARKER} and summary["context"]["seed"] == 7 \
        and len((files["iterations.csv"] or b"").splitlines()) == 4


def _killed_runs(base: Path) -> list[tuple[int, str, Path, subprocess.Popen]]:
    """One ``secondorder newton`` per kill in KILLS, all at once, each over its own earlier output."""
    runs = []
    for step, name in KILLS:
        scene = base / f"{step}-{name}"
        _old_output(scene / "out")
        env = {**os.environ, KILL_AT: f"{step}:{name}", "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
        proc = subprocess.Popen([sys.executable, "-m", "secondorder.cli", *NEWTON, "--seed", "7", "--out", "out"],
                                cwd=scene, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        runs.append((step, name, scene, proc))
    return runs


@pytest.mark.skipif(os.name != "posix", reason="POSIX signals")
def test_a_run_killed_at_any_step_of_its_write_leaves_the_old_or_the_new_output(tmp_path, monkeypatch):
    old = _old_output(tmp_path / "reference")
    for step, name, scene, proc in _killed_runs(tmp_path):
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == -getattr(signal, f"SIG{name}"), (step, name, err.decode()[-2000:])
        left = os.listdir(scene)
        if name == "INT":  # a KeyboardInterrupt rolls back at once: nothing for the next run to do
            assert left == ["out"] and tree(scene / "out") == old, (step, name, left)
        elif step == 3:  # between 'old set aside' and 'new in place': no out, the old output whole beside it
            assert "out" not in left and tree(scene / ".out.old") == old, left
        monkeypatch.chdir(scene)  # the next run (refused: --iterations 0) settles what the killed one left
        assert main([*NEWTON, "--iterations", "0", "--out", "out"]) == 2
        assert os.listdir(scene) == ["out"], (step, name, os.listdir(scene))
        files = tree(scene / "out")
        if step <= 3:
            assert files == old, (step, name)
        else:
            assert _is_new(files, old), (step, name, sorted(files))


class DirectorySnapshot:
    """What a refused command must not change: every name and byte under the working directory."""

    def __init__(self) -> None:
        self.root = Path.cwd()
        self.taken = tree(self.root)

    def assert_unchanged(self) -> None:
        now = tree(self.root)
        changed = sorted(k for k in self.taken.keys() | now.keys() if self.taken.get(k, b"?") != now.get(k, b"?"))
        assert not changed, f"the refused run changed: {', '.join(changed)}"


def _refused(*argv: str):
    """The run of ``argv`` over an earlier output ``out`` in the working directory (the test's tmp_path)."""
    def setup():
        _old_output(Path.cwd() / "out")
        args = _parser().parse_args([*argv, "--quiet", "--out", "out"])
        return (lambda: args.run(args)), DirectorySnapshot()
    return setup


CASES = [
    Refusal("newton --iterations 0 over an earlier output", _refused(*NEWTON, "--iterations", "0"),
            UsageError, "--iterations must be >= 1"),
    Refusal("analyze --top-k 0 over an earlier output", _refused("analyze", "--top-k", "0"), UsageError, "top_k"),
    Refusal("quantize --bits four over an earlier output", _refused("quantize", "--bits", "four"), UsageError,
            "comma-separated integers"),
    Refusal("train --epochs 0 over an earlier output", _refused("train", "--epochs", "0"), UsageError,
            "--epochs must be >= 1"),
]


@parametrize(CASES)
def test_a_refused_run_leaves_an_earlier_output_and_nothing_beside_it(case, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    case.check()
