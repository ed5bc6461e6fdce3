r"""The process group every data-parallel piece of secondorder runs on: joining it, collectives
that fail with a clear error instead of hanging, and a launcher for local multi-process runs.

Everything is plain ``torch.distributed``. Under ``torchrun`` call :func:`init_from_env` once per
process (gloo on CPU, nccl when the process owns a GPU); tests and notebooks can use
:func:`launch`, which starts ``world_size`` local processes joined through a file store.

Failure model: every collective runs under the group's timeout. A rank that dies closes its
connections and the others fail at once; a rank that hangs (sleeps, is stopped) makes the others
fail when the timeout expires. Either way they raise :class:`DistributedError` naming the
collective, the rank and the timeout, instead of waiting forever. The bound does not depend on how
the group was made: every collective here is waited for with the timeout (on gloo; nccl's own
watchdog bounds its collectives), an already initialized group is given the timeout, and the
handshake (:func:`agree`) travels in all-reduces rather than ``all_gather_object``. After a failed
collective the group is unusable: later collectives on that rank fail at once instead of pairing
with another rank's stale one, and :func:`shutdown` skips its barrier.
"""

from __future__ import annotations

import atexit
import datetime
import os
import pickle
import queue
import tempfile
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from secondorder.validation import positive_int

__all__ = [
    "DisagreementError", "DistributedError", "World", "agree", "all_gather_objects", "all_reduce", "current_world",
    "init_from_env", "launch", "shutdown",
]

DEFAULT_TIMEOUT = 60.0
_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


class DistributedError(RuntimeError):
    """A collective failed (another rank died, hung past the timeout, or called a different collective)."""


class DisagreementError(DistributedError, ValueError):
    """The ranks passed different facts to a handshake (:func:`agree`): raised on every rank alike.

    A ``ValueError`` (bad input, the same on every rank) and a :class:`DistributedError` (what the
    command line reports in one line).
    """


@dataclass(frozen=True)
class World:
    """This process's ``rank`` in a group of ``size`` processes on ``backend`` ("none" when
    torch.distributed is not initialized: a world of one), and the group's ``timeout`` in seconds.
    """

    rank: int
    size: int
    backend: str
    timeout: float

    @property
    def distributed(self) -> bool:
        return self.backend != "none"


_TIMEOUT = {"seconds": DEFAULT_TIMEOUT}
_BROKEN: dict[str, str] = {}
"""``{"what": name}`` of the first collective that failed on this rank since the group was joined."""
_EXIT_HOOK = {"registered": False}
_PENDING: list[Any] = []
"""The work of a collective whose wait ran out: it still runs on the backend's thread."""


def current_world() -> World:
    """The world this process is in (a world of one when torch.distributed is not initialized)."""
    if not (dist.is_available() and dist.is_initialized()):
        return World(0, 1, "none", _TIMEOUT["seconds"])
    return World(dist.get_rank(), dist.get_world_size(), str(dist.get_backend()), _TIMEOUT["seconds"])


def _check_timeout(timeout: float) -> float:
    timeout = float(timeout)
    if not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout}")
    return timeout


def init_from_env(backend: str | None = None, timeout: float = DEFAULT_TIMEOUT) -> World:
    """Join the process group ``torchrun`` describes (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``,
    ``MASTER_PORT``); reuse it when it is already initialized.

    ``backend`` defaults to nccl when CUDA is available and gloo otherwise. ``timeout`` (seconds)
    bounds every collective: a rank that dies or hangs makes the others raise
    :class:`DistributedError` after at most this long.
    """
    timeout = _check_timeout(timeout)
    if not dist.is_available():
        raise RuntimeError("this torch build has no torch.distributed support")
    if not dist.is_initialized():
        missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise RuntimeError(
                f"environment variables {', '.join(missing)} are not set; start the script with "
                "torchrun (e.g. 'torchrun --nproc-per-node 4 script.py') or use secondorder.distributed.launch"
            )
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
    else:
        _bound_existing_group(timeout)
    _joined(timeout)
    return current_world()


def _joined(timeout: float) -> None:
    """Record the group's timeout (a freshly joined group has no failed collective), and leave the
    group at the interpreter's exit if the script does not: a gloo group left to the exit can abort
    the process (SIGABRT) after its error was printed.
    """
    _TIMEOUT["seconds"] = timeout
    _BROKEN.clear()
    if not _EXIT_HOOK["registered"]:
        atexit.register(_leave_at_exit)
        _EXIT_HOOK["registered"] = True


def _leave_at_exit() -> None:
    """:func:`shutdown` without the barrier, if the group is still joined when the interpreter exits."""
    try:
        shutdown(wait=False)
    except Exception:  # noqa: BLE001 - nothing left to report to at exit
        pass


def _bound_existing_group(timeout: float) -> None:
    """Give a group that someone else initialized (with its own, maybe much longer, timeout) ours,
    so that its collectives, and the interpreter's exit after one failed, are bounded by it too.
    """
    set_timeout = getattr(dist.distributed_c10d, "_set_pg_timeout", None)
    if set_timeout is None:  # an older torch: the explicit waits of _collective still bound ours
        return
    try:
        set_timeout(datetime.timedelta(seconds=timeout))
    except (RuntimeError, ValueError):  # a backend without a settable timeout: likewise
        pass


def _reason(err: BaseException, timeout: float) -> str:
    """The first line of a collective's error (a wait that ran out says so with the timeout)."""
    text = str(err).strip()
    if isinstance(err, TimeoutError) or text == "Operation timed out!":
        return f"no answer within the {timeout:g} s timeout"
    return text.splitlines()[0] if text else type(err).__name__


def _fail(what: str, err: BaseException) -> DistributedError:
    world = current_world()
    return DistributedError(
        f"rank {world.rank} of {world.size}: collective '{what}' failed ({_reason(err, world.timeout)}). Another "
        f"rank died, hung for more than the {world.timeout:g} s timeout, or called a different "
        "collective; check the other ranks' errors"
    )


def _refuse_after_failure(what: str) -> None:
    """``DistributedError`` if a collective failed on this rank before: the group is unusable (the
    failed collective may still be pending, and another rank's late one would pair with this one).
    """
    if _BROKEN:
        world = current_world()
        raise DistributedError(
            f"rank {world.rank} of {world.size}: collective '{what}' not started: collective "
            f"'{_BROKEN['what']}' failed before and the process group is unusable; check the other ranks' errors"
        )


def _collective(what: str, issue: Callable[[bool], Any]) -> None:
    """Run one collective, ``issue(async_op)``, bounded by the group's timeout.

    On gloo (and any backend but nccl) the work is waited for with the timeout explicitly, whatever
    timeout the group itself was made with; nccl collectives stay asynchronous on their stream,
    bounded by nccl's watchdog. A failure marks the group broken and raises :class:`DistributedError`.
    """
    _refuse_after_failure(what)
    world = current_world()
    work = None
    try:
        if world.backend == "nccl":
            issue(False)
            return
        work = issue(True)
        if work.wait(timeout=datetime.timedelta(seconds=world.timeout)) is False:
            raise TimeoutError(f"no answer within {world.timeout:g} s")
    except (RuntimeError, TimeoutError) as err:
        _BROKEN.setdefault("what", what)
        if work is not None and not work.is_completed():
            _PENDING.append(work)
        raise _fail(what, err) from err


def all_reduce(tensor: Tensor, op: str = "sum", *, what: str) -> Tensor:
    """In-place ``all_reduce`` of ``tensor`` with ``op`` ("sum", "max", "min"); returns it.

    ``what`` names the collective in the error raised when it fails or when the timeout runs out.
    In a world of one it is the identity.
    """
    if op not in _OPS:
        raise ValueError(f"op must be one of {sorted(_OPS)}, got {op!r}")
    if current_world().distributed:
        _collective(what, lambda async_op: dist.all_reduce(tensor, op=_OPS[op], async_op=async_op))
    return tensor


def _object_device() -> torch.device:
    """Where the handshake's bytes travel: the current GPU on nccl, the CPU otherwise."""
    if current_world().backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_objects(obj: Any, *, what: str) -> list[Any]:
    """Every rank's picklable ``obj``, in rank order (``[obj]`` in a world of one).

    Two all-reduces under the timeout (unlike ``all_gather_object``, whose waits know only the
    group's own): of the pickles' lengths, then of a ``world size x longest`` byte table in which
    each rank fills its row. Both have the same shape on every rank, whatever the objects.
    """
    world = current_world()
    if not world.distributed:
        return [obj]
    data = pickle.dumps(obj)
    device = _object_device()
    lengths = torch.zeros(world.size, dtype=torch.int64, device=device)
    lengths[world.rank] = len(data)
    sizes = all_reduce(lengths, what=what).tolist()
    table = torch.zeros(world.size, max(sizes), dtype=torch.uint8, device=device)
    table[world.rank, : len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device)
    rows = all_reduce(table, what=what).cpu()
    return [pickle.loads(rows[r, :n].numpy().tobytes()) for r, n in enumerate(sizes)]


def shutdown(*, wait: bool = True) -> None:
    """Leave the process group (a no-op when not initialized). With ``wait``, first wait at a
    barrier for the other ranks, so that none tears its connections down while another still
    reads from them. Call it at the end of a ``torchrun`` script: a gloo group left to the
    interpreter's exit can abort the process.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        if wait and not _BROKEN:  # after a failed collective there is no barrier to meet
            all_reduce(torch.zeros(1), what="shutdown barrier")
    finally:
        _settle_pending()
        dist.destroy_process_group()
        _BROKEN.clear()


def _settle_pending() -> None:
    """Wait (once more, bounded by the timeout) for the collectives whose wait ran out: a group
    destroyed while one still runs on gloo's thread aborts the interpreter at exit (SIGABRT).
    """
    while _PENDING:
        try:
            _PENDING.pop().wait(timeout=datetime.timedelta(seconds=_TIMEOUT["seconds"]))
        except RuntimeError:  # it failed, as expected: what matters is that it is over
            pass


def agree(facts: dict[str, Any], *, what: str, advice: str) -> None:
    """Raise :class:`DisagreementError` (a ``ValueError``) on every rank, naming the first fact the
    ranks disagree on and each rank's value, unless all ranks passed equal ``facts``
    (:func:`all_gather_objects`, under the timeout).
    """
    everyone = all_gather_objects(facts, what=what)
    keys = list(dict.fromkeys(key for f in everyone for key in f))  # the same order on every rank
    for key in keys:
        values = [f.get(key) for f in everyone]
        if any(v != values[0] for v in values):
            raise DisagreementError(
                f"the ranks disagree on {key}: " + ", ".join(f"rank {r}: {v}" for r, v in enumerate(values))
                + f"; {advice}"
            )


# --------------------------------------------------------------------------- local launcher


def _worker(rank: int, world_size: int, store: str, timeout: float, fn, args, results) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo", init_method=f"file://{store}", rank=rank, world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout),
        )
        _joined(timeout)
        finished = False
        try:
            value = fn(*args)
            finished = True
        finally:
            shutdown(wait=finished)
        results.put((rank, True, pickle.dumps(value)))
    except BaseException as err:  # noqa: BLE001 - reported to the parent with its traceback
        results.put((rank, False, f"{type(err).__name__}: {err}\n{traceback.format_exc()}"))


def launch(
    fn: Callable[..., Any],
    world_size: int,
    args: Sequence[Any] = (),
    *,
    timeout: float = DEFAULT_TIMEOUT,
) -> list[Any]:
    """Run ``fn(*args)`` on ``world_size`` local gloo processes and return their results by rank.

    ``fn`` must be importable (a module-level function) and its result picklable; inside it,
    torch.distributed is initialized and :func:`current_world` gives the rank. The processes are
    spawned, so a script calling this must do so under ``if __name__ == "__main__":``. Each process uses
    one thread. If a rank raises, the others' collectives fail within ``timeout`` and this raises
    :class:`DistributedError` with the first failing rank's error and traceback and the others'
    first lines. A rank still running ``timeout + 2`` s after another failed (hung), or
    ``2 * timeout + 30`` s after the start, is killed.
    """
    world_size = positive_int(world_size, "world_size")
    timeout = _check_timeout(timeout)
    ctx = torch.multiprocessing.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="secondorder-store-") as tmp:
        store = os.path.join(tmp, "store")
        procs = [
            ctx.Process(target=_worker, args=(r, world_size, store, timeout, fn, tuple(args), results),
                        daemon=True)
            for r in range(int(world_size))
        ]
        for p in procs:
            p.start()
        reports = _collect(procs, results, deadline=time.monotonic() + 2 * timeout + 30,
                           grace=timeout + 2)
    failures = sorted((r, msg) for r, (ok, msg) in reports.items() if not ok)
    if failures:
        # the rank whose error is not a consequence of another's (a collective failure) goes first
        failures.sort(key=lambda f: ("DistributedError" in f[1].splitlines()[0], f[0]))
        rank, msg = failures[0]
        others = "".join(f"\nrank {r}: {m.strip().splitlines()[0]}" for r, m in failures[1:])
        raise DistributedError(f"rank {rank} of {world_size} failed: {msg.strip()}{others}")
    return [pickle.loads(reports[r][1]) for r in range(int(world_size))]


def _collect(procs, results, deadline: float, grace: float) -> dict[int, tuple[bool, Any]]:
    reports: dict[int, tuple[bool, Any]] = {}
    while len(reports) < len(procs):
        try:
            rank, ok, payload = results.get(timeout=0.2)
            reports[rank] = (ok, payload)
            if not ok:
                deadline = min(deadline, time.monotonic() + grace)
            continue
        except queue.Empty:
            pass
        for r, p in enumerate(procs):
            if r not in reports and p.exitcode is not None and results.empty():
                time.sleep(0.2)  # let a report sent just before exit arrive
                if results.empty():
                    reports[r] = (False, f"the process exited with code {p.exitcode} without a result")
                    deadline = min(deadline, time.monotonic() + grace)
        if time.monotonic() > deadline:
            for r, p in enumerate(procs):
                if r not in reports:
                    p.kill()
                    reports[r] = (False, "hung: killed while still running after the others had stopped")
    for p in procs:
        p.join(timeout=5)
        if p.is_alive():
            p.kill()
    return reports
