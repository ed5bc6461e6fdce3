import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from secondorder.regularizers import (
    HessianAlignment,
    head_gradient,
    hessian_gradient_product,
    hutchinson_diagonal,
    rademacher_probes,
)

D64 = torch.float64


def tiny(seed=0, d_in=3, hidden=4, classes=3):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, classes)).to(D64)


def environments(num=3, n=6, d_in=3, classes=3, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, d_in, generator=gen, dtype=D64) * (1 + e),
             torch.randint(0, classes, (n,), generator=gen)) for e in range(num)]


def head_loss(net, x):
    """theta -> CE of the head at theta on the features of x (the features keep their graph)."""
    phi = net[1](net[0](x[0]))
    W, b = net[2].weight, net[2].bias

    def loss(theta):
        return F.cross_entropy(phi @ theta[: W.numel()].view_as(W).T + theta[W.numel():], x[1])

    return loss, torch.cat([W.reshape(-1), b])


def test_hgp_identity_matches_autograd_hvp():
    net = tiny()
    x, y = environments(1)[0]
    head = list(net[2].parameters())
    g = head_gradient(F.cross_entropy(net(x), y), head)
    hg = hessian_gradient_product(g, head)
    loss, theta = head_loss(net, (x, y))
    _, ref = torch.autograd.functional.hvp(loss, theta.detach(), g.detach())
    assert torch.allclose(hg, ref, rtol=0, atol=1e-10)
    assert hg.abs().max() > 1e-3


def test_hgp_at_zero_gradient_is_zero_not_nan():
    w = nn.Parameter(torch.zeros(3, dtype=D64))
    g = head_gradient(0.5 * (w * torch.tensor([1.0, 2.0, 3.0], dtype=D64)).pow(2).sum(), [w])
    hg = hessian_gradient_product(g, [w])
    assert torch.equal(hg, torch.zeros(3, dtype=D64))


def test_hutchinson_diagonal_over_all_sign_patterns_is_the_exact_diagonal():
    net = tiny(hidden=3, classes=2)  # head: 2 x 3 + 2 = 8 parameters
    x, y = environments(1, classes=2)[0]
    head = list(net[2].parameters())
    g = head_gradient(F.cross_entropy(net(x), y), head)
    # E over uniform Rademacher z = the average over all 2^P patterns (z and -z give the same product)
    patterns = torch.tensor([(1.0,) + s for s in itertools.product((1.0, -1.0), repeat=7)], dtype=D64)
    D = hutchinson_diagonal(g, head, patterns)
    loss, theta = head_loss(net, (x, y))
    H = torch.autograd.functional.hessian(loss, theta.detach())
    assert torch.allclose(D, H.diagonal(), rtol=0, atol=1e-12)
    assert not torch.allclose(hutchinson_diagonal(g, head, patterns[:5]), H.diagonal(), atol=1e-3)


def test_hutchinson_diagonal_is_unbiased_with_exact_error_bars():
    net = tiny(hidden=3, classes=2)
    x, y = environments(1, classes=2)[0]
    head = list(net[2].parameters())
    g = head_gradient(F.cross_entropy(net(x), y), head, create_graph=True)
    loss, theta = head_loss(net, (x, y))
    H = torch.autograd.functional.hessian(loss, theta.detach())
    S = 1500
    gen = torch.Generator().manual_seed(5)
    probes = rademacher_probes(S, H.shape[0], gen, D64)
    assert set(probes.unique().tolist()) == {-1.0, 1.0}
    with torch.no_grad():
        D = hutchinson_diagonal(g, head, probes, create_graph=False)
    # one probe's error on entry i is sum_{j != i} H_ij z_i z_j: mean 0, variance sum_{j != i} H_ij^2
    sigma = ((H.pow(2).sum(1) - H.diagonal().pow(2)) / S).sqrt()
    assert (sigma < 0.1 * H.diagonal().abs()).all()  # error bars tight enough to detect a bias
    z = (D - H.diagonal()) / sigma
    assert z.abs().max() < 4.0, z


def dense_reference(net, envs, alpha, beta, variant, detach, probes=None):
    """The penalized loss from dense head Hessians (torch.autograd.functional.hessian)."""
    losses, grads, hessians = [], [], []
    for env in envs:
        loss, theta = head_loss(net, env)
        losses.append(loss(theta))
        grads.append(torch.autograd.functional.jacobian(loss, theta, create_graph=True))
        hessians.append(torch.autograd.functional.hessian(loss, theta, create_graph=True))
    g_bar, H_bar = torch.stack(grads).mean(0), torch.stack(hessians).mean(0)
    if variant == "hgp":
        A = [H @ g for H, g in zip(hessians, grads)]
        A_bar = H_bar @ g_bar
    else:
        A = [(probes * (probes @ H)).mean(0) for H in hessians]
        A_bar = (probes * (probes @ H_bar)).mean(0)
    if detach:
        g_bar, A_bar = g_bar.detach(), A_bar.detach()
    hess = torch.stack([(a - A_bar).pow(2).sum() for a in A]).mean()
    grad = torch.stack([(g - g_bar).pow(2).sum() for g in grads]).mean()
    return torch.stack(losses).mean() + alpha * hess + beta * grad, hess, grad


def gradients(net, loss):
    net.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in net.named_parameters()}


@pytest.mark.parametrize("variant", ["hgp", "hutchinson"])
def test_penalty_and_gradients_equal_dense_reference(variant):
    envs = environments(3)
    alpha, beta, S = 0.7, 0.3, 4
    values, grads = {}, {}
    for detach in (True, False):
        net = tiny()
        align = HessianAlignment(net, head="2", alpha=alpha, beta=beta, variant=variant, num_probes=S,
                                 detach_mean=detach, seed=11)
        total, parts = align(envs)
        got = gradients(net, total)
        probes = rademacher_probes(S, 15, torch.Generator().manual_seed(11), D64)  # the class's first draw
        ref, hess, grad = dense_reference(net, envs, alpha, beta, variant, detach, probes)
        want = gradients(net, ref)
        assert abs(total.item() - ref.item()) < 1e-12
        assert abs(parts.hessian_penalty - hess.item()) < 1e-12 and abs(parts.gradient_penalty - grad.item()) < 1e-12
        assert parts.total == total.item() and abs(parts.erm + parts.penalty - parts.total) < 1e-15
        assert parts.hessian_penalty > 1e-6 and parts.gradient_penalty > 1e-4
        for name in want:
            assert torch.allclose(got[name], want[name], rtol=0, atol=1e-10), name
        values[detach], grads[detach] = total.item(), got
    # detach_mean: same value. The gradient through a mean that is the exact average of the terms
    # vanishes (sum_e (a_e - mean a) = 0): g-bar and the Hutchinson D-bar; HGP's H-bar g-bar is not the
    # average of the H_e g_e, so there the gradients differ, in the featurizer and the head.
    assert values[True] == pytest.approx(values[False], rel=0, abs=1e-14)
    for name in ("0.weight", "2.weight"):
        change = (grads[True][name] - grads[False][name]).abs().max()
        assert change > 1e-6 if variant == "hgp" else change < 1e-15


def test_penalty_gradients_reach_the_featurizer():
    envs = environments(2)
    net = tiny()
    align = HessianAlignment(net, head=("2.weight", "2.bias"), alpha=1.0, beta=1.0)
    with_penalty = gradients(net, align(envs, weight=1.0)[0])
    erm_only = gradients(net, align(envs, weight=0.0)[0])
    ref_pen = dense_reference(net, envs, 1.0, 1.0, "hgp", True)[0] - dense_reference(net, envs, 0, 0, "hgp", True)[0]
    ref = gradients(net, ref_pen)
    for name in ("0.weight", "0.bias"):
        penalty_grad = with_penalty[name] - erm_only[name]
        assert penalty_grad.abs().max() > 1e-4
        assert torch.allclose(penalty_grad, ref[name], rtol=0, atol=1e-10)


def test_batches_and_losses_give_the_same_result():
    envs = environments(2)
    net = tiny()
    a = HessianAlignment(net, head="2", alpha=0.5, beta=0.5, variant="hutchinson", num_probes=3, seed=4)
    b = HessianAlignment(net, head="2", alpha=0.5, beta=0.5, variant="hutchinson", num_probes=3, seed=4)
    state = torch.get_rng_state()
    from_batches, pa = a(envs)
    from_losses, pb = b([F.cross_entropy(net(x), y) for x, y in envs])
    assert torch.equal(state, torch.get_rng_state())  # the private generator only
    assert abs(from_batches.item() - from_losses.item()) < 1e-14 and pa.env_losses == pytest.approx(pb.env_losses)
    assert a(envs)[1].hessian_penalty != pa.hessian_penalty  # fresh probes at the next call


def test_head_selection_by_name_prefix_and_filter():
    net = tiny()
    by_prefix = HessianAlignment(net, head="2")
    by_names = HessianAlignment(net, head=("2.weight", "2.bias"))
    by_filter = HessianAlignment(net, head=lambda n, p: n.startswith("2."))
    assert by_prefix.head_names == by_names.head_names == by_filter.head_names == ["2.weight", "2.bias"]
    assert by_prefix.num_head_parameters == 15
    with pytest.raises(ValueError, match="'fc' is not in the model"):
        HessianAlignment(net, head="fc")
    with pytest.raises(ValueError, match="did you mean '2.bias'"):
        HessianAlignment(net, head="2.bais")
    with pytest.raises(ValueError, match="head must name"):
        HessianAlignment(net, head=None)
    net[2].bias.requires_grad_(False)
    with pytest.raises(ValueError, match="do not require grad"):
        HessianAlignment(net, head="2")


def test_refusals():
    net = tiny()
    envs = environments(2)
    align = HessianAlignment(net, head="2")
    with pytest.raises(ValueError, match="variant"):
        HessianAlignment(net, head="2", variant="fishr")
    with pytest.raises(ValueError, match="num_probes"):
        HessianAlignment(net, head="2", num_probes=0)
    with pytest.raises(ValueError, match="alpha"):
        HessianAlignment(net, head="2", alpha=-1.0)
    with pytest.raises(TypeError, match="must all be scalar loss tensors or all"):
        align([envs[0], F.cross_entropy(net(envs[1][0]), envs[1][1])])
    with pytest.raises(ValueError, match="environment 1 must be a scalar"):
        align([F.cross_entropy(net(x), y, reduction=r) for (x, y), r in zip(envs, ("mean", "none"))])
    with pytest.raises(ValueError, match="does not depend on the head"):
        align([net[0](x).sum() for x, _ in envs])
    with pytest.raises(ValueError, match="at least one environment"):
        align([])


def test_hutchinson_per_probe_fallback_equals_the_batched_products(monkeypatch):
    net = tiny()
    x, y = environments(1)[0]
    head = list(net[2].parameters())
    g = head_gradient(F.cross_entropy(net(x), y), head)
    probes = rademacher_probes(6, 15, torch.Generator().manual_seed(0), D64)
    batched = hutchinson_diagonal(g, head, probes)
    grad = torch.autograd.grad

    def no_vmap(*args, **kwargs):
        if kwargs.get("is_grads_batched"):
            raise RuntimeError("no batching rule")
        return grad(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", no_vmap)
    looped = hutchinson_diagonal(g, head, probes)
    assert torch.allclose(batched, looped, rtol=0, atol=1e-14) and batched.abs().max() > 1e-3
