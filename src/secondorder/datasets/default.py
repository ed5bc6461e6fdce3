"""The default problem: a small classifier trained on synthetic data."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from secondorder.datasets.synthetic import batches, gaussian_mixture

__all__ = ["Problem", "default_problem"]

NUM_SAMPLES = 1024
NUM_FEATURES = 16
NUM_CLASSES = 4
HIDDEN = 32
BATCH_SIZE = 256
TRAIN_STEPS = 300
LEARNING_RATE = 1e-2


@dataclass(frozen=True)
class Problem:
    """A model, its loss and the data it is evaluated on.

    Attributes:
        model: the network, in eval mode, parameters requiring gradients.
        loss_fn: the loss, called as ``loss_fn(model(inputs), targets)``
            (mean reduction over a batch).
        data: list of ``(inputs, targets)`` batches.

    """

    model: nn.Module
    loss_fn: nn.Module
    data: list[tuple[Tensor, Tensor]]


def default_problem(seed: int = 0) -> Problem:
    """Build and train the small classification problem used by ``secondorder summary``.

    The network is ``Linear(16, 32) - Tanh - Linear(32, 32) - Tanh -
    Linear(32, 4)``, initialised with ``torch.manual_seed(seed)`` inside
    :func:`torch.random.fork_rng` (the caller's global RNG state is left
    unchanged), then trained full-batch with Adam (lr 1e-2) for 300 steps on
    ``gaussian_mixture(1024, 16, 4, seed)`` under cross-entropy.  The data is
    returned in batches of 256.  Takes well under a second on a CPU.
    """
    inputs, targets = gaussian_mixture(NUM_SAMPLES, NUM_FEATURES, NUM_CLASSES, seed)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = nn.Sequential(
            nn.Linear(NUM_FEATURES, HIDDEN),
            nn.Tanh(),
            nn.Linear(HIDDEN, HIDDEN),
            nn.Tanh(),
            nn.Linear(HIDDEN, NUM_CLASSES),
        )
    loss_fn = nn.CrossEntropyLoss()

    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    model.train()
    with torch.enable_grad():
        for _ in range(TRAIN_STEPS):
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(inputs), targets)
            loss.backward()
            optimizer.step()
    for p in model.parameters():
        p.grad = None
    model.eval()

    return Problem(model=model, loss_fn=loss_fn, data=batches(inputs, targets, BATCH_SIZE))
