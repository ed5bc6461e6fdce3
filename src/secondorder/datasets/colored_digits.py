r"""Colored digits: the ColoredMNIST environments of IRM (Arjovsky et al. 2019), rebuilt offline from
scikit-learn's 8x8 digits (1797 images, shipped with scikit-learn).

Each sample of environment :math:`e`:

1. an image of digit :math:`d` from that environment's pool, scaled to :math:`[0, 1]`, optionally
   resized (bilinear) to ``size`` x ``size``, plus fresh Gaussian pixel noise (``noise_std``, clipped
   to :math:`[0, 1]`): the pools are reused to reach ``num_per_env`` samples, each reuse with new
   noise, new label and new colour draws;
2. the label :math:`y = [d < 5]`, flipped with probability ``label_noise`` (0.25): the digit's shape
   predicts :math:`y` 75 % of the time;
3. the colour :math:`c = y`, flipped with the environment's probability :math:`p_e` (default 0.2 and
   0.1 for the two training environments, 0.9 for the test one): colour predicts :math:`y` with
   probability :math:`1 - p_e`, better than the shape in training and much worse at test;
4. two channels: the image goes to channel :math:`c` and the other channel is zero. With
   ``grey=True`` (the grey-scale oracle) both channels hold the image, so the colour is gone and the
   same draws give the same labels.

The 1797 images are shuffled and split into disjoint, equal pools, one per environment (the test
environment never sees a training image). Everything is drawn from a private generator seeded with
``seed``: the same arguments give the same tensors and the global RNG is untouched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from secondorder import validation

__all__ = ["ENV_FLIP_PROBS", "DigitEnvironment", "colored_digit_environments", "colored_digits"]

#: Colour-flip probabilities :math:`p_e` of IRM's ColoredMNIST: two training environments, then the test one.
ENV_FLIP_PROBS = (0.2, 0.1, 0.9)


@dataclass(frozen=True)
class DigitEnvironment:
    """One environment: ``x [N, 2, size, size]`` float32, ``y [N]`` float32 in {0, 1}, and what made
    them: ``colour [N]`` int64 (the channel that holds the image, drawn even when ``grey``),
    ``digit [N]`` int64, the colour-flip probability ``flip_prob``.
    """

    x: Tensor
    y: Tensor
    colour: Tensor
    digit: Tensor
    flip_prob: float

    def pair(self) -> tuple[Tensor, Tensor]:
        """``(x, y)``."""
        return self.x, self.y


def _flip(bits: Tensor, prob: float, gen: torch.Generator) -> Tensor:
    return torch.logical_xor(bits, torch.rand(bits.shape, generator=gen, dtype=torch.float64) < prob)


def colored_digit_environments(
    num_per_env: int = 2500,
    flip_probs: Sequence[float] = ENV_FLIP_PROBS,
    label_noise: float = 0.25,
    noise_std: float = 0.1,
    size: int = 8,
    grey: bool = False,
    seed: int = 0,
) -> list[DigitEnvironment]:
    """The colored-digits environments with their labels' provenance (see the module docs).

    Args:
        num_per_env: samples per environment (the pool of about 1797 / E images is reused).
        flip_probs: the colour-flip probability of each environment, in order.
        label_noise: the probability that the label disagrees with ``digit < 5``.
        noise_std: standard deviation of the Gaussian pixel noise added to each reuse (0: none).
        size: image side; 8 is the original, larger values are bilinear upsamplings.
        grey: the grey-scale oracle: the image in both channels, no colour.
        seed: seed of the private generator.

    Returns:
        One :class:`DigitEnvironment` per entry of ``flip_probs``.

    """
    from sklearn.datasets import load_digits

    validation.positive_int(num_per_env, "num_per_env")
    probs = [float(p) for p in flip_probs]
    if not probs or not all(0.0 <= p <= 1.0 for p in probs):
        raise ValueError(f"flip_probs must be a non-empty sequence of probabilities in [0, 1], got {flip_probs!r}")
    if not 0.0 <= float(label_noise) <= 1.0:
        raise ValueError(f"label_noise must be a probability in [0, 1], got {label_noise!r}")
    validation.non_negative(noise_std, "noise_std")
    if not isinstance(size, int) or size < 8:
        raise ValueError(f"size must be an integer >= 8 (8 is the original resolution), got {size!r}")
    if not isinstance(grey, bool):
        raise TypeError(f"grey must be a bool, got {grey!r}")

    digits = load_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float32) / 16.0  # [1797, 8, 8], values 0..16
    labels = torch.as_tensor(digits.target, dtype=torch.int64)
    if size != 8:
        images = F.interpolate(images.unsqueeze(1), size=(size, size), mode="bilinear", align_corners=False)
        images = images.squeeze(1).clamp_(0.0, 1.0)

    gen = torch.Generator(device="cpu")
    gen.manual_seed(validation.seed(seed))
    order = torch.randperm(images.shape[0], generator=gen)
    pools = torch.tensor_split(order, len(probs))

    envs = []
    for pool, prob in zip(pools, probs):
        index = pool[torch.randint(0, pool.numel(), (num_per_env,), generator=gen)]
        digit = labels[index]
        y = _flip(digit < 5, float(label_noise), gen)
        colour = _flip(y, prob, gen).to(torch.int64)
        noise = torch.randn((num_per_env, size, size), generator=gen, dtype=torch.float32)
        img = (images[index] + float(noise_std) * noise).clamp_(0.0, 1.0)
        x = img.unsqueeze(1).repeat(1, 2, 1, 1)
        if not grey:
            x[torch.arange(num_per_env), 1 - colour] = 0.0
        envs.append(DigitEnvironment(x=x, y=y.to(torch.float32), colour=colour, digit=digit, flip_prob=prob))
    return envs


def colored_digits(
    num_per_env: int = 2500,
    flip_probs: Sequence[float] = ENV_FLIP_PROBS,
    label_noise: float = 0.25,
    noise_std: float = 0.1,
    size: int = 8,
    grey: bool = False,
    seed: int = 0,
) -> list[tuple[Tensor, Tensor]]:
    """The colored-digits environments as ``[(x, y), ...]``: ``x [N, 2, size, size]`` float32 and
    ``y [N]`` float32 in {0, 1} (for ``binary_cross_entropy_with_logits``); arguments as for
    :func:`colored_digit_environments`.

    >>> train_a, train_b, test = colored_digits(num_per_env=100, seed=0)
    >>> test[0].shape, test[1].shape
    (torch.Size([100, 2, 8, 8]), torch.Size([100]))
    """
    return [env.pair() for env in colored_digit_environments(num_per_env, flip_probs, label_noise, noise_std,
                                                             size, grey, seed)]
