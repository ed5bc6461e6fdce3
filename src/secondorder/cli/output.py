"""The ``--out`` directory of a command: checked and staged before any work, then replaced as a whole.

A run never merges into an existing ``--out``: when it succeeds, ``--out`` holds exactly the files it
wrote (and the marker below), whatever the directory held before. The protocol, with ``OUT`` the
resolved ``--out`` and every other name a sibling of it (one directory, so one file system, where
each rename is atomic):

=========================  ===========================================================
``.OUT.new-PID-TOKEN``     staging: this run's files; made before any work, so that an
                           unwritable ``--out`` fails at once, and deleted on error
``.OUT.old``               the previous output, set aside during the swap
``.OUT.dead-PID-TOKEN``    the previous output, being deleted
=========================  ===========================================================

Commit, once the command has written everything into staging:

1. write the marker ``.secondorder-output.json`` into staging and flush every file to disk;
2. rename ``OUT`` to ``.OUT.old`` (if ``OUT`` exists);
3. rename staging to ``OUT``;
4. rename ``.OUT.old`` to ``.OUT.dead-PID-TOKEN`` and delete that.

A reader sees the old ``OUT`` until step 2 and the new one from step 3 on; in between ``OUT`` is
missing and ``.OUT.old`` holds the old output whole (a KeyboardInterrupt there renames it back at
once). :func:`recover` runs at the start of every run on ``OUT`` and settles what a killed run
(SIGKILL, SIGTERM, a power cut) left, the same way every time:

- ``.OUT.old`` and no ``OUT``: the run stopped between steps 2 and 3; ``.OUT.old`` is renamed
  back (roll back to the old output);
- ``.OUT.old`` beside ``OUT``: the run stopped after step 3; ``.OUT.old`` is deleted (the new
  output is complete);
- ``.OUT.new-*`` and ``.OUT.dead-*`` of a process that no longer runs: deleted.

So after any kill and the next run's recovery, ``OUT`` is exactly the old or exactly the new output.
Only one run at a time may write a given ``--out`` (two runs' swaps could interleave).

An existing ``OUT`` that is neither empty nor a previous output (it has no marker and no
``summary.json``) is refused unless ``force``: its files would be deleted.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from secondorder.cli.errors import UsageError

MARKER = ".secondorder-output.json"
"""Written into every output directory: what makes a directory a previous output that may be replaced."""

LEGACY_MARKER = "summary.json"
"""What outputs written before the marker have (every command writes it)."""

KILL_AT = "SECONDORDER_TEST_KILL_AT"
"""Test only: ``K`` or ``K:SIGNAL`` (e.g. ``3:TERM``) makes the process send itself SIGNAL (default
KILL) at step K of the write: 1 staging made (before the command's work), 2 files staged and
flushed, 3 old output set aside, 4 new output in place, 5 old output renamed for deletion, 6 done.
"""


@dataclass(frozen=True)
class Siblings:
    """``OUT`` and the names beside it that one run uses (see the module docstring)."""

    out: Path
    staging: Path
    aside: Path
    dead: Path

    @classmethod
    def of(cls, out: Path) -> Siblings:
        """This process's names for the resolved output directory ``out``."""
        tag = f"{os.getpid()}-{secrets.token_hex(4)}"
        return cls(out, out.with_name(f".{out.name}.new-{tag}"), out.with_name(f".{out.name}.old"),
                   out.with_name(f".{out.name}.dead-{tag}"))


def resolve(out: str | Path) -> Path:
    """The absolute ``--out`` with symbolic links followed (a link to a directory keeps pointing at it)."""
    return Path(out).expanduser().resolve()


def _step(number: int) -> None:
    """The test-only kill hook of :data:`KILL_AT` (nothing unless that variable is set)."""
    spec = os.environ.get(KILL_AT)
    if not spec:
        return
    at, _, name = spec.partition(":")
    if int(at) == number:
        os.kill(os.getpid(), getattr(signal, f"SIG{name or 'KILL'}"))


def _replaceable(path: Path, shown: str | Path) -> bool:
    """Whether the directory ``path`` is empty or a previous output (so replacing it loses nothing foreign)."""
    try:
        empty = next(path.iterdir(), None) is None
    except OSError as err:
        raise UsageError(f"--out {shown}: cannot read the directory ({err.strerror or err})") from err
    return empty or (path / MARKER).is_file() or (path / LEGACY_MARKER).is_file()


def check(out: str | Path, force: bool = False) -> Path:
    """The resolved ``--out`` if this run may replace it, else a :class:`UsageError`; changes nothing."""
    path = resolve(out)
    cwd = Path.cwd().resolve()
    if path == cwd or path in cwd.parents:
        raise UsageError(f"--out {out} is the current directory or contains it, and would be replaced as a whole; "
                         f"choose a new directory, e.g. --out {Path(out) / 'secondorder-out'}")
    if path.exists() and not path.is_dir():
        raise UsageError(f"--out {out} is a file, not a directory; choose another --out")
    ancestor = next(p for p in (path.parent, *path.parent.parents) if p.exists())
    if not ancestor.is_dir():
        raise UsageError(f"--out {out}: {ancestor} is a file, so no directory can be made under it")
    if path.is_dir() and not force and not _replaceable(path, out):
        raise UsageError(f"--out {out} is a non-empty directory that no secondorder command wrote (no {MARKER} "
                         f"or {LEGACY_MARKER}); a run replaces --out as a whole, deleting its files: choose "
                         "another --out, or pass --force to replace it")
    return path


def _stale(path: Path, out: Path) -> bool:
    """Whether ``path`` is a staging or dead directory of ``out`` left by a process that no longer runs."""
    match = re.fullmatch(rf"\.{re.escape(out.name)}\.(?:new|dead)-(\d+)-[0-9a-f]{{8}}", path.name)
    if match is None:
        return False
    pid = int(match.group(1))
    if pid == os.getpid() or os.name != "posix":
        return True  # not a live run's: this process makes its own names after recovering
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # another user's live process
        return False
    return False


def recover(out: str | Path) -> None:
    """Settle what a killed run left beside ``out`` (see the module docstring): afterwards ``out`` is the
    old or the new output, or absent if it never existed, and no leftover of a dead run remains.
    """
    path = resolve(out)
    if not path.parent.is_dir():
        return
    aside = path.with_name(f".{path.name}.old")
    if aside.is_dir() and not aside.is_symlink():
        if path.exists():
            _delete(aside)
        else:
            os.rename(aside, path)
    for item in path.parent.iterdir():
        if _stale(item, path):
            _delete(item)


def _delete(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _make_parents(path: Path) -> list[Path]:
    """Make the missing directories down to ``path``; returns those made, outermost first."""
    missing = [p for p in (path, *path.parents) if not p.exists()][::-1]
    for directory in missing:
        directory.mkdir()
    return missing


def _stage(names: Siblings, shown: str | Path) -> list[Path]:
    """Make the staging directory (and the missing parents, returned); a failure is a usage error."""
    made: list[Path] = []
    try:
        made = _make_parents(names.out.parent)
        os.mkdir(names.staging)
    except OSError as err:
        _remove_empty(made)
        raise UsageError(f"--out {shown}: cannot make a directory in {names.out.parent} ({err.strerror or err}); "
                         "the output is written beside --out first, then renamed into place") from err
    return made


def _remove_empty(directories: list[Path]) -> None:
    for directory in reversed(directories):
        try:
            directory.rmdir()
        except OSError:
            return


def _fsync(path: Path) -> None:
    """Flush one file or directory entry to disk (best effort)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _flush(directory: Path, files: bool = True) -> None:
    """Flush the files under ``directory`` (with ``files``) and the directory itself to disk; the
    renames into a parent need only the parent's own entry flushed, never its other contents.
    """
    for path in (*(sorted(p for p in directory.rglob("*") if p.is_file()) if files else ()), directory):
        _fsync(path)


def _write_marker(staging: Path, command: str) -> None:
    files = sorted(str(p.relative_to(staging)) for p in staging.rglob("*") if p.is_file())
    (staging / MARKER).write_text(json.dumps({"written_by": command, "files": files}, indent=2) + "\n")


def _commit(names: Siblings, command: str) -> None:
    """Steps 1-4 of the protocol: the staged files become ``out`` as a whole."""
    _write_marker(names.staging, command)
    _flush(names.staging)
    _step(2)
    had_old = names.out.exists()
    if had_old:
        os.rename(names.out, names.aside)
    try:
        if had_old:
            _step(3)
        os.rename(names.staging, names.out)
    except BaseException:
        if had_old and not names.out.exists():
            os.rename(names.aside, names.out)  # roll back: the old output, whole
        raise
    _flush(names.out.parent, files=False)
    _step(4)
    if had_old:
        os.rename(names.aside, names.dead)
        _step(5)
        _delete(names.dead)
    _step(6)


@contextmanager
def atomic_directory(out: str | Path, force: bool = False, command: str = "secondorder") -> Iterator[Path]:
    """Check ``out`` and yield a fresh staging directory beside it, before any work; when the block ends
    without error the staged files replace ``out`` as a whole (the module's protocol), on error they vanish
    and so do the parents made for them (bad input leaves nothing written).

    ``force`` allows replacing a non-empty directory that is not a previous output; ``command`` is
    recorded in the marker.
    """
    recover(out)
    path = check(out, force)
    names = Siblings.of(path)
    made = _stage(names, out)
    committed = False
    try:
        _step(1)
        yield names.staging
        _commit(names, command)
        committed = True
    finally:
        for leftover in (names.staging, names.dead):
            _delete(leftover)
        if names.aside.exists() and names.out.exists():
            _delete(names.aside)
        if not committed and not path.exists():
            _remove_empty(made)
