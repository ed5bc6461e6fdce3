"""One rank of a fault-injection run, started the way a plain launcher does it (``MASTER_ADDR``,
``MASTER_PORT``, ``RANK``, ``WORLD_SIZE`` in the environment, no torchrun):

    python -m tests.distributed.fault_workers SCENARIO TIMEOUT SLEEPER [--reuse]

``SCENARIO`` is ``optimizer`` (AdaHessian steps) or ``curvature`` (Hessian-vector products). At
the third step (product), rank ``SLEEPER`` sleeps three timeouts. Each rank prints JSON lines on
stdout: ``{"rank", "fault": t}`` when the sleep starts, then ``{"rank", "error", "at": t}`` (its
error's first line; wall-clock times) or ``{"rank", "done": t}``. With ``--reuse`` the group is
joined by ``torch.distributed.init_process_group`` with torch's default timeout first, and
``init_from_env`` only reuses it.
"""

from __future__ import annotations

import json
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from secondorder import HessianOperator
from secondorder.distributed import DistributedError, init_from_env, shutdown
from secondorder.optim import AdaHessian

FAULT_AT = 2


def report(**fields) -> None:
    print(json.dumps(fields), flush=True)


def tiny_problem():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double()
        x, y = torch.randn(8, 5, dtype=torch.float64), torch.randint(0, 3, (8,))
    return net, x, y


def sleeper(rank: int, who: int, seconds: float):
    """A function to call at every step: at step FAULT_AT, rank ``who`` sleeps ``seconds``."""
    calls = [0]

    def maybe_sleep() -> None:
        calls[0] += 1
        if calls[0] == FAULT_AT + 1 and rank == who:
            report(rank=rank, fault=time.time())
            time.sleep(seconds)

    return maybe_sleep


def optimizer_steps(rank: int, maybe_sleep) -> None:
    net, x, y = tiny_problem()
    opt = AdaHessian(net.parameters(), lr=0.01, seed=0)

    def closure():
        maybe_sleep()
        return F.cross_entropy(net(x), y)

    for _ in range(FAULT_AT + 3):
        opt.step(closure)


def curvature_products(rank: int, maybe_sleep) -> None:
    net, x, y = tiny_problem()

    def loss(out, target):
        return F.cross_entropy(out, target)

    op = HessianOperator(net, loss, [(x, y)], distributed=True)
    v = torch.ones(op.shape[0], dtype=torch.float64)
    for _ in range(FAULT_AT + 3):
        maybe_sleep()
        op @ v


SCENARIOS = {"optimizer": optimizer_steps, "curvature": curvature_products}


def main(argv: list[str]) -> int:
    scenario, timeout, who = argv[0], float(argv[1]), int(argv[2])
    if "--reuse" in argv:
        dist.init_process_group("gloo")  # torch's default timeout (30 min); init_from_env only reuses it
    world = init_from_env("gloo", timeout=timeout)
    finished = False
    try:
        SCENARIOS[scenario](world.rank, sleeper(world.rank, who, 3 * timeout))
        finished = True
    except DistributedError as err:
        report(rank=world.rank, error=str(err).splitlines()[0], at=time.time())
        return 1
    finally:
        shutdown(wait=finished)
    report(rank=world.rank, done=time.time())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
