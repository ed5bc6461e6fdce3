"""AdaptiveBatchTrainer: accumulation = one big batch, FGSM by hand, the dense-Hessian eigenvalue, resume, hygiene."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from secondorder.datasets import gaussian_mixture
from secondorder.schedules import AdaptiveBatchSize, AdaptiveBatchTrainer, fgsm, top_eigenvalue
from tests.references import dense_hessian

F64 = torch.float64
N = 40


def data(seed: int = 0):
    return gaussian_mixture(N, 4, 3, seed=seed, dtype=F64)


def net(seed: int = 0, dropout: float = 0.0) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layers = [nn.Linear(4, 6), nn.Tanh()] + ([nn.Dropout(dropout)] if dropout else []) + [nn.Linear(6, 3)]
        return nn.Sequential(*layers).to(F64)


def fixed(batch: int, lr: float = 0.1) -> AdaptiveBatchSize:
    return AdaptiveBatchSize(batch, lr, max_batch_size=batch, adaptive=False)


def params(model):
    return [p.detach().clone() for p in model.parameters()]


def test_accumulated_step_equals_one_big_batch_step():
    x, y = data()
    model = net()
    before = params(model)
    trainer = AdaptiveBatchTrainer(model, F.cross_entropy, (x, y), fixed(N), momentum=0.0, max_micro_batch=7,
                                   track_eigenvalue=False)
    record, = trainer.train(1)
    assert (record.steps, record.iterations, record.batch_size) == (1, 1, N)
    # one SGD step on the mean loss over all N samples, by hand
    reference = net()
    loss = F.cross_entropy(reference(x), y)
    grads = torch.autograd.grad(loss, list(reference.parameters()))
    for p, p0, g in zip(model.parameters(), before, grads):
        torch.testing.assert_close(p.detach(), p0 - 0.1 * g, rtol=0, atol=1e-14)
    assert record.train_loss == pytest.approx(float(loss.detach()), rel=1e-13)


@pytest.mark.parametrize("fraction", [0.0, 0.25])
def test_micro_batch_size_does_not_change_training(fraction):
    x, y = data()
    runs = []
    for micro in (16, 5, 3):
        model = net()
        controller = AdaptiveBatchSize(16, 0.1, max_batch_size=16, adaptive=False, adversarial_fraction=fraction)
        trainer = AdaptiveBatchTrainer(model, F.cross_entropy, (x, y), controller, max_micro_batch=micro,
                                       epsilon=0.1, track_eigenvalue=False, seed=3)
        history = trainer.train(3)
        assert [r.steps for r in history] == [3, 3, 3]  # 16 + 16 + 8 samples per epoch
        runs.append((params(model), [r.train_loss for r in history]))
    for ps, losses in runs[1:]:
        for a, b in zip(ps, runs[0][0]):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-13)
        assert losses == pytest.approx(runs[0][1], rel=1e-12)


class ModeRecorder(nn.Module):
    """A linear classifier that remembers the mode of every forward."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3).to(F64)
        self.modes: list[bool] = []

    def forward(self, x):
        self.modes.append(self.training)
        return self.lin(x)


def test_fgsm_equals_the_hand_computed_sign_step():
    x, y = data()
    model = ModeRecorder().train()
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    W, b = model.lin.weight.detach(), model.lin.bias.detach()
    # d/dx_i of mean_j CE(W x_j + b, y_j) = W^T (softmax(W x_i + b) - onehot(y_i)) / n
    grad = (torch.softmax(x @ W.T + b, -1) - F.one_hot(y, 3).to(F64)) @ W / len(x)
    want = x + 0.3 * grad.sign()
    got = fgsm(model, F.cross_entropy, x, y, 0.3)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-15)
    torch.testing.assert_close(fgsm(model, F.cross_entropy, x, y, 0.3, clip=(-0.5, 0.5)), want.clamp(-0.5, 0.5))
    assert model.modes == [False, False] and model.training  # eval inside, mode restored
    assert all(torch.equal(p.grad, torch.full_like(p, 7.0)) for p in model.parameters())  # grads untouched
    assert not got.requires_grad
    with pytest.raises(TypeError, match="floating-point tensor inputs"):
        fgsm(model, F.cross_entropy, y, y, 0.3)


def test_adversarial_examples_are_the_first_fraction_of_each_step():
    x, y = data()
    seen = []

    class Spy(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3).to(F64)

        def forward(self, inputs):
            if self.training:
                seen.append(inputs.detach().clone())
            return self.lin(inputs)

    controller = AdaptiveBatchSize(20, 0.1, max_batch_size=20, adaptive=False, adversarial_fraction=0.3)
    trainer = AdaptiveBatchTrainer(Spy(), F.cross_entropy, (x, y), controller, epsilon=0.25, max_micro_batch=4,
                                   adversarial_clip=None, track_eigenvalue=False)
    trainer.train(1)
    batches = torch.cat(seen)  # the 40 trained samples of the epoch, 2 steps of 20 in micro-batches of 4
    step_rows = [batches[:20], batches[20:]]
    for rows in step_rows:
        # floor(0.3 * 20) = 6 adversarial rows per step: each is a training sample moved by +-0.25 in every
        # coordinate; the other 14 are training samples
        diff = (rows[:, None, :] - x[None]).abs()
        moved = ((diff - 0.25).abs().amax(-1) < 1e-12).any(-1)
        clean = (diff.amax(-1) == 0).any(-1)
        assert moved[:6].all() and not clean[:6].any() and clean[6:].all()


def test_model_mode_and_global_rng_are_untouched():
    x, y = data()
    for mode in (True, False):
        model = net(dropout=0.3).train(mode)
        controller = AdaptiveBatchSize(8, 0.05, max_batch_size=32, adversarial_fraction=0.2, patience=1)
        trainer = AdaptiveBatchTrainer(model, F.cross_entropy, (x, y), controller, test_data=(x, y), epsilon=0.1)
        state = torch.get_rng_state()
        trainer.train(2)
        assert model.training is mode and torch.equal(torch.get_rng_state(), state)
        assert all(p.grad is None for p in model.parameters())


def test_the_eigenvalue_used_is_the_dense_hessians():
    x, y = data()
    model = net()
    trainer = AdaptiveBatchTrainer(model, F.cross_entropy, (x, y), AdaptiveBatchSize(8, 0.1, max_batch_size=32),
                                   eigen_batch_size=N, eigen_tol=1e-10, eigen_max_matvecs=200)
    record, = trainer.train(1)
    names = [n for n, _ in model.named_parameters()]
    H = dense_hessian(model, F.cross_entropy, [(x, y)], names)
    assert record.top_eigenvalue == pytest.approx(float(torch.linalg.eigvalsh(H)[-1]), rel=1e-9)
    assert trainer.controller.reference_eigenvalue == record.top_eigenvalue
    # the function on its own, on a subset, with the model left in train mode
    model.train()
    H = dense_hessian(model, F.cross_entropy, [(x[:10], y[:10])], names)
    got = top_eigenvalue(model, F.cross_entropy, (x[:10], y[:10]), tol=1e-10, max_matvecs=200)
    assert got == pytest.approx(float(torch.linalg.eigvalsh(H)[-1]), rel=1e-9) and model.training


def absa_trainer(model, x, y, train=None):
    controller = AdaptiveBatchSize(4, 0.05, max_batch_size=32, adversarial_fraction=0.25, adversarial_epochs=4,
                                   patience=2, lr_milestones=(5,))
    return AdaptiveBatchTrainer(model, F.cross_entropy, (x, y) if train is None else train, controller,
                                test_data=data(1), epsilon=0.1,
                                eigen_batch_size=16, seed=5)


def test_resume_is_bitwise_the_uninterrupted_run():
    x, y = data()
    whole_model = net(dropout=0.2)
    whole = absa_trainer(whole_model, x, y).train(7)
    assert {r.batch_size for r in whole} >= {4, 8, 16}  # the schedule really moves

    first = absa_trainer(net(dropout=0.2), x, y)
    first.train(3)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed_model = net(seed=99, dropout=0.2)  # other weights: the state restores them
    resumed = absa_trainer(resumed_model, x, y)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    history = resumed.train(4)
    assert history == whole
    assert all(torch.equal(a, b) for a, b in zip(whole_model.parameters(), resumed_model.parameters()))


def test_a_dataset_trains_like_tensors():
    x, y = data()
    a, b = net(), net()
    absa_trainer(a, x, y).train(2)
    absa_trainer(b, x, y, train=torch.utils.data.TensorDataset(x, y)).train(2)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_custom_optimizer_groups_scale_with_the_controller():
    x, y = data()
    model = net()
    opt = torch.optim.SGD([{"params": model[0].parameters(), "lr": 0.01},
                           {"params": model[2].parameters(), "lr": 0.03}])
    controller = AdaptiveBatchSize(8, 0.1, max_batch_size=32, patience=1)
    trainer = AdaptiveBatchTrainer(model, F.cross_entropy, (x, y), controller, optimizer=opt, track_eigenvalue=False)
    trainer.train(3)  # batch 8, 16, 32: the last epoch at 4x the base rates
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.04, 0.12])


def test_progress_bar_on_stderr(capsys):
    x, y = data()
    trainer = AdaptiveBatchTrainer(net(), F.cross_entropy, (x, y), fixed(8), progress=True, test_data=(x, y))
    trainer.train(2)
    assert "training" in capsys.readouterr().err


def test_bad_input_raises_clear_errors():
    x, y = data()
    with pytest.raises(ValueError, match="exceeds the 40 training samples"):
        AdaptiveBatchTrainer(net(), F.cross_entropy, (x, y), AdaptiveBatchSize(8, 0.1, max_batch_size=64))
    with pytest.raises(ValueError, match="epsilon is 0"):
        AdaptiveBatchTrainer(net(), F.cross_entropy, (x, y), AdaptiveBatchSize(8, 0.1, max_batch_size=32,
                                                                               adversarial_fraction=0.2), epsilon=0)
    with pytest.raises(TypeError, match="tensors or a map-style torch Dataset"):
        AdaptiveBatchTrainer(net(), F.cross_entropy, [x, y, y], fixed(8))
    with pytest.raises(ValueError, match="share their first"):
        AdaptiveBatchTrainer(net(), F.cross_entropy, (x, y[:5]), fixed(4))
    with pytest.raises(ValueError, match="max_micro_batch must be a positive integer"):
        AdaptiveBatchTrainer(net(), F.cross_entropy, (x, y), fixed(8), max_micro_batch=0)
    with pytest.raises(ValueError, match="adversarial_clip"):
        AdaptiveBatchTrainer(net(), F.cross_entropy, (x, y), fixed(8), adversarial_clip=(1, 0))
    with pytest.raises(ValueError, match="scalar tensor"):
        AdaptiveBatchTrainer(net(), lambda o, t: F.cross_entropy(o, t, reduction="none"), (x, y), fixed(8)).train(1)
    model = net()
    with pytest.raises(FloatingPointError, match="lower the learning rate"):
        AdaptiveBatchTrainer(model, F.cross_entropy, (x * float("nan"), y), fixed(8), track_eigenvalue=False).train(1)
    with pytest.raises(ValueError, match="epochs must be a non-negative integer"):
        AdaptiveBatchTrainer(model, F.cross_entropy, (x, y), fixed(8)).train(-1)
    with pytest.raises(ValueError, match="not an AdaptiveBatchTrainer state_dict"):
        AdaptiveBatchTrainer(model, F.cross_entropy, (x, y), fixed(8)).load_state_dict({"model": {}})
