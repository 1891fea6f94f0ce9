"""Triton row-norm kernels (normlab/kernels/triton_rows.py) against a float64 reference.

Runs on CUDA when available, else in Triton's CPU interpreter (conftest sets TRITON_INTERPRET),
so shapes are small. The reference is plain float64 torch ops on the same rounded inputs;
gradients come from torch.autograd through it.
"""
import pytest

pytest.importorskip("triton")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from normlab.kernels import triton_rows as T  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS = 1e-5
# (rtol, atol) per dtype: a few units of the output's rounding on top of fp32 arithmetic.
TOL = {
    torch.float32: (2e-5, 2e-5),
    torch.float64: (1e-12, 1e-12),
    torch.float16: (4e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 8e-3),
}


def _rand(*shape, dtype=torch.float32, scale=1.0, offset=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=torch.float64) * scale + offset
    return x.to(dtype).to(DEVICE)


def _reference(h, weight, bias, centered, eps=EPS):
    """float64 y, mean, rstd of rows of h (differentiable)."""
    mean = h.mean(-1, keepdim=True) if centered else torch.zeros_like(h[:, :1])
    var = (h - mean).square().mean(-1, keepdim=True)
    rstd = (var + eps).rsqrt()
    y = (h - mean) * rstd
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y, mean[:, 0], rstd[:, 0]


def _close(actual, expected, dtype, scale=1.0):
    """Compare to the float64 reference, relative to ``scale`` (the data's magnitude)."""
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(),
                               rtol=rtol, atol=atol * scale)


def _check(x, weight, bias, centered, residual=None, dh=None, block=None, seed=1):
    """Forward and backward against the float64 reference; returns the kernels' outputs."""
    dtype = x.dtype
    y, h, mean, rstd = T.rows_forward(x, weight, bias, EPS, centered, residual, block=block)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert y.dtype == dtype and mean.dtype == acc and rstd.dtype == acc
    if residual is None:
        assert h is None
        h = x
    else:
        assert torch.equal(h, x + residual)  # bitwise torch's sum, in x's dtype
    h64 = h.double().requires_grad_()
    w64 = None if weight is None else weight.double().requires_grad_()
    b64 = None if bias is None else bias.double().requires_grad_()
    y_ref, mean_ref, rstd_ref = _reference(h64, w64, b64, centered)
    _close(y, y_ref.detach(), dtype)
    _close(mean, mean_ref.detach(), torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(rstd.double(), rstd_ref.detach(),
                               rtol=1e-12 if dtype == torch.float64 else 1e-5, atol=0)

    dy = _rand(*x.shape, dtype=dtype, seed=seed)
    dx, dw, db = T.rows_backward(dy, h, weight, mean, rstd, centered, dh, block=block)
    y_ref.backward(dy.double())
    dx_ref = h64.grad + (0 if dh is None else dh.double())
    assert dx.dtype == dtype and dw.dtype == acc and db.dtype == acc
    # dx cancels g - <g> - xhat <g xhat>: errors scale with |g| rstd, not with |dx|.
    g = dy.double().abs() * (1 if weight is None else weight.double().abs())
    scale = max(dx_ref.abs().max().item(), (g * rstd_ref.detach()[:, None]).max().item())
    _close(dx, dx_ref, dtype, scale)
    acc_dt = torch.float64 if dtype == torch.float64 else torch.float32
    dw_ref = (dy.double() * ((h64 - mean_ref[:, None]) * rstd_ref[:, None])).sum(0).detach()
    _close(dw, dw_ref, acc_dt, max(1.0, dw_ref.abs().max().item()))
    _close(db, dy.double().sum(0), acc_dt, max(1.0, x.shape[0] ** 0.5))
    if w64 is not None:
        _close(dw, w64.grad, acc_dt, max(1.0, w64.grad.abs().max().item()))
    if b64 is not None:
        _close(db, b64.grad, acc_dt, max(1.0, x.shape[0] ** 0.5))
    return y, h, mean, rstd, dx, dw, db


DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
SHAPES = [(1, 1), (3, 5), (7, 33), (3, 130), (7, 130)]  # M in {1, 3, 7}, N in {1, 5, 33, 130}


@pytest.mark.parametrize("centered", [True, False], ids=["layer", "rms"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_float64_reference(shape, dtype, centered):
    m, n = shape
    x = _rand(m, n, dtype=dtype, scale=2.0, offset=0.5)  # not zero-mean
    w = _rand(n, dtype=dtype, offset=1.0, seed=2)
    b = _rand(n, dtype=dtype, seed=3) if centered else None
    _check(x, w, b, centered)


@pytest.mark.parametrize("centered", [True, False], ids=["layer", "rms"])
@pytest.mark.parametrize("affine", ["none", "weight", "bias", "both"])
def test_affine_variants(affine, centered):
    x = _rand(5, 33, scale=3.0, offset=-1.0)
    w = _rand(33, offset=1.0, seed=2) if affine in ("weight", "both") else None
    b = _rand(33, seed=3) if affine in ("bias", "both") else None
    _check(x, w, b, centered)


@pytest.mark.parametrize("centered", [True, False], ids=["layer", "rms"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_residual_add(dtype, centered):
    x = _rand(7, 130, dtype=dtype, scale=2.0, offset=0.5)
    r = _rand(7, 130, dtype=dtype, scale=3.0, offset=-0.25, seed=4)
    w = _rand(130, dtype=dtype, offset=1.0, seed=2)
    dh = _rand(7, 130, dtype=dtype, seed=5)
    _check(x, w, _rand(130, dtype=dtype, seed=3) if centered else None, centered,
           residual=r, dh=dh)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("centered", [True, False], ids=["layer", "rms"])
def test_wide_rows_loop_matches_one_block(centered, dtype):
    """N=300 with block=64: the chunked kernels (Chan-merged statistics; row sums, then a
    column-chunk grid) agree with the reference and with the one-block kernels."""
    m, n = 5, 300
    x = _rand(m, n, dtype=dtype, scale=2.0, offset=3.0)
    r = _rand(m, n, dtype=dtype, seed=4)
    w = _rand(n, dtype=dtype, offset=1.0, seed=2)
    b = _rand(n, dtype=dtype, seed=3) if centered else None
    dh = _rand(m, n, dtype=dtype, seed=5)
    looped = _check(x, w, b, centered, residual=r, dh=dh, block=64)
    whole = _check(x, w, b, centered, residual=r, dh=dh)
    scale = (1.0, 1.0, 1.0, 1.0, looped[4].abs().max().item(), 1.0, 1.0)
    for a, e, s in zip(looped, whole, scale):
        if dtype == torch.float32:
            torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5 * s)
        else:  # outputs may differ by one bf16 rounding
            torch.testing.assert_close(a.float(), e.float(), rtol=1e-2, atol=1e-2 * s)


def test_large_mean_fp32():
    """1e4 + N(0, 1): no cancellation in the variance, one block or chunked; a first element
    far from the mean (the chunks' shift) does not cancel either."""
    m, n = 4, 200
    x = _rand(m, n, offset=1e4)
    x64 = x.double()
    var = (x64 - x64.mean(-1, keepdim=True)).square().mean(-1)
    rstd_ref = (var + EPS).rsqrt()
    y_ref = (x64 - x64.mean(-1, keepdim=True)) * rstd_ref[:, None]
    for block in (None, 64):
        y, _, mean, rstd = T.rows_forward(x, None, None, EPS, True, block=block)
        torch.testing.assert_close(rstd.double().cpu(), rstd_ref.cpu(), rtol=1e-5, atol=0)
        torch.testing.assert_close(mean.double().cpu(), x64.mean(-1).cpu(), rtol=1e-7, atol=0)
        # corrected two-pass (one block) or shifted chunks: y to ~1e-6, not torch's ~1e-3
        torch.testing.assert_close(y.double().cpu(), y_ref.cpu(), rtol=0, atol=1e-5)
    x = _rand(2, n, seed=7)
    x[:, 0] = 1e4
    x64 = x.double()
    rstd_ref = ((x64 - x64.mean(-1, keepdim=True)).square().mean(-1) + EPS).rsqrt()
    _, _, _, rstd = T.rows_forward(x, None, None, EPS, True, block=64)
    torch.testing.assert_close(rstd.double().cpu(), rstd_ref.cpu(), rtol=1e-5, atol=0)


def test_fp16_squares_overflowing_fp16():
    x = _rand(3, 64, dtype=torch.float16, scale=300.0, offset=200.0)  # x^2 > 65504
    for centered in (True, False):
        y, _, _, rstd = T.rows_forward(x, None, None, EPS, centered)
        assert torch.isfinite(y).all() and torch.isfinite(rstd).all()
        y_ref, _, _ = _reference(x.double(), None, None, centered)
        _close(y, y_ref, torch.float16, 1.0)


@pytest.mark.parametrize("block", [None, 64])
def test_deterministic_and_independent_of_programs(block, monkeypatch):
    """Two runs are bitwise equal; another number of programs changes only the rounding."""
    m, n = (6, 200) if block else (40, 1000)  # several rows or row tiles per program
    x = _rand(m, n, scale=2.0, offset=0.5)
    w, b = _rand(n, offset=1.0, seed=2), _rand(n, seed=3)
    dy = _rand(m, n, seed=6)

    def run():
        y, _, mean, rstd = T.rows_forward(x, w, b, EPS, True, block=block)
        return (y, mean, rstd) + T.rows_backward(dy, x, w, mean, rstd, True, block=block)

    first, second = run(), run()
    for a, c in zip(first, second):
        assert torch.equal(a, c)
    if DEVICE == "cpu":
        monkeypatch.setattr(T, "_CPU_PROGRAMS", 1)
        for a, c in zip(first, run()):
            torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block", [None, 64])
def test_need_flags(block):
    x = _rand(3, 130, scale=2.0, offset=0.5)
    w, b = _rand(130, offset=1.0, seed=2), _rand(130, seed=3)
    y, _, mean, rstd = T.rows_forward(x, w, b, EPS, True, block=block)
    dy = _rand(3, 130, seed=6)
    full = T.rows_backward(dy, x, w, mean, rstd, True, block=block)
    for need in [(False, True, True), (True, False, False), (False, False, True),
                 (False, False, False)]:
        got = T.rows_backward(dy, x, w, mean, rstd, True, need_dx=need[0], need_dw=need[1],
                              need_db=need[2], block=block)
        for flag, g, f in zip(need, got, full):
            if flag:
                torch.testing.assert_close(g, f, rtol=0, atol=0)
            else:
                assert g is None


def test_torch_functional_spot_check():
    x = _rand(6, 48, scale=2.0, offset=0.5)
    w, b = _rand(48, offset=1.0, seed=2), _rand(48, seed=3)
    dy = _rand(6, 48, seed=6)
    for centered in (True, False):
        xt, wt = x.clone().requires_grad_(), w.clone().requires_grad_()
        bt = b.clone().requires_grad_() if centered else None
        if centered:
            out = F.layer_norm(xt, (48,), wt, bt, EPS)
        else:
            out = F.rms_norm(xt, (48,), wt, EPS)
        out.backward(dy)
        y, _, mean, rstd = T.rows_forward(x, w, b if centered else None, EPS, centered)
        dx, dw, db = T.rows_backward(dy, x, w, mean, rstd, centered)
        torch.testing.assert_close(y, out.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(dx, xt.grad, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(dw, wt.grad, rtol=1e-5, atol=1e-5)
        if centered:
            torch.testing.assert_close(db, bt.grad, rtol=1e-5, atol=1e-5)


def test_float64_eps_is_not_rounded_to_float32():
    x = _rand(3, 16, dtype=torch.float64, scale=1e-4)  # variance ~ eps: eps matters
    eps = 1.1e-8  # not a float32 value
    _, _, _, rstd = T.rows_forward(x, None, None, eps, True)
    var = (x - x.mean(-1, keepdim=True)).square().mean(-1)
    torch.testing.assert_close(rstd, (var + eps).rsqrt(), rtol=1e-13, atol=0)


@pytest.mark.parametrize("shape", [(0, 5), (3, 0), (0, 0)])
def test_empty(shape):
    m, n = shape
    x = torch.empty(m, n, device=DEVICE)
    w = torch.ones(n, device=DEVICE)
    y, h, mean, rstd = T.rows_forward(x, w, None, EPS, True, torch.empty_like(x))
    assert y.shape == (m, n) and h.shape == (m, n) and mean.shape == rstd.shape == (m,)
    assert (mean == 0).all()
    dx, dw, db = T.rows_backward(x, x, w, mean, rstd, True)
    assert dx.shape == (m, n) and dw.shape == db.shape == (n,)
    assert (dw == 0).all() and (db == 0).all()
