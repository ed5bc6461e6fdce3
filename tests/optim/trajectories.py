"""Optimizer trajectories at fixed seeds, recorded before the optimizer core was rebuilt (issue 13).

The recording holds one set of trajectories per machine (CPU model and torch version: the same
code rounds differently on another CPU's vector kernels). ``python -m tests.optim.trajectories``
records this machine's set, keeping the others; only do that on a machine without one, after the
tolerance test against the others passes, or for an intended change of the numbers (then delete
the file first). ``test_trajectories.py`` replays every case: bitwise equal to this machine's set,
and within rounding of every other machine's.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from secondorder.environment import cpu_model
from secondorder.optim import AdaHessian, SophiaG, SophiaH

RECORDING = Path(__file__).parent / "data" / "trajectories.pt"
STEPS = 7

CASES = {
    "adahessian": (AdaHessian, dict(lr=0.05)),
    "adahessian_every3_wd": (AdaHessian, dict(lr=0.05, curvature_every=3, weight_decay=0.01)),
    "adahessian_diagonal_block_power": (AdaHessian, dict(lr=0.05, estimator="diagonal", block_size=2,
                                                         hessian_power=0.5, num_probes=3)),
    "sophia_h": (SophiaH, dict(lr=0.01, rho=1.0, curvature_every=2)),
    "sophia_h_defaults": (SophiaH, dict()),
    "sophia_g": (SophiaG, dict(lr=0.01, rho=1.0, curvature_every=2)),
    "sophia_g_defaults": (SophiaG, dict()),
}
VARIANTS = ("float64", "float32", "float64_3_closures", "float32_scaler")


def _model(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4)).to(dtype)


def _data(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(12, 6, generator=g, dtype=dtype), torch.randint(0, 4, (12,), generator=g)


def _closure(model: nn.Module, X: torch.Tensor, y: torch.Tensor, logits: bool):
    def evaluate():
        out = model(X)
        loss = F.cross_entropy(out, y)
        return (loss, out) if logits else loss

    return evaluate


def run(case: str, variant: str) -> dict[str, list[torch.Tensor]]:
    """Params after every step, the losses, and the final optimizer state tensors."""
    make, kwargs = CASES[case]
    dtype = torch.float32 if variant.startswith("float32") else torch.float64
    model = _model(dtype)
    X, y = _data(dtype)
    extra = {"grad_scaler": torch.amp.GradScaler("cpu", init_scale=256.0, growth_interval=3)} \
        if variant.endswith("scaler") else {}
    opt = make(model.parameters(), seed=5, **kwargs, **extra)
    logits = make is SophiaG
    parts = [slice(0, 4), slice(4, 8), slice(8, 12)] if variant.endswith("closures") else [slice(0, 12)]
    closures = [_closure(model, X[s], y[s], logits) for s in parts]
    params, losses = [], []
    for _ in range(STEPS):
        losses.append(opt.step(closures if len(closures) > 1 else closures[0]).detach().clone())
        params.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone())
    state = [t.clone() for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    return {"params": params, "losses": losses, "state": state}


def machine() -> str:
    """The key of this machine's recording: CPU model and torch version."""
    return f"{cpu_model()} | torch {torch.__version__}"


def recordings() -> dict[str, dict]:
    """``{machine: {(case, variant): trajectory}}``; empty when nothing is recorded."""
    return torch.load(RECORDING) if RECORDING.exists() else {}


def record() -> None:
    RECORDING.parent.mkdir(exist_ok=True)
    torch.save({**recordings(), machine(): {(c, v): run(c, v) for c in CASES for v in VARIANTS}}, RECORDING)


if __name__ == "__main__":
    record()
