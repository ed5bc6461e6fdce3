import math

import pytest
import torch

from secondorder.datasets import ENV_FLIP_PROBS, colored_digit_environments, colored_digits

N = 4000


@pytest.fixture(scope="module")
def envs():
    return colored_digit_environments(num_per_env=N, seed=3)


def within_binomial(successes, n, p, sigmas=4.0):
    """|successes / n - p| within `sigmas` binomial standard errors."""
    return abs(successes / n - p) <= sigmas * math.sqrt(p * (1 - p) / n)


def test_shapes_values_and_colour_channels(envs):
    assert [e.flip_prob for e in envs] == list(ENV_FLIP_PROBS)
    for e in envs:
        assert e.x.shape == (N, 2, 8, 8) and e.x.dtype == torch.float32 and e.y.shape == (N,)
        assert set(e.y.unique().tolist()) <= {0.0, 1.0} and 0 <= e.x.min() and e.x.max() <= 1
        mass = e.x.sum((2, 3))
        rows = torch.arange(N)
        assert torch.equal(mass[rows, 1 - e.colour], torch.zeros(N))  # the other channel is empty
        assert (mass[rows, e.colour] > 0).all()


def test_label_and_colour_agreement_rates_match_within_binomial_error(envs):
    for e in envs:
        shape_agrees = int((e.y.bool() == (e.digit < 5)).sum())
        colour_agrees = int((e.colour == e.y.long()).sum())
        assert within_binomial(shape_agrees, N, 0.75), shape_agrees / N
        assert within_binomial(colour_agrees, N, 1 - e.flip_prob), (e.flip_prob, colour_agrees / N)
    # the rates are distinguishable from the neighbouring environments' at this N
    assert not within_binomial(int((envs[0].colour == envs[0].y.long()).sum()), N, 0.9)


def test_deterministic_from_the_seed_and_global_rng_untouched():
    state = torch.get_rng_state()
    a = colored_digits(num_per_env=300, seed=7)
    b = colored_digits(num_per_env=300, seed=7)
    c = colored_digits(num_per_env=300, seed=8)
    assert torch.equal(state, torch.get_rng_state())
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))
    assert not torch.equal(a[0][0], c[0][0])


def test_grey_oracle_has_the_same_draws_without_colour():
    col = colored_digit_environments(num_per_env=300, seed=2)
    grey = colored_digit_environments(num_per_env=300, seed=2, grey=True)
    rows = torch.arange(300)
    for c, g in zip(col, grey):
        assert torch.equal(c.y, g.y) and torch.equal(c.digit, g.digit)
        assert torch.equal(g.x[:, 0], g.x[:, 1])
        assert torch.equal(c.x[rows, c.colour], g.x[:, 0])


def test_options_and_refusals():
    x, y = colored_digits(num_per_env=10, flip_probs=(0.5,), size=16, noise_std=0.0, seed=0)[0]
    assert x.shape == (10, 2, 16, 16)
    with pytest.raises(ValueError, match="flip_probs"):
        colored_digits(flip_probs=(0.2, 1.5))
    with pytest.raises(ValueError, match="size"):
        colored_digits(size=4)
    with pytest.raises(ValueError, match="num_per_env"):
        colored_digits(num_per_env=0)
