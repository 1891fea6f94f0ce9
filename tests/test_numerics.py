"""Numerics of ``normlab.functional`` against float64 references written from the formulas.

The references below are a few lines each, in float64, straight from the definitions:

    mean = E[x],  var = E[(x - mean)^2]  (biased, over the statistics set),
    y = (x - mean) / sqrt(var + eps) * w + b,
    running_mean <- (1 - m) * running_mean + m * mean,
    running_var  <- (1 - m) * running_var  + m * var * n / (n - 1),
    rms_norm: y = x / sqrt(E[x^2] + eps) * w, eps=None -> finfo(compute dtype).eps.

They are checked against torch in float64 once (``test_references_match_torch_float64``), then
used as the oracle for stability, overflow, eps and the equivalences between norms.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck

import normlab
import normlab.functional as NF


@pytest.fixture(autouse=True)
def _normlab_computes():
    """These tests check normlab's own statistics (the fused kernels; the reference engine
    without Numba): ``auto`` would hand small cells to ATen, whose numerics are torch's."""
    with normlab.backend("cpu" if "cpu" in normlab.available_backends() else "reference"):
        yield

F64, F32, BF16, F16 = torch.float64, torch.float32, torch.bfloat16, torch.float16


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def assert_close(actual, expected, atol, rtol, what):
    """``|a - e| <= atol + rtol * |e|`` elementwise; on failure report the worst element."""
    assert tuple(actual.shape) == tuple(expected.shape), (
        f"{what}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    )
    if expected.numel() == 0:
        return
    a = actual.detach().to(F64)
    e = expected.detach().to(F64)
    err = (a - e).abs()
    ok = err <= atol + rtol * e.abs()  # NaN fails
    if bool(ok.all()):
        return
    bad_err = torch.where(ok, torch.zeros_like(err), torch.nan_to_num(err, nan=math.inf))
    flat = int(torch.argmax(bad_err.reshape(-1)))
    idx = tuple(int(i) for i in np.unravel_index(flat, tuple(a.shape)))
    raise AssertionError(
        f"{what}: {int((~ok).sum())}/{a.numel()} elements out of tolerance "
        f"(atol={atol:.3g}, rtol={rtol:.3g}); worst at index {idx}: actual={a[idx].item()!r} "
        f"expected={e[idx].item()!r} abs err={err[idx].item():.6g}; max abs err "
        f"{torch.nan_to_num(err, nan=math.inf).max().item():.6g}"
    )


def max_abs_err(actual, expected):
    return float((actual.detach().to(F64) - expected.detach().to(F64)).abs().max())


def randn(shape, seed, dtype=F64, scale=1.0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(tuple(shape), generator=g, dtype=F64) * scale + offset).to(dtype)


def positive(shape, seed, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(tuple(shape), generator=g, dtype=F64) * 1.5 + 0.25).to(dtype)


def compute_eps(dtype):
    """finfo(eps) of the compute dtype: fp64 for fp64 input, fp32 for everything else."""
    return torch.finfo(F64 if dtype == F64 else F32).eps


# --------------------------------------------------------------------------------------------
# float64 references, from the formulas
# --------------------------------------------------------------------------------------------
def _affine(y, w, b, shape):
    if w is not None:
        y = y * w.to(F64).reshape(shape)
    if b is not None:
        y = y + b.to(F64).reshape(shape)
    return y


def _norm(x, dims, eps, mean=None, var=None):
    if mean is None:
        mean = x.mean(dims, keepdim=True)
        var = ((x - mean) ** 2).mean(dims, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps), mean, var


def ref_batch_norm(x, rm, rv, w=None, b=None, training=False, momentum=0.1, eps=1e-5):
    """Returns (y, new_running_mean, new_running_var) in float64."""
    x = x.to(F64)
    C = x.shape[1]
    cshape = (1, C) + (1,) * (x.dim() - 2)
    dims = (0,) + tuple(range(2, x.dim()))
    if training:
        y, mean, var = _norm(x, dims, eps)
        n = x.numel() // C
        if rm is not None:
            rm = (1 - momentum) * rm.to(F64) + momentum * mean.reshape(C)
            rv = (1 - momentum) * rv.to(F64) + momentum * var.reshape(C) * n / (n - 1)
    else:
        y, _, _ = _norm(x, dims, eps, rm.to(F64).reshape(cshape), rv.to(F64).reshape(cshape))
        rm, rv = rm.to(F64), rv.to(F64)
    return _affine(y, w, b, cshape), rm, rv


def ref_instance_norm(x, rm=None, rv=None, w=None, b=None, use_input_stats=True, momentum=0.1, eps=1e-5):
    x = x.to(F64)
    C = x.shape[1]
    cshape = (1, C) + (1,) * (x.dim() - 2)
    dims = tuple(range(2, x.dim()))
    if use_input_stats:
        y, mean, var = _norm(x, dims, eps)
        n = math.prod(x.shape[2:])
        if rm is not None:
            rm = (1 - momentum) * rm.to(F64) + momentum * mean.reshape(x.shape[0], C).mean(0)
            rv = (1 - momentum) * rv.to(F64) + momentum * (var.reshape(x.shape[0], C) * n / (n - 1)).mean(0)
    else:
        y, _, _ = _norm(x, dims, eps, rm.to(F64).reshape(cshape), rv.to(F64).reshape(cshape))
        rm, rv = rm.to(F64), rv.to(F64)
    return _affine(y, w, b, cshape), rm, rv


def ref_group_norm(x, groups, w=None, b=None, eps=1e-5):
    x = x.to(F64)
    N, C = x.shape[:2]
    xg = x.reshape(N, groups, -1)
    y, _, _ = _norm(xg, (2,), eps)
    return _affine(y.reshape(x.shape), w, b, (1, C) + (1,) * (x.dim() - 2))


def ref_layer_norm(x, normalized_shape, w=None, b=None, eps=1e-5):
    x = x.to(F64)
    dims = tuple(range(x.dim() - len(normalized_shape), x.dim()))
    y, _, _ = _norm(x, dims, eps)
    return _affine(y, w, b, tuple(normalized_shape))


def ref_rms_norm(x, normalized_shape, w=None, eps=None):
    if eps is None:
        eps = compute_eps(x.dtype)
    x = x.to(F64)
    dims = tuple(range(x.dim() - len(normalized_shape), x.dim()))
    y = x / torch.sqrt((x * x).mean(dims, keepdim=True) + eps)
    return _affine(y, w, None, tuple(normalized_shape))


def test_references_match_torch_float64():
    """The oracle itself: the formulas above agree with torch in float64."""
    x = randn((3, 4, 5, 2), 1, F64, 1.7, 0.8)
    w, b = randn((4,), 2, F64, 1, 0.5), randn((4,), 3)
    rm, rv = randn((4,), 4), positive((4,), 5)
    for training in (True, False):
        rm_t, rv_t = rm.clone(), rv.clone()
        y, rm_r, rv_r = ref_batch_norm(x, rm, rv, w, b, training, 0.3, 1e-3)
        assert_close(F.batch_norm(x, rm_t, rv_t, w, b, training, 0.3, 1e-3), y, 1e-12, 1e-12, "ref bn")
        assert_close(rm_t, rm_r, 1e-12, 1e-12, "ref bn running_mean")
        assert_close(rv_t, rv_r, 1e-12, 1e-12, "ref bn running_var")
        rm_t, rv_t = rm.clone(), rv.clone()
        y, rm_r, rv_r = ref_instance_norm(x, rm, rv, w, b, training, 0.3, 1e-3)
        assert_close(F.instance_norm(x, rm_t, rv_t, w, b, training, 0.3, 1e-3), y, 1e-12, 1e-12, "ref in")
        assert_close(rm_t, rm_r, 1e-12, 1e-12, "ref in running_mean")
        assert_close(rv_t, rv_r, 1e-12, 1e-12, "ref in running_var")
    assert_close(F.group_norm(x, 2, w, b, 1e-3), ref_group_norm(x, 2, w, b, 1e-3), 1e-12, 1e-12, "ref gn")
    lw, lb = randn((5, 2), 6), randn((5, 2), 7)
    assert_close(F.layer_norm(x, (5, 2), lw, lb), ref_layer_norm(x, (5, 2), lw, lb), 1e-12, 1e-12, "ref ln")
    for eps in (None, 1e-3):
        assert_close(F.rms_norm(x, (5, 2), lw, eps), ref_rms_norm(x, (5, 2), lw, eps), 1e-12, 1e-12, "ref rms")


# --------------------------------------------------------------------------------------------
# stability: large offsets in fp32
# --------------------------------------------------------------------------------------------
CENTERED = {
    # name: (input shape, normlab call, float64 reference call)
    "batch_norm": ((16, 4, 64), lambda m, x: m.batch_norm(x, None, None, training=True),
                   lambda x: ref_batch_norm(x, None, None, training=True)[0]),
    "layer_norm": ((8, 1024), lambda m, x: m.layer_norm(x, (1024,)),
                   lambda x: ref_layer_norm(x, (1024,))),
    "group_norm": ((4, 8, 128), lambda m, x: m.group_norm(x, 2),
                   lambda x: ref_group_norm(x, 2)),
    "instance_norm": ((4, 4, 256), lambda m, x: m.instance_norm(x),
                      lambda x: ref_instance_norm(x)[0]),
}


@pytest.mark.parametrize("offset", [1e4, 1e5])
@pytest.mark.parametrize("name", sorted(CENTERED))
def test_large_offset_fp32_is_stable(name, offset):
    """fp32 ``offset + N(0, 1)``: E[x^2] - E[x]^2 would cancel to garbage; a two-pass (and, at
    1e5, where one fp32 mean is off by up to 4e-3, a corrected two-pass) algorithm normalizes to
    within 1e-3 of the float64 answer for the same fp32 inputs (output ~ N(0, 1): abs = rel)."""
    shape, call, ref = CENTERED[name]
    x = randn(shape, 10, F32, 1.0, offset)
    y = call(NF, x)
    assert y.dtype == F32 and torch.isfinite(y).all(), f"{name}: non-finite output"
    expected = ref(x)
    err = max_abs_err(y, expected)
    assert err < 1e-3, f"{name} at {offset:g} + N(0,1): max abs error {err:.3g} >= 1e-3"
    assert_close(y, expected, 1e-3, 0.0, f"{name} at {offset:g} + N(0,1)")


# --------------------------------------------------------------------------------------------
# fp16 inputs whose squares overflow fp16
# --------------------------------------------------------------------------------------------
def _overflow_cases():
    C = 4
    w, b = randn((C,), 21, F16, 1.0, 0.5), randn((C,), 22, F16, 1.0, 0.0)
    lw, lb = randn((64,), 23, F16, 1.0, 0.5), randn((64,), 24, F16, 1.0, 0.0)
    rm, rv = randn((C,), 25, F16), positive((C,), 26, F16)
    return {
        "batch_norm": ((8, C, 64), {"weight": w, "bias": b},
                       lambda m, x, p: m.batch_norm(x, rm.clone(), rv.clone(), p["weight"], p["bias"], True),
                       lambda x: ref_batch_norm(x, rm, rv, w, b, True)[0]),
        "instance_norm": ((8, C, 64), {"weight": w, "bias": b},
                          lambda m, x, p: m.instance_norm(x, None, None, p["weight"], p["bias"]),
                          lambda x: ref_instance_norm(x, None, None, w, b)[0]),
        "group_norm": ((8, C, 64), {"weight": w, "bias": b},
                       lambda m, x, p: m.group_norm(x, 2, p["weight"], p["bias"]),
                       lambda x: ref_group_norm(x, 2, w, b)),
        "layer_norm": ((8, C, 64), {"weight": lw, "bias": lb},
                       lambda m, x, p: m.layer_norm(x, (64,), p["weight"], p["bias"]),
                       lambda x: ref_layer_norm(x, (64,), lw, lb)),
        "rms_norm": ((8, C, 64), {"weight": lw},
                     lambda m, x, p: m.rms_norm(x, (64,), p["weight"]),
                     lambda x: ref_rms_norm(x, (64,), lw)),
    }


@pytest.mark.parametrize("name", ["batch_norm", "instance_norm", "group_norm", "layer_norm", "rms_norm"])
def test_fp16_squares_overflowing_fp16(name):
    """x = 1000 + 300 * N(0, 1) in fp16 (|x| up to ~2300, x^2 up to ~5e6 > fp16 max 65504):
    statistics in fp32 keep the output finite and within fp16 rounding of the float64 answer.
    The gradients (upstream g random, not ones) too."""
    shape, params, call, ref = _overflow_cases()[name]
    x = randn(shape, 20, F64, 300.0, 1000.0).to(F16)
    assert float(x.float().abs().max()) ** 2 > torch.finfo(F16).max  # the squares do overflow
    xn = x.clone().requires_grad_()
    pn = {k: v.clone().requires_grad_() for k, v in params.items()}
    y = call(NF, xn, pn)
    assert y.dtype == F16 and y.shape == x.shape
    assert torch.isfinite(y).all(), f"{name}: {int((~torch.isfinite(y)).sum())} non-finite outputs"
    xr = x.to(F64).requires_grad_()
    pr = {k: v.to(F64).requires_grad_() for k, v in params.items()}
    # reference in float64 with the same (fp16) parameter values
    expected = {
        "batch_norm": lambda: ref_batch_norm(xr, None, None, pr["weight"], pr["bias"], True)[0],
        "instance_norm": lambda: ref_instance_norm(xr, None, None, pr["weight"], pr["bias"])[0],
        "group_norm": lambda: ref_group_norm(xr, 2, pr["weight"], pr["bias"]),
        "layer_norm": lambda: ref_layer_norm(xr, (64,), pr["weight"], pr["bias"]),
        "rms_norm": lambda: ref_rms_norm(xr, (64,), pr["weight"], compute_eps(F16)),
    }[name]()
    u = 2.0**-11  # fp16 unit roundoff
    scale = max(1.0, float(expected.detach().abs().max()))
    assert_close(y, expected, 2 * u * scale, 2 * u, f"{name} fp16 overflow-range output")

    g = randn(shape, 27, F16, 1.0, 0.3)
    (y * g).sum().backward()
    (expected * g.to(F64)).sum().backward()
    for label, a, e in [("x.grad", xn.grad, xr.grad)] + [
        (f"{k}.grad", pn[k].grad, pr[k].grad) for k in params
    ]:
        assert a is not None and a.dtype == F16, f"{name}: {label} missing or not fp16"
        assert torch.isfinite(a).all(), f"{name}: {label} has non-finite values"
        s = max(1.0, float(e.abs().max()))
        assert_close(a, e, 2 * u * s, 2 * u, f"{name} fp16 overflow-range {label}")


# --------------------------------------------------------------------------------------------
# gradcheck in float64
# --------------------------------------------------------------------------------------------
def _gc_inputs(shape, pshape, seed, with_bias=True):
    x = randn(shape, seed, F64, 1.3, 0.7).requires_grad_()
    w = randn(pshape, seed + 1, F64, 1.0, 0.5).requires_grad_()
    b = randn(pshape, seed + 2, F64).requires_grad_() if with_bias else None
    return x, w, b


def _gradcheck(fn, inputs, what):
    assert gradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-3), what


def test_gradcheck_batch_norm_training_no_running_stats():
    x, w, b = _gc_inputs((3, 4, 5), (4,), 30)
    _gradcheck(lambda x, w, b: NF.batch_norm(x, None, None, w, b, True, 0.1, 1e-5), (x, w, b), "bn train")


def test_gradcheck_batch_norm_training_with_running_stats():
    x, w, b = _gc_inputs((4, 3, 2, 3), (3,), 31)
    rm, rv = randn((3,), 32), positive((3,), 33)
    # fresh copies every call: the in-place update must not change what gradcheck sees
    _gradcheck(lambda x, w, b: NF.batch_norm(x, rm.clone(), rv.clone(), w, b, True, 0.3, 1e-3),
               (x, w, b), "bn train + running stats")
    # and with the same buffers updated on every call, momentum 0.0 (no change)
    rm2, rv2 = rm.clone(), rv.clone()
    _gradcheck(lambda x, w, b: NF.batch_norm(x, rm2, rv2, w, b, True, 0.0, 1e-5), (x, w, b),
               "bn train + running stats, momentum 0")
    assert torch.equal(rm2, rm) and torch.equal(rv2, rv)


def test_gradcheck_batch_norm_eval():
    x, w, b = _gc_inputs((3, 4, 5), (4,), 34)
    rm, rv = randn((4,), 35), positive((4,), 36)
    _gradcheck(lambda x, w, b: NF.batch_norm(x, rm, rv, w, b, False, 0.1, 1e-5), (x, w, b), "bn eval")


def test_gradcheck_instance_norm():
    x, w, b = _gc_inputs((2, 3, 4, 2), (3,), 37)
    _gradcheck(lambda x, w, b: NF.instance_norm(x, None, None, w, b, True, 0.1, 1e-5), (x, w, b), "in")
    rm, rv = randn((3,), 38), positive((3,), 39)
    _gradcheck(lambda x, w, b: NF.instance_norm(x, rm.clone(), rv.clone(), w, b, True, 0.2, 1e-5),
               (x, w, b), "in + running stats")


def test_gradcheck_instance_norm_running_stats():
    x, w, b = _gc_inputs((2, 3, 5), (3,), 40)
    rm, rv = randn((3,), 41), positive((3,), 42)
    _gradcheck(lambda x, w, b: NF.instance_norm(x, rm, rv, w, b, False, 0.1, 1e-5), (x, w, b),
               "in use_input_stats=False")


def test_gradcheck_group_norm():
    x, w, b = _gc_inputs((2, 6, 3, 2), (6,), 43)
    _gradcheck(lambda x, w, b: NF.group_norm(x, 3, w, b, 1e-5), (x, w, b), "gn")
    x2, w2, _ = _gc_inputs((3, 4), (4,), 44)
    _gradcheck(lambda x, w: NF.group_norm(x, 2, w, None, 1e-5), (x2, w2), "gn 2-D, weight only")


def test_gradcheck_layer_norm():
    x, w, b = _gc_inputs((3, 4, 5), (4, 5), 45)
    _gradcheck(lambda x, w, b: NF.layer_norm(x, (4, 5), w, b, 1e-5), (x, w, b), "ln")
    x2, _, b2 = _gc_inputs((2, 7), (7,), 46)
    _gradcheck(lambda x, b: NF.layer_norm(x, (7,), None, b, 1e-3), (x2, b2), "ln bias only")


def test_gradcheck_rms_norm():
    x, w, _ = _gc_inputs((3, 4, 5), (5,), 47, with_bias=False)
    _gradcheck(lambda x, w: NF.rms_norm(x, (5,), w, None), (x, w), "rms eps=None")
    _gradcheck(lambda x, w: NF.rms_norm(x, (5,), w, 1e-3), (x, w), "rms eps=1e-3")
    x2 = randn((2, 3, 4), 48, F64, 1.0, 0.5).requires_grad_()
    _gradcheck(lambda x: NF.rms_norm(x, (3, 4), None, 1e-5), (x2,), "rms no weight")


# --------------------------------------------------------------------------------------------
# equivalences between norms (float64), each side also checked against the formula
# --------------------------------------------------------------------------------------------
def _grads(y, inputs, seed):
    g = randn(y.shape, seed, F64, 1.0, 0.3)
    return torch.autograd.grad((y * g).sum(), inputs)


def test_layer_norm_over_chw_equals_group_norm_one_group():
    x = randn((3, 4, 5, 2), 50, F64, 1.5, 2.0)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya = NF.layer_norm(xa, (4, 5, 2))
    yb = NF.group_norm(xb, 1)
    assert_close(ya, ref_layer_norm(x, (4, 5, 2)), 1e-12, 1e-12, "layer_norm vs formula")
    assert_close(ya, yb, 1e-12, 1e-12, "layer_norm over (C,H,W) vs group_norm(1)")
    (ga,), (gb,) = _grads(ya, (xa,), 51), _grads(yb, (xb,), 51)
    assert_close(ga, gb, 1e-12, 1e-12, "layer_norm over (C,H,W) vs group_norm(1): x.grad")


def test_instance_norm_equals_group_norm_with_c_groups():
    x = randn((3, 4, 5, 2), 52, F64, 0.8, -1.5)
    w, b = randn((4,), 53, F64, 1, 0.5), randn((4,), 54)
    ta = [t.clone().requires_grad_() for t in (x, w, b)]
    tb = [t.clone().requires_grad_() for t in (x, w, b)]
    ya = NF.instance_norm(ta[0], None, None, ta[1], ta[2])
    yb = NF.group_norm(tb[0], 4, tb[1], tb[2])
    assert_close(ya, ref_instance_norm(x, None, None, w, b)[0], 1e-12, 1e-12, "instance_norm vs formula")
    assert_close(ya, yb, 1e-12, 1e-12, "instance_norm vs group_norm(C groups)")
    for name, ga, gb in zip(["x", "weight", "bias"], _grads(ya, ta, 55), _grads(yb, tb, 55)):
        assert_close(ga, gb, 1e-12, 1e-12, f"instance_norm vs group_norm(C groups): {name}.grad")


def test_batch_norm_training_with_one_sample_equals_instance_norm():
    """With N=1 the batch statistics are the instance statistics, running stats included."""
    x = randn((1, 3, 4, 5), 56, F64, 1.2, 0.9)
    w, b = randn((3,), 57, F64, 1, 0.5), randn((3,), 58)
    rm, rv = randn((3,), 59), positive((3,), 60)
    rma, rva, rmb, rvb = rm.clone(), rv.clone(), rm.clone(), rv.clone()
    ta = [t.clone().requires_grad_() for t in (x, w, b)]
    tb = [t.clone().requires_grad_() for t in (x, w, b)]
    ya = NF.batch_norm(ta[0], rma, rva, ta[1], ta[2], True, 0.25, 1e-5)
    yb = NF.instance_norm(tb[0], rmb, rvb, tb[1], tb[2], True, 0.25, 1e-5)
    y_ref, rm_ref, rv_ref = ref_batch_norm(x, rm, rv, w, b, True, 0.25, 1e-5)
    assert_close(ya, y_ref, 1e-12, 1e-12, "batch_norm vs formula")
    assert_close(rva, rv_ref, 1e-12, 1e-12, "batch_norm running_var vs formula")
    assert_close(ya, yb, 1e-12, 1e-12, "batch_norm(N=1) vs instance_norm")
    assert_close(rma, rmb, 1e-12, 1e-12, "batch_norm(N=1) vs instance_norm: running_mean")
    assert_close(rva, rvb, 1e-12, 1e-12, "batch_norm(N=1) vs instance_norm: running_var")
    for name, ga, gb in zip(["x", "weight", "bias"], _grads(ya, ta, 61), _grads(yb, tb, 61)):
        assert_close(ga, gb, 1e-12, 1e-12, f"batch_norm(N=1) vs instance_norm: {name}.grad")


def test_instance_norm_equals_batch_norm_of_folded_batch():
    """instance_norm(x) == batch_norm(x viewed as (1, N*C, *spatial)) in training mode."""
    x = randn((3, 2, 7), 62, F64, 1.0, 1.5)
    ya = NF.instance_norm(x)
    yb = NF.batch_norm(x.reshape(1, 6, 7), None, None, training=True).reshape(x.shape)
    assert_close(ya, ref_instance_norm(x)[0], 1e-12, 1e-12, "instance_norm vs formula")
    assert_close(ya, yb, 1e-12, 1e-12, "instance_norm vs batch_norm of (1, N*C, L)")


@pytest.mark.parametrize("eps", [None, 1e-6, 1e-2])
def test_rms_norm_is_x_over_root_mean_square(eps):
    x = randn((4, 3, 6), 63, F64, 1.1, 0.6).requires_grad_()
    w = randn((3, 6), 64, F64, 1.0, 0.5).requires_grad_()
    y = NF.rms_norm(x, (3, 6), w, eps)
    e = eps if eps is not None else torch.finfo(F64).eps
    xd, wd = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    expected = xd / torch.sqrt((xd * xd).mean((1, 2), keepdim=True) + e) * wd
    assert_close(y, expected, 1e-12, 1e-12, f"rms_norm(eps={eps}) vs x / sqrt(mean(x^2) + eps) * w")
    for name, ga, gb in zip(["x", "weight"], _grads(y, (x, w), 65), _grads(expected, (xd, wd), 65)):
        assert_close(ga, gb, 1e-12, 1e-12, f"rms_norm(eps={eps}) {name}.grad vs formula")


# --------------------------------------------------------------------------------------------
# rms_norm eps=None: finfo of the compute dtype
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,magnitude", [(F16, 1e-3), (F16, 3e-4), (BF16, 3e-4), (F32, 1e-4), (F64, 1e-8)])
def test_rms_norm_default_eps_is_compute_dtype_eps(dtype, magnitude):
    """Inputs so small that mean(x^2) is comparable to finfo(compute dtype).eps: the eps used
    changes the output visibly. fp16/bf16 compute in fp32 (eps 1.19e-7, not fp16's 9.8e-4 or
    bf16's 7.8e-3); fp64 uses 2.2e-16 (not fp32's)."""
    x = (randn((3, 16), 70, F64, 0.1, 1.0) * magnitude).to(dtype)
    w = randn((16,), 71, F64, 0.2, 1.0).to(dtype)
    y = NF.rms_norm(x, (16,), w)
    assert y.dtype == dtype
    right = ref_rms_norm(x, (16,), w, compute_eps(dtype))
    tol = {F16: (2.0**-10, 2.0**-10), BF16: (2.0**-7, 2.0**-7), F32: (1e-6, 1e-5), F64: (1e-12, 1e-12)}[dtype]
    # the test is meaningful: other eps choices are far outside the tolerance
    for wrong_eps in {torch.finfo(dtype).eps, torch.finfo(F32).eps, torch.finfo(F64).eps, 0.0} - {compute_eps(dtype)}:
        wrong = ref_rms_norm(x, (16,), w, wrong_eps)
        assert max_abs_err(wrong, right) > 10 * (tol[0] + tol[1] * float(right.abs().max()))
    assert_close(y, right, tol[0], tol[1], f"rms_norm eps=None ({dtype}) vs formula with finfo(compute).eps")
    assert_close(y, F.rms_norm(x, (16,), w), tol[0], tol[1], f"rms_norm eps=None ({dtype}) vs torch")


# --------------------------------------------------------------------------------------------
# empty tensors
# --------------------------------------------------------------------------------------------
def _empty_cases():
    C = 3
    rm, rv = randn((C,), 80), positive((C,), 81)
    return [
        # (label, shape, param shape or None, has bias, fn(module, x, w, b, rm, rv))
        ("batch_norm train N=0", (0, C, 4), (C,), True,
         lambda m, x, w, b, rm, rv: m.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5)),
        ("batch_norm train spatial=0", (2, C, 0), (C,), True,
         lambda m, x, w, b, rm, rv: m.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5)),
        ("batch_norm train N=0, 4-D", (0, C, 2, 2), (C,), True,
         lambda m, x, w, b, rm, rv: m.batch_norm(x, rm, rv, w, b, True, 0.5, 1e-5)),
        ("batch_norm eval N=0", (0, C, 4), (C,), True,
         lambda m, x, w, b, rm, rv: m.batch_norm(x, rm, rv, w, b, False, 0.1, 1e-5)),
        ("batch_norm no stats N=0", (0, C, 4), (C,), True,
         lambda m, x, w, b, rm, rv: m.batch_norm(x, None, None, w, b, True, 0.1, 1e-5)),
        # torch's instance_norm fails on N=0 with a weight (an indexing error); without, it works
        ("instance_norm N=0", (0, C, 4), None, False,
         lambda m, x, w, b, rm, rv: m.instance_norm(x)),
        ("instance_norm eval N=0", (0, C, 4), None, False,
         lambda m, x, w, b, rm, rv: m.instance_norm(x, rm, rv, None, None, False)),
        ("group_norm N=0", (0, C, 4), (C,), True,
         lambda m, x, w, b, rm, rv: m.group_norm(x, 3, w, b)),
        ("layer_norm N=0", (0, 5), (5,), True,
         lambda m, x, w, b, rm, rv: m.layer_norm(x, (5,), w, b)),
        ("layer_norm N=0, 3-D", (2, 0, 5), (5,), True,
         lambda m, x, w, b, rm, rv: m.layer_norm(x, (5,), w, b)),
        ("rms_norm N=0", (0, 5), (5,), False,
         lambda m, x, w, b, rm, rv: m.rms_norm(x, (5,), w)),
    ], rm, rv


@pytest.mark.parametrize("index", range(11))
def test_empty_inputs_match_torch(index):
    cases, rm, rv = _empty_cases()
    label, shape, pshape, has_bias, fn = cases[index]
    results = {}
    for name, mod in (("normlab", NF), ("torch", F)):
        x = randn(shape, 84, F32, 1.0, 0.5).requires_grad_()  # zero elements
        w = randn(pshape, 82, F32, 1, 0.5).requires_grad_() if pshape else None
        b = randn(pshape, 83, F32).requires_grad_() if pshape and has_bias else None
        rmi, rvi = rm.float().clone(), rv.float().clone()
        y = fn(mod, x, w, b, rmi, rvi)
        y.sum().backward()  # must not crash
        results[name] = (y, x.grad, None if w is None else w.grad, None if b is None else b.grad, rmi, rvi)
    yn, xgn, wgn, bgn, rmn, rvn = results["normlab"]
    yt, xgt, wgt, bgt, rmt, rvt = results["torch"]
    assert yn.shape == yt.shape and yn.dtype == yt.dtype, f"{label}: {yn.shape}/{yn.dtype} vs torch {yt.shape}/{yt.dtype}"
    assert (xgn is None) == (xgt is None) and (xgn is None or xgn.shape == xgt.shape), f"{label}: x.grad"
    for what, a, e in (("weight.grad", wgn, wgt), ("bias.grad", bgn, bgt)):
        if e is not None:
            assert a is not None, f"{label}: {what} is None, torch gives {e}"
            assert_close(a, e, 0.0, 0.0, f"{label}: {what}")
    # running statistics untouched by an empty batch (as torch)
    assert torch.equal(rmn, rm.float()) and torch.equal(rvn, rv.float()), f"{label}: running stats changed"
    assert torch.equal(rmt, rm.float()) and torch.equal(rvt, rv.float())


# --------------------------------------------------------------------------------------------
# determinism
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("name", ["batch_norm", "instance_norm", "group_norm", "layer_norm", "rms_norm"])
def test_same_call_twice_is_bitwise_identical(name, dtype):
    shape = (4, 8, 16, 16)
    x = randn(shape, 90, dtype, 1.5, 0.7).contiguous(memory_format=torch.channels_last)
    if name in ("layer_norm", "rms_norm"):
        pshape = (16, 16)
    else:
        pshape = (8,)
    w, b = randn(pshape, 91, dtype, 1, 0.5), randn(pshape, 92, dtype)
    rm, rv = randn((8,), 93, dtype), positive((8,), 94, dtype)
    g = randn(shape, 95, dtype, 1.0, 0.3)

    def once():
        xi, wi, bi = x.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()
        rmi, rvi = rm.clone(), rv.clone()
        y = {
            "batch_norm": lambda: NF.batch_norm(xi, rmi, rvi, wi, bi, True, 0.1, 1e-5),
            "instance_norm": lambda: NF.instance_norm(xi, rmi, rvi, wi, bi, True, 0.1, 1e-5),
            "group_norm": lambda: NF.group_norm(xi, 4, wi, bi, 1e-5),
            "layer_norm": lambda: NF.layer_norm(xi, (16, 16), wi, bi, 1e-5),
            "rms_norm": lambda: NF.rms_norm(xi, (16, 16), wi, None) + 0 * bi.sum(),
        }[name]()
        (y * g).sum().backward()
        return [y.detach(), xi.grad, wi.grad, bi.grad, rmi, rvi]

    first, second = once(), once()
    for label, a, b_ in zip(["output", "x.grad", "weight.grad", "bias.grad", "running_mean", "running_var"],
                            first, second):
        assert torch.equal(a, b_), f"{name} ({dtype}): {label} differs between two identical calls"
