"""The hand-written backward of every norm against finite differences in float64
(torch.autograd.gradcheck), for x, weight and bias, in every mode that has a distinct backward:
statistics from the input (training), given statistics (BatchNorm eval, InstanceNorm without
input statistics), uncentered (RMSNorm), grouped views (GroupNorm), several normalized axes,
and channels_last inputs."""
import pytest
import torch
from torch.autograd import gradcheck

import normlab
import normlab.functional as F


def _t(*shape, seed, scale=1.5, offset=0.7, grad=True, channels_last=False):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(*shape, generator=g, dtype=torch.float64) * scale + offset
    if channels_last:
        t = t.contiguous(memory_format=torch.channels_last)
    return t.requires_grad_(grad)


def _pos(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(*shape, generator=g, dtype=torch.float64) + 0.5


CASES = {
    "batch_norm-train": (
        lambda x, w, b: F.batch_norm(x, None, None, w, b, training=True, eps=1e-3), (3, 4, 5)),
    "batch_norm-train-4d-running": (
        lambda x, w, b: F.batch_norm(
            x, torch.zeros(4, dtype=x.dtype), torch.ones(4, dtype=x.dtype), w, b,
            training=True, momentum=0.3, eps=1e-3),
        (2, 4, 3, 3)),
    "batch_norm-eval": (
        lambda x, w, b: F.batch_norm(
            x, _t(4, seed=9, grad=False), _pos(4, seed=10), w, b, training=False),
        (3, 4, 5)),
    "instance_norm": (
        lambda x, w, b: F.instance_norm(x, weight=w, bias=b, eps=1e-3), (2, 4, 6)),
    "instance_norm-running": (
        lambda x, w, b: F.instance_norm(
            x, _t(4, seed=11, grad=False), _pos(4, seed=12), w, b, use_input_stats=False),
        (2, 4, 6)),
    "group_norm": (lambda x, w, b: F.group_norm(x, 2, w, b, eps=1e-3), (2, 4, 3, 2)),
    "group_norm-2d-input": (lambda x, w, b: F.group_norm(x, 3, w, b, eps=1e-3), (3, 6)),
}


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("name", list(CASES))
def test_channel_norms_gradcheck(name, channels_last):
    fn, shape = CASES[name]
    if channels_last and len(shape) != 4:
        pytest.skip("channels_last needs a 4-D input")
    c = shape[1]
    x = _t(*shape, seed=1, channels_last=channels_last)
    w, b = _t(c, seed=2), _t(c, seed=3)
    assert gradcheck(fn, (x, w, b), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("normalized", [(5,), (3, 4)])
def test_layer_norm_gradcheck(normalized):
    x = _t(2, 3, *normalized, seed=4) if len(normalized) == 1 else _t(2, *normalized, seed=4)
    w, b = _t(*normalized, seed=5), _t(*normalized, seed=6)
    assert gradcheck(lambda x, w, b: F.layer_norm(x, normalized, w, b, eps=1e-3), (x, w, b),
                     eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("normalized", [(5,), (3, 4)])
def test_rms_norm_gradcheck(normalized):
    x = _t(2, 3, *normalized, seed=7) if len(normalized) == 1 else _t(2, *normalized, seed=7)
    w = _t(*normalized, seed=8)
    assert gradcheck(lambda x, w: F.rms_norm(x, normalized, w, eps=1e-3), (x, w),
                     eps=1e-6, atol=1e-6, rtol=1e-5)


def test_unbatched_rows_gradcheck():
    # An input of exactly normalized_shape: the parameters vary along every axis.
    x, w, b = _t(6, seed=13), _t(6, seed=14), _t(6, seed=15)
    assert gradcheck(lambda x, w, b: F.layer_norm(x, 6, w, b), (x, w, b), eps=1e-6, atol=1e-6)
    assert gradcheck(lambda x, w: F.rms_norm(x, 6, w), (x, w), eps=1e-6, atol=1e-6)


def test_without_affine_gradcheck():
    x = _t(3, 4, 5, seed=16)
    for fn in (
        lambda x: F.batch_norm(x, None, None, training=True),
        lambda x: F.instance_norm(x),
        lambda x: F.group_norm(x, 2),
        lambda x: F.layer_norm(x, (4, 5)),
        lambda x: F.rms_norm(x, 5),
    ):
        assert gradcheck(fn, (x,), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", list(CASES))
def test_second_derivatives_gradgradcheck(name):
    """Double backward (gradient penalties) through the hand-written backward."""
    fn, shape = CASES[name]
    c = shape[1]
    x, w, b = _t(*shape, seed=18), _t(c, seed=19), _t(c, seed=20)
    assert torch.autograd.gradgradcheck(fn, (x, w, b), eps=1e-6, atol=1e-5, rtol=1e-4)


def test_second_derivatives_rows_and_gradient_penalty():
    x, w, b = _t(3, 5, seed=21), _t(5, seed=22), _t(5, seed=23)
    assert torch.autograd.gradgradcheck(lambda x, w, b: F.layer_norm(x, 5, w, b), (x, w, b))
    assert torch.autograd.gradgradcheck(lambda x, w: F.rms_norm(x, 5, w), (x, w))
    # gradient penalty with an upstream gradient that does not require grad (the silent case)
    (g,) = torch.autograd.grad(F.layer_norm(x, 5).pow(2).sum(), x, create_graph=True)
    assert g.requires_grad
    (gg,) = torch.autograd.grad(g.pow(2).sum(), x)
    xt = x.detach().clone().requires_grad_()
    (gt,) = torch.autograd.grad(
        torch.nn.functional.layer_norm(xt, [5]).pow(2).sum(), xt, create_graph=True)
    (ggt,) = torch.autograd.grad(gt.pow(2).sum(), xt)
    torch.testing.assert_close(gg, ggt)


def test_backward_keeps_forward_accuracy_at_large_mean():
    """Backward recomputes x_hat with the forward's centring offsets, not a rounded mean."""
    g = torch.Generator().manual_seed(24)
    x = (1e5 + torch.randn(8, 4, 30, 30, generator=g)).requires_grad_()
    w = torch.randn(4, generator=g).requires_grad_()
    dy = torch.randn(x.shape, generator=g)
    with normlab.backend("cpu" if "cpu" in normlab.available_backends() else "reference"):
        F.batch_norm(x, None, None, w, None, training=True).backward(dy)
    xd, wd = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    torch.nn.functional.batch_norm(xd, None, None, wd, None, training=True).backward(dy.double())
    assert ((w.grad.double() - wd.grad).abs().max() / wd.grad.abs().max()).item() < 1e-4
    assert ((x.grad.double() - xd.grad).abs().max() / xd.grad.abs().max()).item() < 1e-4
