import pytest
import torch
from torch import nn

from secondorder.datasets import DigitTransformer, load_digit_tokens, train_digit_transformer
from secondorder.quant import gptq_quantize, quantizable_layers, quantize


@pytest.fixture(scope="module")
def data():
    return load_digit_tokens()


def test_split_is_stratified_standardised_and_seeded(data):
    xtr, ytr, xte, yte = data
    assert xtr.shape == (1437, 8, 8) and xte.shape == (360, 8, 8)
    assert xtr.dtype == torch.float32 and ytr.dtype == torch.long
    assert set(ytr.unique().tolist()) == set(range(10)) == set(yte.unique().tolist())
    counts = torch.bincount(yte, minlength=10)
    assert int(counts.max() - counts.min()) <= 2  # stratified: about 36 of each class
    flat = xtr.reshape(len(xtr), -1)
    assert flat.mean(0).abs().max() < 1e-5
    std = flat.std(0, unbiased=False)
    assert torch.all(((std - 1).abs() < 1e-4) | (std < 1e-6))  # constant pixels stay 0
    again, other = load_digit_tokens(), load_digit_tokens(split_seed=1)
    assert torch.equal(again[0], xtr) and not torch.equal(other[1], ytr)


def test_shapes_and_every_linear_is_a_quantizable_layer(data):
    model = DigitTransformer()
    assert model(data[0][:5]).shape == (5, 10)
    assert model(data[0][:5].reshape(5, 64)).shape == (5, 10)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 14 and not any(isinstance(m, nn.MultiheadAttention) for m in model.modules())
    assert [n for n, _ in quantizable_layers(model)] == linears
    assert "blocks.1.attn.out" in linears and sum(p.numel() for p in model.parameters()) == 26346
    # every layer can be fake-quantized and GPTQ-rounded
    bits = {n: 4 for n in linears}
    assert torch.isfinite(quantize(model, bits)(data[0][:5])).all()
    result = gptq_quantize(model, bits, data[0][:64])
    assert list(result.layers) == linears  # execution order is the module order


def test_deterministic_at_a_fixed_seed_and_global_rng_untouched(data):
    small = (data[0][:200], data[1][:200], data[2][:50], data[3][:50])
    state = torch.get_rng_state()
    a = train_digit_transformer(seed=3, epochs=1, data=small)
    b = train_digit_transformer(seed=3, epochs=1, data=small)
    c = train_digit_transformer(seed=4, epochs=1, data=small)
    assert torch.equal(state, torch.get_rng_state())
    sa, sb, sc = a.model.state_dict(), b.model.state_dict(), c.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["head.weight"], sc["head.weight"])
    assert not a.model.training and a.test_accuracy == b.test_accuracy and a.train_loss == b.train_loss
    assert a.train[0] is small[0] and a.test[1] is small[3]
    assert "seed 3" in a.recipe and "1 epochs" in a.recipe
    assert all(p.grad is None for p in a.model.parameters())


def test_rejects_bad_arguments():
    with pytest.raises(ValueError):
        train_digit_transformer(epochs=0)
    with pytest.raises(ValueError):
        DigitTransformer(dim=30, heads=4)
