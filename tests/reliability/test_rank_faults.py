"""Ranks under faults, launched as a plain launcher does it (``MASTER_ADDR``/``MASTER_PORT``/``RANK``/
``WORLD_SIZE``, gloo on CPU, a short group timeout): a rank that sleeps past the timeout or is
stopped (SIGSTOP) makes every other rank fail with a clear error within the timeout, and ranks
given different ``secondorder newton`` options all fail with one clear line (never SIGABRT).

Every run has an outer deadline (no test can hang), and the time from the fault to each survivor's
error is bounded by ``TIMEOUT + SLACK``; without the bound a survivor waited until the sleeper woke.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 3.0  # the group's timeout in these tests; a faulty rank sleeps 3 x TIMEOUT
SLACK = 10.0  # what may pass after the timeout before a survivor has its error
DEADLINE = 120.0  # outer bound of one run: startup of 4 interpreters on a small machine included
NEWTON = ["newton", "--dataset", "synthetic", "--timeout", str(TIMEOUT)]

pytestmark = pytest.mark.skipif(os.name != "posix", reason="POSIX signals and env:// launch")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ranks(argvs: list[list[str]], stderr=lambda rank: subprocess.PIPE) -> list[subprocess.Popen]:
    """``python argvs[r]`` for each rank r, joined through the environment (as without torchrun); stdout piped."""
    port = free_port()
    procs = []
    for rank, argv in enumerate(argvs):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
               "WORLD_SIZE": str(len(argvs)), "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
        procs.append(subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                      stderr=stderr(rank), text=True))
    return procs


def finish(proc: subprocess.Popen, deadline: float) -> tuple[int, str, str]:
    """Return code, stdout and stderr of ``proc``, killed (and the test failed) past ``deadline``."""
    try:
        out, err = proc.communicate(timeout=max(deadline - time.monotonic(), 0.1))
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"a rank hung past the outer deadline: {err[-2000:]}")
    return proc.returncode, out or "", err or ""


def kill(proc: subprocess.Popen) -> str:
    """Kill ``proc`` (also a stopped one); what it wrote on stdout."""
    proc.kill()
    return proc.communicate(timeout=30)[0] or ""


@pytest.mark.parametrize("scenario, world_size, reuse", [
    ("optimizer", 2, True),  # a group joined with torch's 30 min default before init_from_env(timeout=3)
    ("curvature", 4, False),
], ids=["optimizer step, 2 ranks, group joined before", "curvature product, 4 ranks"])
def test_a_sleeping_rank_fails_every_other_rank_within_the_timeout(scenario, world_size, reuse):
    sleeper = 1
    argv = ["-m", "tests.distributed.fault_workers", scenario, str(TIMEOUT), str(sleeper)] + (["--reuse"] if reuse else [])
    procs = start_ranks([argv] * world_size)
    deadline = time.monotonic() + DEADLINE
    try:
        survivors = {r: finish(p, deadline) for r, p in enumerate(procs) if r != sleeper}
    finally:
        out_of_sleeper = kill(procs[sleeper])
    faults = [json.loads(line)["fault"] for line in out_of_sleeper.splitlines() if '"fault"' in line]
    assert faults, f"the sleeper did not reach its fault: {out_of_sleeper}"
    for rank, (code, out, err) in survivors.items():
        reports = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        assert code == 1 and reports and "error" in reports[-1], (rank, code, out, err[-2000:])
        assert reports[-1]["error"].startswith(f"rank {rank} of {world_size}: collective "), reports[-1]
        waited = reports[-1]["at"] - faults[0]
        assert TIMEOUT - 1 < waited < TIMEOUT + SLACK, (rank, waited, reports[-1])


def test_a_stopped_rank_fails_secondorder_newton_on_the_other_rank_within_the_timeout(tmp_path):
    logs = [(tmp_path / f"rank{r}.log").open("w") for r in range(2)]
    argv = ["-m", "secondorder.cli", *NEWTON, "--iterations", "1000000", "--out", str(tmp_path / "out")]
    procs = start_ranks([argv] * 2, stderr=lambda rank: logs[rank])
    deadline = time.monotonic() + DEADLINE
    try:
        wait_for_line(procs[0], tmp_path / "rank0.log", "iteration 2/", deadline)
        os.kill(procs[1].pid, signal.SIGSTOP)
        stopped = time.monotonic()
        code, _, _ = finish(procs[0], deadline)
        waited = time.monotonic() - stopped
    finally:
        kill(procs[1])
        for log in logs:
            log.close()
    err = (tmp_path / "rank0.log").read_text().strip().splitlines()
    assert code == 1 and err[-1].startswith("secondorder: error: rank 0 of 2: collective '"), (code, err[-5:])
    assert "3 s timeout" in err[-1] and TIMEOUT - 1 < waited < TIMEOUT + SLACK, (waited, err[-1])


def wait_for_line(proc: subprocess.Popen, log: Path, text: str, deadline: float) -> None:
    """Wait until ``text`` appears in ``log`` (the process's stderr), failing if it exits or the deadline passes."""
    while text not in log.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"the run ended or hung before '{text}': {log.read_text()[-2000:]}")
        time.sleep(0.1)


@pytest.mark.parametrize("options, fact, values", [
    (["--iterations 2", "--iterations 3"], "iterations", "rank 0: 2, rank 1: 3"),
    (["--line-search", "--no-line-search"], "line search", "rank 0: True, rank 1: False"),
], ids=["--iterations", "--line-search"])
def test_ranks_given_different_newton_options_all_fail_with_one_clear_line(tmp_path, options, fact, values):
    procs = start_ranks([["-m", "secondorder.cli", *NEWTON, *option.split(), "--quiet", "--out", str(tmp_path / "out")]
                         for option in options])
    deadline = time.monotonic() + DEADLINE
    for rank, proc in enumerate(procs):
        code, _, err = finish(proc, deadline)
        assert code == 1, (rank, code, err[-2000:])  # not -6: no mismatched collective aborted the process
        assert err.strip() == f"secondorder: error: the ranks disagree on {fact}: {values}; every rank must run " \
            "the same problem, configuration and options (the same command line)", (rank, err[-2000:])
    assert not (tmp_path / "out").exists()
