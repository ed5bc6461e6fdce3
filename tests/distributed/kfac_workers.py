"""The data-parallel KFAC runs, as module-level functions (spawned processes import them), and
the single-process runs they are compared with (``train`` without torch.distributed, on the
concatenated batch)."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

import secondorder.operators.kfac as operators_kfac
import secondorder.optim.kfac as optim_kfac
from secondorder.distributed import current_world
from secondorder.optim import KFAC

from .newton_type_workers import SHARDS, shard_rows
from .optim_workers import N, counting_all_reduces
from .workers import error_messages

STEPS = 6
# Factor steps (every factor_every from step 1) and inverse steps (every inverse_every) fall on
# different steps; kl_clip 1e-3 scales some steps down (tested), momentum and weight decay act on
# the preconditioned layers and on the excluded ``scale``.
COMMON = dict(lr=0.2, damping=1e-2, momentum=0.9, weight_decay=1e-2, kl_clip=1e-3, factor_decay=0.8)
CONFIGS = [
    dict(fisher="mc", factor_every=1, inverse_every=2, seed=3),
    dict(fisher="empirical", factor_every=2, inverse_every=3, seed=4),
    dict(fisher="ggn", factor_every=1, inverse_every=3, seed=5),
]
PLACEMENTS = ("replicated", "spread")
RUNS = [(i, placement) for i in range(len(CONFIGS)) for placement in PLACEMENTS]
LAYERS = ["conv", "hidden", "out"]


class Net(nn.Module):
    """A Conv2d (stride 2: 9 positions) and two Linear layers, which K-FAC preconditions, and a
    per-class ``scale`` of the outputs it does not (excluded with ``params=``: plain momentum)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, stride=2, padding=1)  # [n, 2, 5, 5] -> [n, 3, 3, 3]
        self.hidden = nn.Linear(27, 6)
        self.out = nn.Linear(6, 3)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.conv(x)).flatten(1)
        return self.out(torch.tanh(self.hidden(h))) * self.scale


def model() -> Net:
    """The same float64 network in every process (seeded without touching the global RNG)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return Net().double()


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    return torch.randn(N, 2, 5, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (N,), generator=g)


def optimizer(net: Net, config: int, placement: str, **options) -> KFAC:
    """KFAC of config ``config`` (``options`` override it) on every layer of ``net`` but ``scale``."""
    return KFAC(net, **{"params": lambda name, p: name != "scale", "inverse_placement": placement, **COMMON,
                        **CONFIGS[config], **options})


def closure(net: Net, X: torch.Tensor, y: torch.Tensor):
    def loss():
        logits = net(X)
        return F.cross_entropy(logits, y), logits
    return loss


@contextlib.contextmanager
def recording_inversions(names: list[str]):
    """Append the name of every layer :func:`~secondorder.operators.kfac.damped_inverse` inverts to
    ``names`` (what ``KFACOperator.inverse`` and the spread inversions call, per layer)."""
    original = operators_kfac.damped_inverse

    def recorded(f, damping):
        names.append(f.name)
        return original(f, damping)

    modules = (operators_kfac, optim_kfac)
    for module in modules:
        module.damped_inverse = recorded  # type: ignore[attr-defined]
    try:
        yield
    finally:
        for module in modules:
            module.damped_inverse = original  # type: ignore[attr-defined]


def train(config: int, placement: str, rows: torch.Tensor, **options) -> dict:
    """``STEPS`` steps on rows ``rows`` of the batch: the final parameters, the losses, the
    optimizer's state, its plain parameters and the layers this process inverted."""
    X, y = batch()
    net = model()
    opt = optimizer(net, config, placement, **options)
    losses: list[float] = []
    inverted: list[str] = []
    with recording_inversions(inverted):
        for _ in range(STEPS):
            losses.append(float(opt.step(closure(net, X[rows], y[rows]))))
    return {"params": [p.detach().clone() for p in net.parameters()], "losses": losses, "state": opt.state_dict(),
            "plain": opt.plain_parameters, "inverted": inverted}


def equivalence() -> dict:
    """Every run of :data:`RUNS` on this rank's (unequal) shard, and the all-reduces each made."""
    world = current_world()
    rows = shard_rows(world.size, world.rank)
    assert len(rows) == SHARDS[world.size][world.rank]
    out: dict = {"runs": {}, "all_reduces": {}}
    for run in RUNS:
        counter = [0]
        with counting_all_reduces(counter):
            out["runs"][run] = train(*run, rows)
        out["all_reduces"][run] = counter[0]
    return out


def bad_inputs() -> dict:
    """Each disagreement's error on this rank (all raise at the handshake, which every rank
    reaches, so the group stays usable for the next case), whether the refused step left the
    parameters and the optimizer's counters and generator as they were, and a final agreeing step."""
    rank = current_world().rank
    X, y = batch()
    rows = shard_rows(2, rank)
    untouched = []

    def step(config=0, placement="replicated", before=None, **options):
        net = model()
        opt = optimizer(net, config, placement, **options)
        if before is not None:
            before(opt, net)
        start = [p.detach().clone() for p in net.parameters()]
        counters, generator = opt.num_steps, opt.generator.get_state()
        try:
            opt.step(closure(net, X[rows], y[rows]))
        finally:
            untouched.append(all(torch.equal(p, q) for p, q in zip(net.parameters(), start))
                             and opt.num_steps == counters and torch.equal(opt.generator.get_state(), generator))

    def advance(opt, net):  # rank 1 draws from the optimizer's generator: same seed, other state
        if rank == 1:
            torch.rand(1, generator=opt.generator)

    def local_step(opt, net):  # rank 1 steps alone first (distributed=False for that step)
        if rank == 1:
            opt.distributed = False
            opt.step(closure(net, X[rows], y[rows]))
            opt.distributed = "auto"

    cases = [
        lambda: step(factor_every=1 + rank),
        lambda: step(inverse_every=2 + rank),
        lambda: step(placement=("replicated", "spread")[rank]),
        lambda: step(fisher=("mc", "ggn")[rank]),
        lambda: step(seed=rank),
        lambda: step(damping=1e-2 * (1 + rank)),
        lambda: step(params=lambda name, p: name != "scale" and not (rank and name.startswith("out"))),
        lambda: step(before=advance),
        lambda: step(before=local_step),
        lambda: step(2, "spread"),  # the ranks agree: the group is still usable
    ]
    return {"messages": error_messages(cases), "untouched": untouched}


def two_ranks() -> dict:
    """The 2-rank world's work in one launch: :func:`equivalence`, then :func:`bad_inputs`."""
    return {"equivalence": equivalence(), "bad": bad_inputs()}
