"""MNIST-1D (Greydanus 2020), generated offline, and the small 1-D CNN the analysis default trains.

The ``mnist1d`` package builds the data set procedurally from its ten templates
(``make_dataset(get_dataset_args())``: 4000 train and 1000 test sequences of length 40, fixed
seed), so nothing is downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from secondorder.validation import positive_int

__all__ = ["Mnist1dCNN", "TrainedMnist1d", "load_mnist1d", "train_mnist1d"]


def load_mnist1d() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(x_train [4000, 1, 40], y_train [4000], x_test [1000, 1, 40], y_test [1000])``, float32 / int64.

    Raises a clear error if the ``mnist1d`` package is missing (``pip install mnist1d``).
    """
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as err:  # pragma: no cover - the package is a dependency
        raise ImportError("MNIST-1D needs the mnist1d package: pip install mnist1d") from err
    import numpy as np

    d = make_dataset(get_dataset_args())
    x = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float32).unsqueeze(1)
    y = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.long)
    return x(d["x"]), y(d["y"]), x(d["x_test"]), y(d["y_test"])


class Mnist1dCNN(nn.Module):
    """``Conv1d(1,16,5) - ReLU - Conv1d(16,32,5) - ReLU - global average pool - Linear(32,10)`` (3018 parameters)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv1d(1, 16, 5, padding=2)
        self.conv2 = nn.Conv1d(16, 32, 5, padding=2)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        return self.fc(x.mean(-1))


@dataclass(frozen=True)
class TrainedMnist1d:
    """The trained network (eval mode), its training data, test accuracy and the training recipe."""

    model: Mnist1dCNN
    train: tuple[Tensor, Tensor]
    test: tuple[Tensor, Tensor]
    test_accuracy: float
    train_loss: float
    recipe: str


def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """Fraction of ``x`` classified as ``y`` (no gradient, the model's mode untouched)."""
    with torch.no_grad():
        return float((model(x).argmax(-1) == y).float().mean())


def train_mnist1d(
    seed: int = 0,
    epochs: int = 20,
    batch_size: int = 128,
    lr: float = 0.1,
    data: tuple[Tensor, Tensor, Tensor, Tensor] | None = None,
    callback: Callable[[int, nn.Module], None] | None = None,
    progress: bool = False,
    momentum: float = 0.9,
) -> TrainedMnist1d:
    """Train :class:`Mnist1dCNN` with SGD (heavy-ball ``momentum``, constant ``lr``) on MNIST-1D.

    Initialisation and batch order come from ``seed`` in a forked RNG (the caller's global RNG
    is untouched). ``callback(step, model)`` is called at step 0 and after every epoch (for the
    Hessian's evolution). About 1-2 s for 20 epochs at batch 128 on 2 CPU cores.
    """
    from tqdm import tqdm

    positive_int(epochs, "epochs")
    positive_int(batch_size, "batch_size")
    xtr, ytr, xte, yte = data if data is not None else load_mnist1d()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Mnist1dCNN()
        gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    steps_per_epoch = -(-len(xtr) // batch_size)
    model.train()
    if callback is not None:
        callback(0, model)
    for epoch in tqdm(range(epochs), desc="training", unit="epoch", disable=not progress, leave=False):
        order = torch.randperm(len(xtr), generator=gen)
        for start in range(0, len(xtr), batch_size):
            idx = order[start : start + batch_size]
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(xtr[idx]), ytr[idx]).backward()
            opt.step()
        if callback is not None:
            callback(steps_per_epoch * (epoch + 1), model)
    for p in model.parameters():
        p.grad = None
    model.eval()
    with torch.no_grad():
        train_loss = float(F.cross_entropy(model(xtr), ytr))
    recipe = (f"MNIST-1D ({len(xtr)} train / {len(xte)} test), Mnist1dCNN, SGD momentum {momentum} lr {lr}, "
              f"batch {batch_size}, {epochs} epochs, seed {seed}")
    return TrainedMnist1d(model, (xtr, ytr), (xte, yte), accuracy(model, xte, yte), train_loss, recipe)
