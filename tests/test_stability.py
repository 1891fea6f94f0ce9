"""Numerical stability of every norm against float64 references written from the formulas."""
import pytest
import torch

import normlab
import normlab.functional as F


@pytest.fixture(autouse=True)
def _normlab_computes():
    """These tests check normlab's own statistics (the fused kernels; the reference engine
    without Numba): ``auto`` would hand small cells to ATen, whose numerics are torch's."""
    with normlab.backend("cpu" if "cpu" in normlab.available_backends() else "reference"):
        yield


def _x(shape, offset, scale, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (offset + scale * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)


def _ref(x, dims, centered=True, eps=1e-5):
    """Float64 normalization over ``dims`` of the (already rounded) input."""
    x = x.double()
    mean = x.mean(dims, keepdim=True) if centered else 0.0
    var = ((x - mean) ** 2).mean(dims, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps)


CENTERED = {
    "batch_norm": (lambda x: F.batch_norm(x, None, None, training=True), (0, 2, 3)),
    "instance_norm": (lambda x: F.instance_norm(x), (2, 3)),
    "layer_norm": (lambda x: F.layer_norm(x, x.shape[1:]), (1, 2, 3)),
    "group_norm": (lambda x: F.group_norm(x.reshape(4, 8, 12, 12), 1).reshape(x.shape),
                   (1, 2, 3)),
}


@pytest.mark.parametrize("offset", [1e4, 1e5])
@pytest.mark.parametrize("norm", list(CENTERED))
def test_large_mean_fp32(norm, offset):
    """fp32 1e4 + N(0,1) (and 1e5) normalizes to within 1e-3 of float64: a one-pass
    E[x^2] - E[x]^2 loses every digit here, and even an exactly rounded fp32 mean is off by
    ulp(offset)/2 (4.9e-4 at 1e4, 3.9e-3 at 1e5)."""
    fn, dims = CENTERED[norm]
    x = _x((4, 8, 12, 12), offset, 1.0, torch.float32)
    err = (fn(x).double() - _ref(x, dims)).abs().max().item()
    assert err < 1e-3, err


FP16 = {
    "batch_norm": (lambda x: F.batch_norm(x, None, None, training=True), (0, 2, 3), True),
    "instance_norm": (lambda x: F.instance_norm(x), (2, 3), True),
    "layer_norm": (lambda x: F.layer_norm(x, x.shape[-1:]), (3,), True),
    "group_norm": (lambda x: F.group_norm(x, 2), None, True),
    "rms_norm": (lambda x: F.rms_norm(x, x.shape[-1:], eps=1e-5), (3,), False),
}


@pytest.mark.parametrize("norm", list(FP16))
def test_fp16_squares_overflow(norm):
    """Values ~1000 +- 300: their squares (~1e6) overflow fp16 (max 65504), the statistics
    must not."""
    fn, dims, centered = FP16[norm]
    x = _x((4, 4, 6, 64), 1000.0, 300.0, torch.float16)
    assert torch.isinf(x.float().square().half()).any()  # the case is real
    y = fn(x)
    assert y.dtype == torch.float16 and torch.isfinite(y).all()
    if dims is None:  # group_norm with 2 groups of 2 channels
        ref = _ref(x.reshape(4, 2, 2, 6, 64), (2, 3, 4)).reshape(x.shape)
    else:
        ref = _ref(x, dims, centered)
    err = (y.double() - ref).abs().max().item()
    assert err < 4e-3 * ref.abs().max().item(), err


def test_constant_input_gives_zeros_not_nan():
    """Zero variance: (x - mean) is exactly 0, so the output is 0 (the bias), never NaN."""
    x = torch.full((3, 4, 5), 7.25)
    for y in (F.layer_norm(x, 5), F.instance_norm(x), F.group_norm(x, 2),
              F.batch_norm(x, None, None, training=True)):
        assert torch.equal(y, torch.zeros_like(y))
