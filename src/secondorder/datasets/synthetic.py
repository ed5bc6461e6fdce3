"""Synthetic classification data, generated offline and reproducibly."""

from __future__ import annotations

import torch
from torch import Tensor

from secondorder.validation import positive_int

__all__ = ["gaussian_mixture", "batches"]

#: Standard deviation of each coordinate of the class means; the noise around
#: each mean has unit standard deviation.
MEAN_SCALE = 0.25


def gaussian_mixture(
    num_samples: int = 1024,
    num_features: int = 16,
    num_classes: int = 4,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor]:
    """Draw a classification data set from a mixture of isotropic Gaussians.

    Each class ``c`` has a mean ``mu_c ~ N(0, MEAN_SCALE**2 I)``; sample ``i``
    gets the label ``i % num_classes`` (so classes are balanced up to one
    sample), the samples are shuffled, and each input is ``mu_label + eps``
    with ``eps ~ N(0, I)``.

    All randomness comes from a private :class:`torch.Generator` seeded with
    ``seed``: the same arguments always give the same tensors, and the global
    RNG is never read or advanced.  Values are drawn in ``float64`` and then
    cast, so the data for different ``dtype`` agree up to rounding.

    Args:
        num_samples: number of samples ``N`` (>= 1).
        num_features: input dimension ``D`` (>= 1).
        num_classes: number of classes ``C`` (>= 1).
        seed: seed of the private generator.
        dtype: floating-point dtype of the inputs.

    Returns:
        ``(inputs, targets)``: inputs of shape ``(N, D)`` and dtype ``dtype``
        and int64 class labels of shape ``(N,)`` with values in ``[0, C)``.

    """
    for name, value in (
        ("num_samples", num_samples),
        ("num_features", num_features),
        ("num_classes", num_classes),
    ):
        positive_int(value, name)
    if not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point dtype, got {dtype}")

    gen = torch.Generator(device="cpu")
    gen.manual_seed(int(seed))

    means = MEAN_SCALE * torch.randn(num_classes, num_features, generator=gen, dtype=torch.float64)
    labels = torch.arange(num_samples, dtype=torch.int64) % num_classes
    labels = labels[torch.randperm(num_samples, generator=gen)]
    noise = torch.randn(num_samples, num_features, generator=gen, dtype=torch.float64)
    inputs = means[labels] + noise
    return inputs.to(dtype), labels


def batches(inputs: Tensor, targets: Tensor, batch_size: int) -> list[tuple[Tensor, Tensor]]:
    """Split ``(inputs, targets)`` into consecutive batches along dimension 0.

    Every batch holds ``batch_size`` samples except possibly the last, which
    holds the remainder.  The batches are views of the given tensors, in order.

    Args:
        inputs: tensor of shape ``(N, ...)``.
        targets: tensor of shape ``(N, ...)``.
        batch_size: samples per batch (>= 1).

    Returns:
        A list of ``ceil(N / batch_size)`` pairs ``(inputs_b, targets_b)``.

    """
    positive_int(batch_size, "batch_size")
    if inputs.shape[0] != targets.shape[0]:
        raise ValueError(
            f"inputs and targets differ in length: {inputs.shape[0]} != {targets.shape[0]}"
        )
    n = inputs.shape[0]
    return [
        (inputs[start : start + batch_size], targets[start : start + batch_size])
        for start in range(0, n, batch_size)
    ]
