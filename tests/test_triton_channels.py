"""The Triton channel-norm kernels (``normlab.kernels.triton_channels``) against a float64
reference written here with plain torch ops (forward, and dx, dw, db by autograd on it), with
spot checks against ``torch.nn.functional``.

Covered: GroupNorm (groups 1, 2, 3, C), InstanceNorm (groups = C, and with running statistics
as given-statistics BatchNorm), BatchNorm training and with given statistics, forward and
backward; with and without weight/bias; NCHW and channels-last 4-D, (N, C, L) contiguous and
transposed (N, L, C)-dense, 5-D both ways, (N, C) inputs; float32/bfloat16/float16/float64;
odd sizes; tiny tiles so every loop and the split (partials + combine) path run; inputs at
1e4 + N(0, 1); bitwise determinism; outputs in x's memory layout; dy in another layout;
need_dx=False; empty inputs. Runs on CUDA when there is one, else in Triton's interpreter
(the top-level ``conftest.py`` sets ``TRITON_INTERPRET=1``), on small shapes.
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as TF

pytest.importorskip("triton")

from normlab.kernels import triton_channels as tc  # noqa: E402  (after the importorskip)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
F64, F32, F16, BF16 = torch.float64, torch.float32, torch.float16, torch.bfloat16
EPS = 1e-5
# relative to the scale of the expected values: outputs in x's dtype, statistics and parameter
# gradients in float32 (float64 for float64 x)
TOL_OUT = {F64: 1e-10, F32: 2e-5, F16: 4e-3, BF16: 2e-2}
TOL_ACC = {F64: 1e-10, F32: 2e-5, F16: 2e-5, BF16: 2e-5}


# --------------------------------------------------------------------------------------------
# inputs, reference and comparison
# --------------------------------------------------------------------------------------------


def make_x(shape, dtype=F32, layout="nchw", offset=0.6, seed=0):
    """A random input with a different mean per channel, in the given memory layout."""
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    per_channel = torch.linspace(-1.0, 2.0, c, dtype=F64).view(1, c, *([1] * (len(shape) - 2)))
    x = torch.randn(shape, generator=g, dtype=F64) * 1.7 + offset + per_channel
    x = x.to(dtype)
    if layout == "cl":
        x = x.movedim(1, -1).contiguous().movedim(-1, 1)
        assert len(shape) == 2 or not x.is_contiguous() or x.shape[1] == 1
    return x.to(DEVICE)


def make_params(c, affine="both", dtype=F32, seed=1):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(c, generator=g) * 0.5 + 1.0).to(dtype).to(DEVICE)
    b = torch.randn(c, generator=g).to(dtype).to(DEVICE)
    return (w if affine in ("both", "weight") else None), (b if affine == "both" else None)


def make_dy(x, seed=2):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(x.shape, generator=g) * 0.8 + 0.3).to(x.dtype).to(DEVICE)


def reference(x, w, b, dy, *, groups=None, mean=None, var=None):
    """float64 (y, dx, dw, db, mean, var): statistics per (sample, group) when ``groups`` is
    given, else per channel over (N, spatial) (BatchNorm) or the given ``mean``/``var``."""
    n, c = x.shape[:2]
    x64 = x.detach().to(F64).requires_grad_()
    w64 = None if w is None else w.detach().to(F64).requires_grad_()
    b64 = None if b is None else b.detach().to(F64).requires_grad_()
    per_c = (1, c) + (1,) * (x.dim() - 2)
    if groups is not None:
        xg = x64.reshape(n, groups, -1)
        mu = xg.mean(-1, keepdim=True)
        v = ((xg - mu) ** 2).mean(-1, keepdim=True)
        xhat = ((xg - mu) / torch.sqrt(v + EPS)).reshape(x.shape)
    elif var is None:
        dims = [0] + list(range(2, x.dim()))
        mu = x64.mean(dims, keepdim=True)
        v = ((x64 - mu) ** 2).mean(dims, keepdim=True)
        xhat = (x64 - mu) / torch.sqrt(v + EPS)
    else:
        mu = mean.detach().to(F64).view(per_c)
        v = var.detach().to(F64).view(per_c)
        xhat = (x64 - mu) / torch.sqrt(v + EPS)
    y = xhat
    if w64 is not None:
        y = y * w64.view(per_c)
    if b64 is not None:
        y = y + b64.view(per_c)
    inputs = [t for t in (x64, w64, b64) if t is not None]
    grads = list(torch.autograd.grad(y, inputs, dy.detach().to(F64)))
    dx = grads.pop(0)
    dw = grads.pop(0) if w is not None else (dy.to(F64) * xhat).sum([0] + list(range(2, x.dim())))
    db = grads.pop(0) if b is not None else dy.to(F64).sum([0] + list(range(2, x.dim())))
    return y.detach(), dx, dw.detach(), db.detach(), mu.detach().reshape(-1), v.detach().reshape(-1)


def close(got, want, tol, what=""):
    """Max error relative to the scale of ``want``; a failure names the worst elements."""
    assert got.shape == want.shape, (what, got.shape, want.shape)
    err = (got.detach().to(F64).cpu() - want.detach().to(F64).cpu()).abs()
    scale = max(1.0, want.abs().max().item())
    if not err.max().item() <= tol * scale:
        worst = err.flatten().topk(min(5, err.numel())).indices
        pairs = [(got.flatten()[i].item(), want.flatten()[i].item()) for i in worst.tolist()]
        raise AssertionError(f"{what}: max error {err.max().item():.3g} > {tol * scale:.3g}; "
                             f"worst (got, want): {pairs}")


def check_group(x, w, b, groups, dtype=None):
    dtype = dtype or x.dtype
    acc = F64 if dtype == F64 else F32
    dy = make_dy(x)
    y, mean, rstd = tc.group_forward(x, w, b, groups, EPS)
    dx, dw, db = tc.group_backward(dy, x, w, mean, rstd, groups)
    ry, rdx, rdw, rdb, rmu, rvar = reference(x, w, b, dy, groups=groups)
    assert y.dtype == x.dtype and y.stride() == x.stride() and dx.stride() == x.stride()
    assert mean.shape == rstd.shape == (x.shape[0], groups) and mean.dtype == rstd.dtype == acc
    assert dw.dtype == db.dtype == acc and dw.shape == db.shape == (x.shape[1],)
    close(y, ry, TOL_OUT[dtype], "y")
    close(dx, rdx, TOL_OUT[dtype], "dx")
    close(dw, rdw, TOL_ACC[dtype] * 4, "dw")
    close(db, rdb, TOL_ACC[dtype] * 4, "db")
    close(mean.reshape(-1), rmu, TOL_ACC[dtype], "mean")
    close(rstd.reshape(-1), 1 / torch.sqrt(rvar + EPS), TOL_ACC[dtype], "rstd")


def check_batch(x, w, b, *, given=False):
    acc = F64 if x.dtype == F64 else F32
    dy = make_dy(x)
    c = x.shape[1]
    if given:  # running statistics, here in float32 whatever x's dtype
        rm = torch.linspace(-0.5, 1.5, c).to(DEVICE)
        rv = torch.linspace(0.5, 3.0, c).to(DEVICE)
        y, mean, var, rstd = tc.batch_forward(x, w, b, EPS, rm, rv)
        ry, rdx, rdw, rdb, rmu, rvar = reference(x, w, b, dy, mean=rm, var=rv)
    else:
        y, mean, var, rstd = tc.batch_forward(x, w, b, EPS)
        ry, rdx, rdw, rdb, rmu, rvar = reference(x, w, b, dy)
    dx, dw, db = tc.batch_backward(dy, x, w, mean, rstd, not given)
    assert y.dtype == x.dtype and y.stride() == x.stride() and dx.stride() == x.stride()
    assert mean.shape == var.shape == rstd.shape == (c,)
    assert mean.dtype == var.dtype == rstd.dtype == dw.dtype == db.dtype == acc
    close(y, ry, TOL_OUT[x.dtype], "y")
    close(dx, rdx, TOL_OUT[x.dtype], "dx")
    close(dw, rdw, TOL_ACC[x.dtype] * 4, "dw")
    close(db, rdb, TOL_ACC[x.dtype] * 4, "db")
    close(mean, rmu, TOL_ACC[x.dtype], "mean")
    close(var, rvar, TOL_ACC[x.dtype], "var")
    close(rstd, 1 / torch.sqrt(rvar + EPS), TOL_ACC[x.dtype], "rstd")


@pytest.fixture
def tiny_tiles(monkeypatch):
    """Tiles of a few elements, many programs: every loop runs several times, and every
    norm takes the split path (partials, combine, normalize)."""
    tiny = dataclasses.replace(tc.CPU_TUNING, tile=16, max_block_c=4, max_block_s=8,
                               programs=12, fused_max=0, combine_tile=4, combine_stats=2)
    monkeypatch.setattr(tc, "CPU_TUNING", tiny)
    monkeypatch.setattr(tc, "GPU_TUNING", dataclasses.replace(tiny, num_warps=4))


@pytest.fixture
def split_path(monkeypatch):
    """Small tiles and the split path with a few programs per statistic."""
    small = dataclasses.replace(tc.CPU_TUNING, tile=64, max_block_c=4, max_block_s=16,
                                programs=12, fused_max=0, combine_tile=64, combine_stats=4)
    monkeypatch.setattr(tc, "CPU_TUNING", small)
    monkeypatch.setattr(tc, "GPU_TUNING", dataclasses.replace(small, num_warps=4))


@pytest.fixture
def tiny_fused(monkeypatch):
    """Tiny tiles with the one-program-per-group path: its loops over channel and position
    blocks run several times."""
    tiny = dataclasses.replace(tc.CPU_TUNING, tile=16, max_block_c=4, max_block_s=8,
                               programs=1, fused_max=1 << 62)
    monkeypatch.setattr(tc, "CPU_TUNING", tiny)
    monkeypatch.setattr(tc, "GPU_TUNING", dataclasses.replace(tiny, num_warps=4))


# --------------------------------------------------------------------------------------------
# GroupNorm / InstanceNorm
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("groups", [1, 2, 3, 6])
def test_group_norm(layout, groups):
    x = make_x((2, 6, 5, 7), layout=layout)
    check_group(x, *make_params(6), groups)


@pytest.mark.parametrize("dtype", [F64, F16, BF16])
@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_group_norm_dtypes(dtype, layout):
    x = make_x((2, 6, 4, 5), dtype, layout)
    check_group(x, *make_params(6, dtype=F32 if dtype != F64 else F64), 3)


def test_group_norm_params_in_input_dtype():
    x = make_x((2, 4, 3, 5), BF16, "cl")
    check_group(x, *make_params(4, dtype=BF16), 2)


@pytest.mark.parametrize("affine", ["none", "weight"])
@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_group_norm_without_affine(affine, layout):
    x = make_x((2, 6, 3, 5), layout=layout)
    check_group(x, *make_params(6, affine), 2)


@pytest.mark.parametrize("shape, layout", [
    ((2, 6, 9), "nchw"), ((2, 6, 9), "cl"),            # (N, C, L) and transposed (N, L, C)
    ((2, 4, 3, 4, 5), "nchw"), ((2, 4, 3, 4, 5), "cl"),  # 5-D, channels_last_3d
    ((3, 6), "nchw"),                                  # no spatial axes
])
def test_group_norm_shapes(shape, layout):
    x = make_x(shape, layout=layout)
    check_group(x, *make_params(shape[1]), 2)


@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_group_norm_loops_fused(tiny_fused, layout):
    x = make_x((2, 6, 5, 7), layout=layout)
    check_group(x, *make_params(6), 2)


@pytest.mark.parametrize("groups, layout", [(1, "nchw"), (3, "nchw"), (6, "cl"), (2, "cl")])
def test_group_norm_loops_split(tiny_tiles, groups, layout):
    x = make_x((2, 6, 5, 7), layout=layout)
    check_group(x, *make_params(6), groups)


@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_group_and_instance_norm_match_torch(layout):
    x = make_x((2, 6, 5, 7), layout=layout)
    w, b = make_params(6)
    dy = make_dy(x)
    for groups, fn in [(3, lambda x, w, b: TF.group_norm(x, 3, w, b, EPS)),
                       (6, lambda x, w, b: TF.instance_norm(x, weight=w, bias=b, eps=EPS))]:
        xt, wt, bt = (t.detach().clone().requires_grad_() for t in (x, w, b))
        yt = fn(xt, wt, bt)
        yt.backward(dy)
        y, mean, rstd = tc.group_forward(x, w, b, groups, EPS)
        dx, dw, db = tc.group_backward(dy, x, w, mean, rstd, groups)
        close(y, yt, 2e-5, "y")
        close(dx, xt.grad, 1e-4, "dx")
        close(dw, wt.grad, 1e-4, "dw")
        close(db, bt.grad, 1e-4, "db")


def test_instance_norm_with_running_stats_matches_torch():
    """InstanceNorm normalizing by running statistics is given-statistics BatchNorm."""
    x = make_x((2, 6, 4, 5), layout="cl")
    w, b = make_params(6)
    rm, rv = torch.linspace(-0.5, 1.5, 6).to(DEVICE), torch.linspace(0.5, 3.0, 6).to(DEVICE)
    want = TF.instance_norm(x, rm, rv, w, b, use_input_stats=False, eps=EPS)
    y, *_ = tc.batch_forward(x, w, b, EPS, rm, rv)
    close(y, want, 2e-5, "y")


# --------------------------------------------------------------------------------------------
# BatchNorm
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("given", [False, True])
@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_batch_norm(layout, given):
    check_batch(make_x((3, 6, 5, 7), layout=layout), *make_params(6), given=given)


@pytest.mark.parametrize("dtype", [F64, F16, BF16])
@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_batch_norm_dtypes(dtype, layout):
    x = make_x((2, 3, 4, 5), dtype, layout)
    check_batch(x, *make_params(3, dtype=F32 if dtype != F64 else F64))


@pytest.mark.parametrize("dtype", [F64, BF16])
def test_batch_norm_given_stats_dtypes(dtype):
    x = make_x((2, 3, 4, 5), dtype, "cl")
    check_batch(x, *make_params(3, dtype=F32 if dtype != F64 else F64), given=True)


@pytest.mark.parametrize("affine", ["none", "weight"])
def test_batch_norm_without_affine(affine):
    check_batch(make_x((2, 6, 3, 5), layout="cl"), *make_params(6, affine))
    check_batch(make_x((2, 6, 3, 5)), *make_params(6, affine), given=True)


@pytest.mark.parametrize("shape, layout", [
    ((5, 6), "nchw"),                                   # BatchNorm1d on (N, C)
    ((2, 6, 9), "nchw"), ((2, 6, 9), "cl"),             # (N, C, L) and transposed (N, L, C)
    ((2, 3, 3, 4, 5), "nchw"), ((2, 3, 3, 4, 5), "cl"),  # 5-D, channels_last_3d
])
def test_batch_norm_shapes(shape, layout):
    check_batch(make_x(shape, layout=layout), *make_params(shape[1]))


@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_batch_norm_loops_split(tiny_tiles, layout):
    x = make_x((2, 6, 5, 7), layout=layout)
    check_batch(x, *make_params(6))
    check_batch(x, *make_params(6), given=True)


def test_batch_norm_matches_torch():
    x = make_x((3, 6, 5, 7), layout="cl")
    w, b = make_params(6)
    dy = make_dy(x)
    xt, wt, bt = (t.detach().clone().requires_grad_() for t in (x, w, b))
    yt = TF.batch_norm(xt, None, None, wt, bt, training=True, eps=EPS)
    yt.backward(dy)
    y, mean, var, rstd = tc.batch_forward(x, w, b, EPS)
    dx, dw, db = tc.batch_backward(dy, x, w, mean, rstd, True)
    close(y, yt, 2e-5, "y")
    close(dx, xt.grad, 1e-4, "dx")
    close(dw, wt.grad, 1e-4, "dw")
    close(db, bt.grad, 1e-4, "db")
    rm, rv = torch.zeros(6, device=DEVICE), torch.ones(6, device=DEVICE)
    TF.batch_norm(x, rm, rv, training=True, momentum=1.0, eps=EPS)  # rv: the unbiased var
    close(mean, rm, 1e-5, "mean")
    count = x.numel() // 6
    close(var * count / (count - 1), rv, 1e-5, "var")
    want = TF.batch_norm(x, rm, rv, w, b, training=False, eps=EPS)
    close(tc.batch_forward(x, w, b, EPS, rm, rv)[0], want, 2e-5, "eval y")


# --------------------------------------------------------------------------------------------
# numerics, determinism, layouts, special inputs
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_large_mean_does_not_cancel(layout):
    """fp32 1e4 + N(0, 1): E[x^2] - E[x]^2 in fp32 would lose every digit of the variance."""
    x = make_x((2, 4, 8, 8), layout=layout, offset=1e4)
    w, b = make_params(4)
    dy = make_dy(x)
    y, mean, rstd = tc.group_forward(x, w, b, 2, EPS)
    dx, dw, db = tc.group_backward(dy, x, w, mean, rstd, 2)
    ry, rdx, rdw, rdb, rmu, rvar = reference(x, w, b, dy, groups=2)
    close(y, ry, 2e-6, "group y")
    close(rstd.reshape(-1), 1 / torch.sqrt(rvar + EPS), 1e-5, "group rstd")
    close(dx, rdx, 2e-4, "group dx")
    close(dw, rdw, 1e-4, "group dw")
    y, mean, var, rstd = tc.batch_forward(x, w, b, EPS)
    dx, dw, db = tc.batch_backward(dy, x, w, mean, rstd, True)
    ry, rdx, rdw, rdb, rmu, rvar = reference(x, w, b, dy)
    close(y, ry, 2e-6, "batch y")
    close(var, rvar, 1e-5, "batch var")
    close(dx, rdx, 2e-4, "batch dx")
    close(dw, rdw, 1e-4, "batch dw")


def test_large_mean_split_path(split_path):
    x = make_x((3, 4, 5, 7), layout="cl", offset=1e4)
    w, b = make_params(4)
    y, mean, var, rstd = tc.batch_forward(x, w, b, EPS)
    ry, *_, rvar = reference(x, w, b, make_dy(x))
    close(y, ry, 2e-6, "y")
    close(var, rvar, 1e-5, "var")


def test_deterministic():
    """No atomics: the same calls twice give the same bits (on a GPU: many programs per
    statistic)."""
    x = make_x((3, 6, 5, 7), layout="cl")
    w, b = make_params(6)
    dy = make_dy(x)

    def run():
        y, mean, rstd = tc.group_forward(x, w, b, 3, EPS)
        g = tc.group_backward(dy, x, w, mean, rstd, 3)
        yb, mb, vb, rb = tc.batch_forward(x, w, b, EPS)
        gb = tc.batch_backward(dy, x, w, mb, rb, True)
        return (y, mean, rstd, *g, yb, mb, vb, rb, *gb)

    for a, b_ in zip(run(), run()):
        assert torch.equal(a, b_)


def test_dy_in_another_layout():
    x = make_x((2, 6, 4, 5), layout="cl")
    w, b = make_params(6)
    dy = make_dy(x)
    y, mean, rstd = tc.group_forward(x, w, b, 3, EPS)
    want = tc.group_backward(dy, x, w, mean, rstd, 3)
    got = tc.group_backward(dy.contiguous(), x, w, mean, rstd, 3)
    for a, b_ in zip(got, want):
        assert torch.equal(a, b_)
    assert got[0].stride() == x.stride()
    _, mean, _, rstd = tc.batch_forward(x, w, b, EPS)
    expanded = torch.ones(1, 1, 1, 1, device=DEVICE).expand(x.shape)  # e.g. from y.sum()
    dx, dw, db = tc.batch_backward(expanded, x, w, mean, rstd, True)
    close(db, torch.full((6,), x.numel() / 6.0), 1e-6, "db")
    assert dx.stride() == x.stride()


@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_need_dx_false(layout):
    x = make_x((2, 6, 4, 5), layout=layout)
    w, b = make_params(6)
    dy = make_dy(x)
    y, mean, rstd = tc.group_forward(x, w, b, 2, EPS)
    full = tc.group_backward(dy, x, w, mean, rstd, 2)
    part = tc.group_backward(dy, x, w, mean, rstd, 2, need_dx=False)
    assert part[0] is None
    assert torch.equal(part[1], full[1]) and torch.equal(part[2], full[2])
    _, mean, _, rstd = tc.batch_forward(x, w, b, EPS)
    full = tc.batch_backward(dy, x, w, mean, rstd, True)
    part = tc.batch_backward(dy, x, w, mean, rstd, True, need_dx=False)
    assert part[0] is None
    assert torch.equal(part[1], full[1]) and torch.equal(part[2], full[2])


@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_nan_propagates(layout):
    x = make_x((2, 4, 3, 5), layout=layout)
    x[1, 2, 1, 3] = math.nan
    w, b = make_params(4)
    y, mean, rstd = tc.group_forward(x, w, b, 2, EPS)
    assert y[1, 2:].isnan().all() and mean[1, 1].isnan() and rstd[1, 1].isnan()
    assert y[0].isfinite().all() and y[1, :2].isfinite().all()
    y, mean, var, rstd = tc.batch_forward(x, w, b, EPS)
    assert y[:, 2].isnan().all() and mean[2].isnan() and var[2].isnan() and rstd[2].isnan()
    assert y[:, [0, 1, 3]].isfinite().all()


def test_empty_inputs():
    w, b = make_params(6)
    for shape in [(0, 6, 3, 4), (2, 6, 0)]:
        x = torch.randn(shape, device=DEVICE)
        y, mean, rstd = tc.group_forward(x, w, b, 3, EPS)
        assert y.shape == x.shape and mean.shape == rstd.shape == (shape[0], 3)
        dx, dw, db = tc.group_backward(x, x, w, mean, rstd, 3)
        assert dx.shape == x.shape and torch.equal(dw, torch.zeros(6, device=DEVICE))
        y, mean, var, rstd = tc.batch_forward(x, w, b, EPS)
        assert y.shape == x.shape and mean.shape == var.shape == rstd.shape == (6,)
        dx, dw, db = tc.batch_backward(x, x, w, mean, rstd, True)
        assert torch.equal(db, torch.zeros(6, device=DEVICE))
        rv = torch.full((6,), 3.0, device=DEVICE)
        _, _, _, rstd = tc.batch_forward(x, w, b, EPS, torch.zeros(6, device=DEVICE), rv)
        close(rstd, torch.full((6,), 1 / math.sqrt(3.0 + EPS)), 1e-6, "rstd")
    x = torch.randn(2, 0, 3, device=DEVICE)
    y, mean, var, rstd = tc.batch_forward(x, None, None, EPS)
    assert y.shape == x.shape and mean.shape == (0,)
