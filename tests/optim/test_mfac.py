"""The MFAC optimizer against closed forms: float64 least squares whose gradients are computed by
hand and whose steps are dense solves of lambda I + G^T G / m over the last m of them (ring
wraps, momentum, weight decay, blocks, parameter groups, sample-weighted micro-batches), the first
step's formula, loss scaling, bitwise resume and refusals that change nothing."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from secondorder.optim import MFAC, AdaHessian
from tests.cases import gen

D = torch.float64
N, ROWS = 8, 12  # parameters and rows of the least-squares problem


def _problem(seed: int = 0):
    A = torch.randn(ROWS, N, generator=gen(seed), dtype=D)
    b = torch.randn(ROWS, generator=gen(seed + 1), dtype=D)
    theta = torch.randn(N, generator=gen(seed + 2), dtype=D)
    return A, b, theta


def _params(theta: torch.Tensor) -> list[nn.Parameter]:
    """``theta`` as two parameters, a [2, 3] matrix and a [2] vector (the optimizer flattens them in order)."""
    return [nn.Parameter(theta[:6].reshape(2, 3).clone()), nn.Parameter(theta[6:].clone())]


def _flat(params) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in params])


def _closure(params, A, b, rows=slice(None), outputs: bool = False):
    """The mean squared residual / 2 of ``rows``; with ``outputs``, ``(loss, residuals)`` (the sample count)."""
    def closure():
        r = A[rows] @ torch.cat([p.reshape(-1) for p in params]) - b[rows]
        loss = 0.5 * r.square().mean()
        return (loss, r) if outputs else loss
    return closure


def _reference(A, b, theta, steps, *, lr, damping, window, momentum=0.0, weight_decay=0.0, block_size=None,
               lrs=None):
    """The closed form: g = A^T (A theta - b) / n + w theta, the dense solve of lambda I + G^T G / m
    (block diagonal with ``block_size``) over the last ``window`` gradients, momentum
    v = mu v + (1 - mu) d, theta -= lr v (``lrs``: a learning rate per coordinate)."""
    theta, past, v = theta.clone(), [], torch.zeros(N, dtype=D)
    mask = torch.ones(N, N, dtype=torch.bool)
    if block_size is not None:
        chunk = torch.arange(N) // block_size
        mask = chunk[:, None] == chunk[None, :]
    rates = torch.full((N,), lr, dtype=D) if lrs is None else lrs
    for _ in range(steps):
        g = A.T @ (A @ theta - b) / A.shape[0] + weight_decay * theta
        past.append(g)
        G = torch.stack(past[-window:])
        F_hat = (damping * torch.eye(N, dtype=D) + G.T @ G / window) * mask
        d = torch.linalg.solve(F_hat, g)
        v = momentum * v + (1 - momentum) * d if momentum else d
        theta = theta - rates * v
    return theta


CONFIGS = {
    "window longer than the run": dict(lr=0.3, damping=1e-2, window=10),
    "ring wraps": dict(lr=0.3, damping=1e-2, window=3),
    "momentum": dict(lr=0.3, damping=1e-2, window=4, momentum=0.7),
    "weight decay": dict(lr=0.3, damping=1e-2, window=4, weight_decay=0.1),
    "blockwise": dict(lr=0.3, damping=1e-2, window=3, block_size=3),
    "everything": dict(lr=0.2, damping=5e-2, window=2, momentum=0.5, weight_decay=0.05, block_size=5),
    "the paper's damping": dict(lr=0.01, damping=1e-5, window=3),
}
# With lambda = 1e-5 the dense reference solve itself has a condition number near 1e6 (a rank-3
# window in 8 dimensions): the two agree to 1e-9 there, to 1e-13 at the other dampings.
TOLERANCE = {name: 1e-8 if options["damping"] < 1e-3 else 1e-12 for name, options in CONFIGS.items()}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_steps_equal_dense_solves_over_the_last_m_gradients(name):
    A, b, theta = _problem()
    params = _params(theta)
    opt = MFAC(params, **CONFIGS[name])
    steps = 7
    for _ in range(steps):
        opt.step(_closure(params, A, b))
    want = _reference(A, b, theta, steps, **CONFIGS[name])
    assert float((_flat(params) - want).abs().max()) <= TOLERANCE[name] * max(1.0, float(want.abs().max()))
    assert opt.num_steps == opt.operator.num_added == steps


def test_parameter_groups_have_their_own_learning_rates():
    A, b, theta = _problem(3)
    params = _params(theta)
    opt = MFAC([{"params": params[:1]}, {"params": params[1:], "lr": 0.05}], lr=0.3, damping=1e-2, window=3)
    for _ in range(5):
        opt.step(_closure(params, A, b))
    lrs = torch.tensor([0.3] * 6 + [0.05] * 2, dtype=D)
    want = _reference(A, b, theta, 5, lr=0.3, damping=1e-2, window=3, lrs=lrs)
    assert torch.allclose(_flat(params), want, rtol=0, atol=1e-12)


def test_the_first_step_is_the_gradient_over_lambda_plus_its_squared_norm_over_m():
    r"""With one gradient in an empty window, :math:`\hat F^{-1} g = g / (\lambda + \|g\|^2/m)`;
    the paper's defaults (lambda = 1e-5, lr = 1e-3, m = 32) here."""
    A, b, theta = _problem(5)
    params = _params(theta)
    opt = MFAC(params)
    assert (opt.param_groups[0]["lr"], opt.damping, opt.window, opt.param_groups[0]["momentum"]) == (1e-3, 1e-5, 32, 0)
    loss = opt.step(_closure(params, A, b))
    g = A.T @ (A @ theta - b) / ROWS
    want = theta - 1e-3 * g / (1e-5 + g.dot(g) / 32)
    # M-FAC's Woodbury form (g - G^T K^{-1} G g) / lambda cancels: each entry subtracts two numbers of
    # size |g_i| whose difference is |g_i| m lambda / (m lambda + |g|^2) (here ~3e-5 of them), so its
    # rounding is a few eps |g_i| / lambda before the lr, not eps |step| (1.8 of them measured on an AMD EPYC)
    bound = 1e-3 * 8 * torch.finfo(D).eps * g.abs() / 1e-5
    assert bool(((_flat(params) - want).abs() <= bound).all())
    assert torch.allclose(loss, 0.5 * (A @ theta - b).square().mean(), rtol=1e-15, atol=0)


def test_micro_batches_are_weighted_by_their_sample_counts():
    """Unequal micro-batches returning (loss, outputs) give the full batch's trajectory; bare losses
    count equally."""
    A, b, theta = _problem(7)
    full, micro, bare = _params(theta), _params(theta), _params(theta)
    options = dict(lr=0.3, damping=1e-2, window=3, momentum=0.5)
    opts = [MFAC(ps, **options) for ps in (full, micro, bare)]
    for _ in range(5):
        loss_full = opts[0].step(_closure(full, A, b, outputs=True))
        loss_micro = opts[1].step([_closure(micro, A, b, slice(0, 3), True), _closure(micro, A, b, slice(3, None), True)])
        opts[2].step([_closure(bare, A, b, slice(0, 6)), _closure(bare, A, b, slice(6, None))])  # 6 + 6: equal
        assert torch.allclose(loss_micro, loss_full, rtol=1e-13, atol=0)
    assert torch.allclose(_flat(micro), _flat(full), rtol=0, atol=1e-12)
    assert torch.allclose(_flat(bare), _flat(full), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="mixed"):
        opts[1].step([_closure(micro, A, b, outputs=True), _closure(micro, A, b)])


def test_the_defaults_train_a_float32_mlp_with_a_half_precision_window():
    X, y = torch.randn(64, 5, generator=gen(1)), torch.randint(0, 3, (64,), generator=gen(2))
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3))
    opt = MFAC(model.parameters(), lr=1e-2, damping=1e-4, storage_dtype=torch.float16)
    assert opt.operator.gradients.dtype == torch.float16 and opt.operator.dtype == torch.float32
    losses = [float(opt.step(lambda: F.cross_entropy(model(X), y))) for _ in range(60)]
    assert losses[-1] < 0.8 * losses[0]


def _run(params, opt, A, b, steps):
    for _ in range(steps):
        opt.step(_closure(params, A, b))


def test_state_dict_resumes_bitwise_mid_run():
    """Saved after 5 steps of a window of 3 (wrapped) with momentum; a fresh optimizer loaded from it
    reproduces the next 5 steps bit for bit, and the saved window is a copy."""
    A, b, theta = _problem(9)
    options = dict(lr=0.2, damping=1e-2, window=3, momentum=0.6, weight_decay=0.01, block_size=5)
    params = _params(theta)
    opt = MFAC(params, **options)
    _run(params, opt, A, b, 5)
    saved_params, saved = _flat(params).clone(), copy.deepcopy(opt.state_dict())
    live = opt.state_dict()
    _run(params, opt, A, b, 5)
    assert torch.equal(live["second_order"]["window"]["gradients"], saved["second_order"]["window"]["gradients"])
    resumed = _params(saved_params)
    opt2 = MFAC(resumed, **options)
    opt2.load_state_dict(saved)
    assert opt2.num_steps == 5 and opt2.operator.num_added == 5
    _run(resumed, opt2, A, b, 5)
    assert torch.equal(_flat(resumed), _flat(params))
    assert torch.equal(opt2.operator.gram, opt.operator.gram) and torch.equal(opt2.operator.cholesky, opt.operator.cholesky)


def _snapshot(opt, params):
    return copy.deepcopy((_flat(params), opt.operator.gradients, opt.operator.gram, opt.operator.num_added,
                          opt.num_steps, [dict(opt.state[p]) for p in params]))


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def test_loading_another_optimizers_or_models_state_is_refused_before_anything_changes():
    A, b, theta = _problem(11)
    params = _params(theta)
    opt = MFAC(params, lr=0.2, damping=1e-2, window=3, momentum=0.5)
    _run(params, opt, A, b, 2)
    good = opt.state_dict()
    other_window = MFAC(_params(theta), lr=0.2, damping=1e-2, window=4, momentum=0.5).state_dict()
    other_model = MFAC([nn.Parameter(torch.zeros(2, 4, dtype=D)), nn.Parameter(torch.zeros(2, dtype=D))], lr=0.2,
                       damping=1e-2, window=3, momentum=0.5)
    other_model.step(lambda: other_model.param_groups[0]["params"][0].square().sum()
                     + other_model.param_groups[0]["params"][1].sum())
    adahessian = AdaHessian(_params(theta)).state_dict()
    bad_count = copy.deepcopy(good)
    bad_count["second_order"]["window"]["num_added"] = -1
    bad_gram = copy.deepcopy(good)
    bad_gram["second_order"]["window"]["gram"] = bad_gram["second_order"]["window"]["gram"][:, :2]
    _run(params, opt, A, b, 1)
    before = _snapshot(opt, params)
    cases = [
        (adahessian, "saved by AdaHessian, not MFAC"),
        ({"state": {}}, "not a MFAC state_dict"),
        (other_window, "saved M-FAC window has .*'window': 4"),
        (other_model.state_dict(), "momentum buffer of parameter 0 of group 0 is \\[2, 4\\]"),
        (bad_count, "num_added"),
        (bad_gram, "gram is torch.float64 \\[1, 2, 3\\]"),
    ]
    for state, message in cases:
        with pytest.raises(ValueError, match=message):
            opt.load_state_dict(state)
        assert _same(_snapshot(opt, params), before)
    opt.load_state_dict(good)
    assert opt.num_steps == 2 and opt.operator.num_added == 2


def test_bad_input_is_refused_before_anything_changes():
    A, b, theta = _problem(13)
    params = _params(theta)
    for options, message in [
        (dict(lr=-1.0), "lr"), (dict(damping=0.0), "damping"), (dict(damping=-1e-3), "damping"),
        (dict(window=0), "window"), (dict(window=2.5), "window"), (dict(momentum=1.0), "momentum"),
        (dict(weight_decay=-0.1), "weight_decay"), (dict(block_size=0), "block_size"),
        (dict(storage_dtype=torch.int8), "storage_dtype"), (dict(distributed="sometimes"), "distributed"),
    ]:
        with pytest.raises(ValueError, match=message):
            MFAC(params, **options)
    with pytest.raises(ValueError, match="momentum"):
        MFAC([{"params": params[:1]}, {"params": params[1:], "momentum": -0.5}])
    opt = MFAC(params, lr=0.2, damping=1e-2, window=3, momentum=0.5)
    _run(params, opt, A, b, 2)
    before = _snapshot(opt, params)

    def nan_gradient():  # a finite loss whose gradient is NaN (sqrt at 0)
        return _closure(params, A, b)() + torch.sqrt(params[1][0] - params[1][0].detach())

    nan_loss = lambda: _closure(params, A, b)() * float("nan")  # noqa: E731
    cases = [
        (nan_gradient, FloatingPointError, "gradient at step 3 is not finite"),
        (nan_loss, FloatingPointError, "loss at step 3 is nan"),
        (None, ValueError, "call step\\(closure\\)"),
        (lambda: (_closure(params, A, b)(), "many"), ValueError, "outputs"),
        (lambda: (_closure(params, A, b)(), 0), ValueError, "0 samples"),
        (lambda: torch.tensor(1.0, dtype=D), ValueError, "does not depend on the parameters"),
        (lambda: (1, 2, 3), ValueError, "returned 3 values"),
    ]
    for closure, error, message in cases:
        with pytest.raises(error, match=message):
            opt.step(closure)
        assert _same(_snapshot(opt, params), before)
    _run(params, opt, A, b, 1)
    assert opt.num_steps == 3


def test_grad_scaler_unscales_exactly_and_an_overflow_skips_the_step():
    A, b, theta = _problem(15)
    plain, scaled = _params(theta), _params(theta)
    opt_plain = MFAC(plain, lr=0.2, damping=1e-2, window=3)
    opt_scaled = MFAC(scaled, lr=0.2, damping=1e-2, window=3,
                      grad_scaler=torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=2))
    for _ in range(3):
        opt_plain.step(_closure(plain, A, b))
        opt_scaled.step(_closure(scaled, A, b))
    assert torch.equal(_flat(plain), _flat(scaled))  # powers of two scale and unscale exactly
    assert opt_scaled.grad_scaler.get_scale() == 2048.0 and opt_scaled.num_good_steps == 1
    huge = torch.amp.GradScaler("cpu", init_scale=2.0**127, backoff_factor=2.0**-60)
    params32 = [nn.Parameter(p.detach().float()) for p in _params(theta)]
    opt = MFAC(params32, lr=1.0, grad_scaler=huge)
    A32, b32 = A.float(), b.float()
    loss = opt.step(lambda: 1e6 * _closure(params32, A32, b32)())  # finite loss, scaled gradient overflows
    assert torch.isfinite(loss)
    assert torch.equal(_flat(params32), theta.float()) and huge.get_scale() == 2.0**67
    assert opt.num_steps == opt.operator.num_added == 0 and not opt.operator.gradients.any()
    opt.step(_closure(params32, A32, b32))  # the backed-off scale fits: a step
    assert opt.num_steps == 1 and not torch.equal(_flat(params32), theta.float())
