"""MaskedBatchNorm1d against its definition: torch's BatchNorm1d on the concatenated real
positions (forward, running statistics, gradients), torch's BatchNorm1d itself without a mask,
and every bad mask."""
from __future__ import annotations

import copy

import pytest
import torch
from torch.testing import assert_close

from normlab.nn.masked import MaskedBatchNorm1d

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float64: dict(atol=1e-10, rtol=1e-10)}
DTYPES = [torch.float32, torch.float64]
KWARGS = [
    {},
    {"momentum": None},
    {"momentum": 0.3, "affine": False},
    {"track_running_stats": False},
    {"eps": 1e-3},
]


def _pair(dtype, c=4, **kwargs):
    """Our module and a torch.nn.BatchNorm1d with the same (randomized) state."""
    ours = MaskedBatchNorm1d(c, dtype=dtype, **kwargs)
    with torch.no_grad():
        if ours.affine:
            ours.weight.copy_(torch.rand(c, dtype=dtype) + 0.5)
            ours.bias.copy_(torch.randn(c, dtype=dtype))
        if ours.track_running_stats:
            ours.running_mean.copy_(torch.randn(c, dtype=dtype))
            ours.running_var.copy_(torch.rand(c, dtype=dtype) + 0.5)
    ref = torch.nn.BatchNorm1d(c, dtype=dtype, **kwargs)
    ref.load_state_dict(ours.state_dict())
    return ours, ref


def _masks(n, length, gen):
    """Masks of several kinds: prefix masks of uneven lengths (one sample full, one of length
    1), and an arbitrary random pattern (holes in the middle)."""
    lengths = torch.randint(1, length + 1, (n,), generator=gen)
    lengths[-1] = 1
    lengths[0] = length  # (for n = 1 the only sample is full: two real positions at least)
    prefix = torch.arange(length)[None] < lengths[:, None]
    holes = torch.rand(n, length, generator=gen) < 0.6
    holes[0, :2] = holes[-1, 0] = True
    return [prefix, holes]


def _input(shape, dtype, gen):
    # Not zero-mean, not unit-variance: a centring bug cannot hide.
    return (torch.randn(shape, generator=gen, dtype=dtype) * 3 + 5).requires_grad_()


def _real_rows(x, mask):
    """The (n, C) concatenation of the real positions of x (N, C, L) or (N, C)."""
    return (x.transpose(1, 2) if x.dim() == 3 else x)[mask]


def _params_grads(m):
    return [p.grad for p in (m.weight, m.bias) if p is not None]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kwargs", KWARGS, ids=str)
@pytest.mark.parametrize("shape", [(6, 4), (5, 4, 7)])
def test_no_mask_is_torch_batchnorm1d(shape, kwargs, dtype):
    gen = torch.Generator().manual_seed(0)
    ours, ref = _pair(dtype, **kwargs)
    for training in (True, True, False):
        ours.train(training), ref.train(training)
        x = _input(shape, dtype, gen)
        xr = x.detach().clone().requires_grad_()
        y, yr = ours(x), ref(xr)
        assert_close(y, yr, **TOL[dtype])
        g = torch.randn(y.shape, generator=gen, dtype=dtype)
        y.backward(g), yr.backward(g)
        assert_close(x.grad, xr.grad, **TOL[dtype])
        for a, b in zip(_params_grads(ours), _params_grads(ref)):
            assert_close(a, b, **TOL[dtype])
        for name, buf in ref.named_buffers():
            assert_close(getattr(ours, name), buf, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kwargs", KWARGS, ids=str)
@pytest.mark.parametrize("shape", [(5, 4, 7), (3, 4, 1), (1, 4, 9), (8, 4)])
def test_mask_is_torch_batchnorm1d_on_the_real_positions(shape, kwargs, dtype):
    """Over three training steps and an eval step: the output on real positions, zeros on
    padding, the running statistics and num_batches_tracked, and the gradients of the input
    (zero on padding) and of weight and bias all equal torch's BatchNorm1d on the concatenation
    of the real positions."""
    gen = torch.Generator().manual_seed(1)
    ours, ref = _pair(dtype, **kwargs)
    steps = 0
    for training in (True, True, True, False):
        ours.train(training), ref.train(training)
        if len(shape) == 3:
            masks = _masks(shape[0], shape[2], gen)
        else:
            masks = [torch.tensor([True, False, True, True, False, True, False, True])]
        for mask in masks:
            x = _input(shape, dtype, gen)
            xr = x.detach().clone().requires_grad_()
            for p in list(ours.parameters()) + list(ref.parameters()):
                p.grad = None
            y = ours(x, mask)
            real = _real_rows(xr, mask)
            yr = ref(real)
            assert y.shape == x.shape and y.dtype == x.dtype
            assert_close(_real_rows(y, mask), yr, **TOL[dtype])
            padded = _real_rows(y, ~mask)
            assert torch.equal(padded, torch.zeros_like(padded))
            g = torch.randn(y.shape, generator=gen, dtype=dtype)
            y.backward(g)
            yr.backward(_real_rows(g, mask))
            assert_close(_real_rows(x.grad, mask), _real_rows(xr.grad, mask), **TOL[dtype])
            padded_grad = _real_rows(x.grad, ~mask)
            assert torch.equal(padded_grad, torch.zeros_like(padded_grad))
            for a, b in zip(_params_grads(ours), _params_grads(ref)):
                assert_close(a, b, **TOL[dtype])
            steps += training
            for name, buf in ref.named_buffers():
                assert_close(getattr(ours, name), buf, **TOL[dtype])
    if ours.track_running_stats:
        assert int(ours.num_batches_tracked) == steps


def test_running_statistics_closed_form():
    """momentum=1: the running statistics are exactly the real positions' mean and unbiased
    variance; the padding's values (here huge) never enter."""
    x = torch.tensor([[[1.0, 2.0, 1e6]], [[6.0, -1e6, 1e6]]], dtype=torch.float64)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    m = MaskedBatchNorm1d(1, momentum=1.0, dtype=torch.float64)
    y = m(x, mask)
    real = torch.tensor([1.0, 2.0, 6.0], dtype=torch.float64)
    assert_close(m.running_mean, real.mean()[None])
    assert_close(m.running_var, real.var(unbiased=True)[None])
    expected = (real - real.mean()) / torch.sqrt(real.var(unbiased=False) + m.eps)
    assert_close(y[mask[:, None].expand_as(y)], expected)


def test_eval_ignores_padding_and_batch_composition():
    """In eval each real position is normalized by the running statistics alone: the same
    sequence gives the same output whatever it is batched and padded with."""
    gen = torch.Generator().manual_seed(2)
    m = MaskedBatchNorm1d(3)
    m(torch.randn(4, 3, 6, generator=gen), torch.rand(4, 6, generator=gen) < 0.7)
    m.eval()
    seq = torch.randn(1, 3, 5, generator=gen)
    alone = m(seq, torch.ones(1, 5, dtype=torch.bool))
    padded = torch.cat([torch.nn.functional.pad(seq, (0, 4)), torch.randn(2, 3, 9, generator=gen)])
    mask = torch.ones(3, 9, dtype=torch.bool)
    mask[0, 5:] = False
    assert_close(m(padded, mask)[:1, :, :5], alone)


def test_is_a_batchnorm_with_its_state_dict():
    ours, ref = MaskedBatchNorm1d(5), torch.nn.BatchNorm1d(5)
    assert isinstance(ours, torch.nn.BatchNorm1d)
    assert list(ours.state_dict()) == list(ref.state_dict())
    ref.running_mean.fill_(2.0)
    ours.load_state_dict(ref.state_dict(), strict=True)
    assert torch.equal(ours.running_mean, ref.running_mean)
    assert ref.load_state_dict(copy.deepcopy(ours.state_dict()), strict=True) is not None


def test_eval_with_no_real_position_gives_zeros():
    m = MaskedBatchNorm1d(2).eval()
    y = m(torch.randn(2, 2, 3), torch.zeros(2, 3, dtype=torch.bool))
    assert torch.equal(y, torch.zeros(2, 2, 3))


@pytest.mark.parametrize(
    "shape, mask, exc, match",
    [
        ((2, 3, 4), torch.ones(2, 5, dtype=torch.bool), ValueError,
         r"mask must have shape \(N, L\)"),
        ((2, 3, 4), torch.ones(4, 2, dtype=torch.bool), ValueError, r"\(2, 4\)"),
        ((2, 3, 4), torch.ones(2, 3, 4, dtype=torch.bool), ValueError, "mask must have shape"),
        ((2, 3), torch.ones(2, 3, dtype=torch.bool), ValueError, r"mask must have shape \(N,\)"),
        ((2, 3, 4), torch.ones(2, 4), TypeError, "mask must be a bool tensor"),
        ((2, 3, 4), torch.ones(2, 4, dtype=torch.int64), TypeError, "mask.bool()"),
        ((2, 3, 4), [[True] * 4] * 2, TypeError, "bool tensor or None"),
        ((2, 3, 4), torch.zeros(2, 4, dtype=torch.bool), ValueError, "no real position"),
        ((2, 3, 4), torch.tensor([[False, True, False, False], [False] * 4]), ValueError,
         "more than 1 value per channel"),
    ],
)
def test_errors(shape, mask, exc, match):
    m = MaskedBatchNorm1d(3)
    with pytest.raises(exc, match=match):
        m(torch.randn(shape), mask)
    assert int(m.num_batches_tracked) == 0  # a refused batch changes no state
    assert torch.equal(m.running_mean, torch.zeros(3))


def test_errors_are_runtime_errors_too_and_eval_without_stats_needs_two_values():
    m = MaskedBatchNorm1d(3, track_running_stats=False).eval()
    one = torch.zeros(2, 4, dtype=torch.bool)
    one[1, 2] = True
    with pytest.raises(RuntimeError, match="more than 1 value per channel"):
        m(torch.randn(2, 3, 4), one)
    with pytest.raises(ValueError, match="dimensional input|3D input|2D"):
        m(torch.randn(2, 3, 4, 5), torch.ones(2, 4, dtype=torch.bool))
