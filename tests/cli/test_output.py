"""Issue 14: --out is checked before any work and replaced as a whole (never merged); the swap's protocol."""

from __future__ import annotations

import json
import os
import stat

import pytest

from secondorder.cli import main
from secondorder.cli.output import KILL_AT, MARKER, atomic_directory, recover

NEWTON = ["newton", "--dataset", "synthetic", "--machines", "3", "--iterations", "2", "--quiet"]
ANALYZE = ["analyze", "--model", "clinets:make_net", "--data", "clinets:batches", "--top-k", "2", "--probes", "9",
           "--slq-probes", "1", "--slq-steps", "8", "--quiet"]


def tree(path) -> dict[str, bytes]:
    """Every file under ``path`` by relative name, with its bytes."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("secondorder: error:") and len(err.splitlines()) == 1, err
    return err


def test_an_earlier_output_is_replaced_as_a_whole_not_merged(project):
    root, _ = project
    assert main([*ANALYZE, "--out", "rep"]) == 0
    assert (root / "rep" / "landscape_1d.png").exists()
    (root / "rep" / "notes.txt").write_text("from an earlier run")
    assert main([*ANALYZE, "--no-landscape", "--out", "rep"]) == 0
    names = set(tree(root / "rep"))
    assert not {"landscape_1d.png", "landscape_2d.png", "notes.txt"} & names
    marker = json.loads((root / "rep" / MARKER).read_text())
    assert marker["written_by"] == "secondorder analyze" and set(marker["files"]) | {MARKER} == names
    assert sorted(p.name for p in root.iterdir() if p.name.startswith(".rep")) == []  # no staging left


def test_the_output_directory_has_the_usual_permissions(tmp_path):
    umask = os.umask(0)
    os.umask(umask)
    assert main([*NEWTON, "--out", str(tmp_path / "run")]) == 0
    assert stat.S_IMODE((tmp_path / "run").stat().st_mode) == 0o777 & ~umask  # not the 0700 of a temp dir


def test_a_directory_no_command_wrote_is_refused_before_any_work_unless_force(tmp_path, monkeypatch, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("precious")
    with monkeypatch.context() as m:
        m.setattr("secondorder.cli.newton._problem", lambda args: pytest.fail("the work started"))
        assert main([*NEWTON, "--out", str(mine)]) == 2
    assert "--force" in one_error_line(capsys) and tree(mine) == {"thesis.tex": b"precious"}
    assert main([*NEWTON, "--force", "--out", str(mine)]) == 0
    assert "thesis.tex" not in tree(mine) and (mine / "summary.json").exists()


def test_an_empty_directory_and_a_link_to_an_earlier_output_are_replaced(tmp_path):
    (tmp_path / "empty").mkdir()
    assert main([*NEWTON, "--out", str(tmp_path / "empty")]) == 0
    (tmp_path / "link").symlink_to(tmp_path / "empty", target_is_directory=True)
    (tmp_path / "empty" / "old.txt").write_text("old")
    assert main([*NEWTON, "--out", str(tmp_path / "link")]) == 0
    assert (tmp_path / "link").is_symlink() and "old.txt" not in tree(tmp_path / "empty")
    assert (tmp_path / "empty" / "summary.json").exists()


@pytest.mark.parametrize("command, first_work", [
    (["analyze", "--quiet"], "secondorder.cli.analyze.device_of"),
    (["quantize", "--quiet"], "secondorder.cli.quantize.device_of"),
    (["train", "--quiet"], "secondorder.cli.train.device_of"),
    (NEWTON, "secondorder.cli.newton._problem"),
])
@pytest.mark.parametrize("out, message", [
    ("afile", "is a file, not a directory"),
    ("afile/sub", "afile is a file, so no directory can be made under it"),
    ("mine", "no secondorder command wrote"),
    (".", "is the current directory or contains it"),
], ids=["file", "parent-file", "foreign", "cwd"])
def test_an_unusable_out_fails_before_any_work(tmp_path, monkeypatch, capsys, command, first_work, out, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "data.csv").write_text("1,2")
    before = tree(tmp_path)
    monkeypatch.setattr(first_work, lambda *args: pytest.fail("the work started before --out was checked"))
    assert main([*command, "--out", out]) == 2
    assert message in one_error_line(capsys)
    assert tree(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["afile", "mine"]


def test_an_unwritable_parent_fails_before_any_work(tmp_path, monkeypatch, capsys):
    def refuse(path, *args):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr("secondorder.cli.output.os.mkdir", refuse)
    monkeypatch.setattr("secondorder.cli.newton._problem", lambda args: pytest.fail("the work started"))
    assert main([*NEWTON, "--out", str(tmp_path / "run")]) == 2
    assert f"cannot make a directory in {tmp_path} (Permission denied)" in one_error_line(capsys)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only directories")
def test_a_read_only_parent_fails_before_any_work(tmp_path, capsys):
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o500)
    try:
        assert main([*NEWTON, "--out", str(tmp_path / "ro" / "run")]) == 2
        assert "Permission denied" in one_error_line(capsys)
    finally:
        (tmp_path / "ro").chmod(0o700)


def test_missing_parents_are_made_and_removed_again_on_bad_input(tmp_path, capsys):
    assert main([*NEWTON, "--iterations", "0", "--out", str(tmp_path / "a" / "b" / "run")]) == 2
    assert "--iterations" in one_error_line(capsys) and list(tmp_path.iterdir()) == []
    assert main([*NEWTON, "--out", str(tmp_path / "a" / "b" / "run")]) == 0
    assert (tmp_path / "a" / "b" / "run" / "summary.json").exists()


# ---- the protocol, on fabricated states -------------------------------------------------------------------------

def _output(path, **files: str):
    path.mkdir()
    for name, text in {MARKER: "{}", **files}.items():
        (path / name).write_text(text)
    return tree(path)


def test_recover_rolls_back_a_swap_cut_after_the_old_output_was_set_aside(tmp_path):
    old = _output(tmp_path / ".out.old", a="old")
    recover(tmp_path / "out")
    assert os.listdir(tmp_path) == ["out"] and tree(tmp_path / "out") == old


def test_recover_deletes_the_old_output_once_the_new_one_is_in_place(tmp_path):
    _output(tmp_path / ".out.old", a="old")
    new = _output(tmp_path / "out", a="new")
    recover(tmp_path / "out")
    assert os.listdir(tmp_path) == ["out"] and tree(tmp_path / "out") == new


def test_recover_deletes_what_dead_runs_left_and_nothing_else(tmp_path):
    dead = 2 ** 22 + 17  # above Linux's default pid_max: no such process
    for name in (f".out.new-{dead}-0123abcd", f".out.dead-{dead}-89abcdef"):
        _output(tmp_path / name, a="partial")
    keep = [".out.new-1-0123abcd", ".out.new-notes", f".other.new-{dead}-0123abcd", "out.new-5-0123abcd"]
    for name in keep:  # a live process's (pid 1) staging, and names that are not this protocol's
        (tmp_path / name).mkdir()
    recover(tmp_path / "out")
    assert sorted(os.listdir(tmp_path)) == sorted(keep)


def _write(out, text: str) -> None:
    with atomic_directory(out, command="test") as staging:
        (staging / "a").write_text(text)
        (staging / f"only-{text}").write_text(text)


@pytest.mark.parametrize("step", range(1, 7))
def test_an_interrupt_at_any_step_leaves_the_old_or_the_new_output_and_no_leftovers(tmp_path, monkeypatch, step):
    _write(tmp_path / "out", "old")
    old = tree(tmp_path / "out")
    monkeypatch.setenv(KILL_AT, f"{step}:INT")
    with pytest.raises(KeyboardInterrupt):
        _write(tmp_path / "out", "new")
    monkeypatch.delenv(KILL_AT)
    assert os.listdir(tmp_path) == ["out"]
    got = tree(tmp_path / "out")
    if step <= 3:  # before the new output is renamed into place
        assert got == old
    else:
        assert set(got) == {MARKER, "a", "only-new"} and got["a"] == b"new"
