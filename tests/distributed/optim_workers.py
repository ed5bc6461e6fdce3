"""The data-parallel optimizer runs, as module-level functions (spawned processes import them),
and the single-process runs they are compared with (``train`` without torch.distributed)."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import secondorder.distributed.buckets as dist_buckets
from secondorder.distributed import current_world
from secondorder.optim import AdaHessian, SophiaG, SophiaH

from .workers import error_messages

N = 16  # the global batch: equal shards for 2 and 4 ranks, and two micro-batches per shard
STEPS = 20
DTYPES = {"float64": torch.float64, "float32": torch.float32}
OPTIMIZERS = {"AdaHessian": AdaHessian, "SophiaH": SophiaH, "SophiaG": SophiaG}
CONFIGS = [
    ("AdaHessian", dict(lr=0.05, seed=1)),
    ("AdaHessian", dict(lr=0.05, curvature_every=3, estimator="diagonal", num_probes=2, hessian_power=0.5,
                        weight_decay=0.01, seed=2)),
    ("SophiaH", dict(lr=0.02, rho=5.0, curvature_every=3, seed=3)),  # rho: about half the ratios clipped, so the
    ("SophiaG", dict(lr=0.02, rho=5.0, curvature_every=2, seed=4)),  # curvature matters
]
# Every config in float64; in float32 those whose denominators stay away from zero. The signed
# "diagonal" estimate puts some v near 0, where v ** (k / 2) = v ** 0.25 has an unbounded slope:
# float32 rounding is amplified a hundredfold (one process on two micro-batches already differs
# from the full batch by 8e-6), so that config is compared in float64 only.
RUNS = [("float64", i) for i in range(len(CONFIGS))] + [("float32", i) for i in (0, 2, 3)]
DDP_OPTIONS = [dict(), dict(find_unused_parameters=True), dict(static_graph=True)]
BRANCHY = [False, True, False]  # the find_unused_parameters run has parameters some ranks do not use


class Branchy(nn.Module):
    """``net`` plus ``extra``, used only by rows with a positive first feature (the first half of
    the batch: not by the last ranks' shards), and ``never``, used by no row."""

    def __init__(self, net: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.net = net
        self.extra = nn.Parameter(torch.full((3,), 0.5, dtype=dtype))
        self.never = nn.Parameter(torch.zeros(2, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        used = x[:, :1] > 0
        if used.any():
            out = out + used * x[:, :1] * self.extra
        return out


def model(dtype: torch.dtype, hidden: int = 6, bn: bool = False) -> nn.Module:
    """The same tiny MLP in every process (seeded without touching the global RNG)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        layers = [nn.Linear(5, hidden)] + ([nn.BatchNorm1d(hidden)] if bn else []) + [nn.Tanh(), nn.Linear(hidden, 3)]
        net = nn.Sequential(*layers).to(dtype)
    if bn:  # eval mode with non-trivial running statistics
        net.eval()
        with torch.no_grad():
            net[1].running_mean.uniform_(-0.5, 0.5, generator=torch.Generator().manual_seed(1))
            net[1].running_var.uniform_(0.5, 2.0, generator=torch.Generator().manual_seed(2))
    return net


def batch(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    X = torch.randn(N, 5, generator=g, dtype=dtype)
    X[:, 0] = X[:, 0].abs() * torch.tensor([1.0, -1.0], dtype=dtype).repeat_interleave(N // 2)  # see Branchy
    return X, torch.randint(0, 3, (N,), generator=g)


def closure(name: str, net: nn.Module, X: torch.Tensor, y: torch.Tensor):
    def loss():
        logits = net(X)
        value = F.cross_entropy(logits, y)
        return (value, logits) if name == "SophiaG" else value
    return loss


def train(name: str, options: dict, dtype: torch.dtype, shards: list[torch.Tensor], *, hidden: int = 6,
          ddp: dict | None = None, bn: bool = False, branchy: bool = False, perturb_rank: int | None = None,
          distributed: bool | str = "auto") -> dict:
    """``STEPS`` steps on rows ``shards`` of the batch (one closure per micro-batch); the final
    parameters, the losses and the optimizer's state."""
    X, y = batch(dtype)
    net = model(dtype, hidden, bn)
    if branchy:
        net = Branchy(net, dtype)
    if ddp is not None:
        net = DistributedDataParallel(net, **ddp)
    opt = OPTIMIZERS[name](net.parameters(), distributed=distributed, **options)
    losses = []
    for step in range(1, STEPS + 1):
        if step == 5 and perturb_rank == current_world().rank:  # DDP broadcasts rank 0's buffers anyway
            next(m for m in net.modules() if isinstance(m, nn.BatchNorm1d)).running_mean.add_(1.0)
        losses.append(float(opt.step([closure(name, net, X[rows], y[rows]) for rows in shards])))
    return {"params": [p.detach().clone() for p in net.parameters()], "losses": losses, "state": opt.state_dict()}


def rank_shards(size: int, rank: int, micro: int = 1) -> list[torch.Tensor]:
    """This rank's contiguous equal shard of the batch, split into ``micro`` micro-batches."""
    return list(torch.arange(N).reshape(size, micro, -1)[rank])


def micro_major(size: int, micro: int) -> torch.Tensor:
    """The rows in the order one process sees the concatenated data of ``size`` ranks that each
    pass ``micro`` micro-batches: micro-batch 1 of every rank, then micro-batch 2, ..."""
    return torch.arange(N).reshape(size, micro, -1).transpose(0, 1).reshape(-1)


@contextlib.contextmanager
def counting_all_reduces(counter: list[int]):
    """Count the all-reduces the optimizer step makes (through the helper module's reference)."""
    original = dist_buckets.all_reduce

    def counted(*args, **kwargs):
        counter[0] += 1
        return original(*args, **kwargs)

    dist_buckets.all_reduce = counted
    try:
        yield
    finally:
        dist_buckets.all_reduce = original


def bucket_tensors(rank: int) -> list[torch.Tensor]:
    """Mixed shapes and dtypes: with 64-byte buckets, float64 goes in 3 buckets, float32 in 1."""
    g = torch.Generator().manual_seed(rank)
    shapes = [((3, 4), torch.float64), ((5,), torch.float32), ((2, 2, 2), torch.float64), ((), torch.float64),
              ((7,), torch.float64)]
    return [torch.randn(shape, generator=g, dtype=dtype) for shape, dtype in shapes]


def equivalence(runs: list[tuple[str, int]], extras: bool) -> dict:
    """The ``(dtype, config index)`` runs on this rank's shard; with ``extras`` also gradient
    accumulation, DDP-wrapped models, :func:`overflow_on_one_rank`, and bucketed sums of
    :func:`bucket_tensors`; the number of all-reduces of each."""
    world = current_world()
    out: dict = {"plain": {}, "accumulated": {}, "ddp": [], "all_reduces": []}
    for dtype, i in runs:
        name, options = CONFIGS[i]
        counter = [0]
        with counting_all_reduces(counter):
            out["plain"][dtype, i] = train(name, options, DTYPES[dtype], rank_shards(world.size, world.rank))
        out["all_reduces"].append(counter[0])
    if extras:
        for i, (name, options) in enumerate(CONFIGS):
            out["accumulated"][i] = train(name, options, torch.float64, rank_shards(world.size, world.rank, 2))
        for i, (ddp, branchy) in enumerate(zip(DDP_OPTIONS, BRANCHY)):
            name, options = CONFIGS[i % 2 * 3]  # AdaHessian and SophiaG
            out["ddp"].append(train(name, options, torch.float64, rank_shards(world.size, world.rank), ddp=ddp,
                                    bn=True, branchy=branchy, perturb_rank=1))
        out["overflow"] = overflow_on_one_rank()
        counter = [0]
        with counting_all_reduces(counter):
            out["buckets"] = dist_buckets.sum_over_ranks(bucket_tensors(world.rank), what="buckets", bucket_bytes=64)
        out["all_reduces"].append(counter[0])
    return out


def overflow_on_one_rank() -> dict:
    """AdaHessian with a GradScaler (float32, scale 1024) where only rank 1's scaled loss
    overflows, at step 3 of 5."""
    world = current_world()
    X, y = batch(torch.float32)
    rows = rank_shards(world.size, world.rank)[0]
    net = model(torch.float32)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    opt = AdaHessian(net.parameters(), lr=0.05, grad_scaler=scaler)
    for step in range(1, 6):
        factor = 1e38 if world.rank == 1 and step == 3 else 1.0  # times 1024: inf
        opt.step(lambda: F.cross_entropy(net(X[rows]), y[rows]) * factor)
    return {"num_steps": opt.num_steps, "scale": scaler.get_scale(), "state": opt.state_dict(),
            "params": [p.detach().clone() for p in net.parameters()]}


def bad_inputs() -> dict:
    """Each bad input's error on this rank (all raise at the handshake or at the step's all-reduce,
    which leaves the group usable for the next case), and a run with ``distributed=False``."""
    rank = current_world().rank
    X, y = batch(torch.float64)

    def step(name="AdaHessian", hidden=6, closures=1, **options):
        net = model(torch.float64, hidden)
        opt = OPTIMIZERS[name](net.parameters(), **options)
        opt.step([closure(name, net, X, y)] * closures)

    cases = [
        lambda: step(hidden=6 + rank),
        lambda: step(seed=rank),
        lambda: step(lr=0.1 * (1 + rank)),
        lambda: step(num_probes=1 + rank),
        lambda: step(closures=1 + rank),
        lambda: step("SophiaG", closures=1 + rank),
    ]
    messages = error_messages(cases)
    local = train("SophiaH", CONFIGS[2][1], torch.float64, rank_shards(2, rank), distributed=False)
    return {"messages": messages, "local": local}


def fails_at_step_3() -> None:
    """Rank 1's closure raises at step 3; rank 0 is then waiting in the step's all-reduce."""
    X, y = batch(torch.float64)
    net = model(torch.float64)
    opt = AdaHessian(net.parameters())
    rank = current_world().rank
    for step in range(1, 6):
        def loss():
            if rank == 1 and step == 3:
                raise RuntimeError("the data loader of rank 1 broke at step 3")
            return F.cross_entropy(net(X), y)
        opt.step(loss)
