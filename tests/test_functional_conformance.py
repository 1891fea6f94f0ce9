"""Property-based conformance of ``normlab.functional`` against ``torch.nn.functional``.

Every case is run three times on identical data (same values, same strides):

* normlab's own computation: the fused ``cpu`` backend (``"reference"`` without Numba),
  forced unless the test forces one (``auto`` hands some cells to ATen, whose answer is
  torch's: tests/test_auto.py),
* torch.nn.functional in the input dtype (the peer normlab is a drop-in for),
* torch.nn.functional in float64 on upcast copies (the "exact" answer), used for fp16/bf16
  inputs, where normlab (fp32 statistics, one rounding to the output dtype) must be *closer*
  to the float64 answer than the torch tolerance.

Forward output, ``x.grad``, ``weight.grad``, ``bias.grad`` (from ``(y * g).sum().backward()``
with a random upstream ``g``) and the running statistics (updated in place) are compared.
Inputs are ``randn * scale + offset`` with ``offset`` in [-3, 3]: never zero, never zero-mean.

Tolerances: ``|a - e| <= atol * max(1, max|e|) + slack * K + rtol * |e|`` with the dtype's
(atol, rtol) from TORCH_TOL / REF_TOL, and ``slack * K`` a few ulps of the working precision times
the size of the terms the quantity is computed from (``condition_scales``): a gradient element
can legitimately be the small difference of large terms (two-element groups), and torch's own
low-precision kernels are only that accurate. For well-conditioned cases K is O(1-10).

torch is run on a contiguous copy of the input (normlab on the drawn layout): torch's CPU
batch_norm backward is wrong for some ambiguously-strided inputs (see ``run_and_compare``).
"""
from __future__ import annotations

import contextlib
import importlib.util
import inspect
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import normlab
import normlab.functional as NF

F64, F32, BF16, F16 = torch.float64, torch.float32, torch.bfloat16, torch.float16
DTYPES = [F64, F32, BF16, F16]
LOW = (BF16, F16)
NORMS = ["batch_norm", "layer_norm", "group_norm", "instance_norm", "rms_norm"]

# the backend whose computation is checked: normlab's kernels (the reference engine without them)
OURS = "cpu" if "cpu" in normlab.available_backends() else "reference"
# (atol, rtol) against torch in the same dtype.
TORCH_TOL = {F64: (1e-10, 1e-10), F32: (1e-5, 1e-4), BF16: (1e-2, 1e-2), F16: (2e-3, 2e-3)}
# (atol, rtol) against the float64 computation, for low-precision inputs: about one rounding
# (unit roundoff u = 2^-8 for bf16, 2^-11 for fp16) in the normwise part, two in the relative
# part. Tighter than TORCH_TOL: normlab computes in fp32 and rounds once.
REF_TOL = {BF16: (2.0**-8, 2.0**-7), F16: (2.0**-11, 2.0**-10)}


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def assert_close(actual, expected, atol, rtol, what):
    """``|a - e| <= atol + rtol * |e|`` elementwise (NaN/inf must match); on failure report
    the worst element: max abs error, its index, the two values, and how many elements fail."""
    assert isinstance(actual, torch.Tensor), f"{what}: got {type(actual).__name__}, not a tensor"
    assert tuple(actual.shape) == tuple(expected.shape), (
        f"{what}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    )
    if expected.numel() == 0:
        return
    a = actual.detach().to(torch.float64)
    e = expected.detach().to(torch.float64)
    both_nan = torch.isnan(a) & torch.isnan(e)
    same_inf = torch.isinf(a) & torch.isinf(e) & (a == e)
    err = (a - e).abs()
    ok = (err <= atol + rtol * e.abs()) | both_nan | same_inf
    if bool(ok.all()):
        return
    err_for_max = torch.where(ok, torch.zeros_like(err), torch.nan_to_num(err, nan=math.inf))
    flat = int(torch.argmax(err_for_max.reshape(-1)))
    idx = tuple(int(i) for i in np.unravel_index(flat, tuple(a.shape)))
    n_bad = int((~ok).sum())
    raise AssertionError(
        f"{what}: {n_bad}/{a.numel()} elements out of tolerance (atol={atol:.3g}, rtol={rtol:.3g}); "
        f"worst at index {idx}: actual={a[idx].item()!r} expected={e[idx].item()!r} "
        f"abs err={err[idx].item():.6g} (max abs err over all elements "
        f"{torch.nan_to_num(err, nan=math.inf).max().item():.6g})"
    )


def close_normwise(actual, expected, tol, what, scale=1.0, extra_atol=0.0):
    """assert_close with ``atol * max(1, scale, max|expected|) + extra_atol``."""
    atol, rtol = tol
    scale = max(1.0, scale)
    if expected.numel():
        m = expected.detach().to(torch.float64).abs()
        m = m[torch.isfinite(m)]
        if m.numel():
            scale = max(scale, float(m.max()))
    assert_close(actual, expected, atol * scale + extra_atol, rtol, what)


def randn(shape, seed, dtype=F64, scale=1.0, offset=0.0):
    g = torch.Generator().manual_seed(int(seed) % (2**63))
    return (torch.randn(tuple(shape), generator=g, dtype=torch.float64) * scale + offset).to(dtype)


def positive(shape, seed, dtype=F64):
    g = torch.Generator().manual_seed(int(seed) % (2**63))
    return (torch.rand(tuple(shape), generator=g, dtype=torch.float64) * 1.5 + 0.25).to(dtype)


def make_input(shape, dtype, seed, scale, offset, layout):
    """A tensor of ``shape`` with the given memory layout (values depend on layout, fine)."""
    shape = tuple(shape)
    if layout == "contiguous":
        x = randn(shape, seed, dtype, scale, offset)
    elif layout == "channels_last":
        x = randn(shape, seed, dtype, scale, offset).contiguous(memory_format=torch.channels_last)
    elif layout == "channels_last_3d":
        x = randn(shape, seed, dtype, scale, offset).contiguous(memory_format=torch.channels_last_3d)
    elif layout == "sliced":  # every other element along the last dim
        big = randn(shape[:-1] + (2 * shape[-1],), seed, dtype, scale, offset)
        x = big[..., ::2]
    elif layout == "transposed":  # dims 0 and -1 swapped in memory
        tshape = list(shape)
        tshape[0], tshape[-1] = tshape[-1], tshape[0]
        x = randn(tshape, seed, dtype, scale, offset).transpose(0, -1)
    else:  # pragma: no cover
        raise AssertionError(layout)
    assert tuple(x.shape) == shape
    return x.detach()


def copy_strided(t):
    """An independent copy with exactly the same sizes and strides (non-dense views included)."""
    if t is None:
        return None
    out = torch.empty_strided(t.size(), t.stride(), dtype=t.dtype)
    out.copy_(t.detach())
    return out


def layouts_for(rank):
    out = ["contiguous", "sliced"]
    if rank >= 2:
        out.append("transposed")
    if rank == 4:
        out.append("channels_last")
    if rank == 5:
        out.append("channels_last_3d")
    return out


def make_affine(shape, dtype, seed, affine):
    w = randn(shape, seed + 101, dtype, 1.0, 0.5) if affine in ("both", "weight") else None
    b = randn(shape, seed + 202, dtype, 1.0, -0.25) if affine in ("both", "bias") else None
    return w, b


def _leaf(t, grad):
    if t is None:
        return None
    t = copy_strided(t)
    if grad and t.is_floating_point():
        t.requires_grad_(True)
    return t


def _cast(t, dtype):
    return None if t is None else copy_strided(t).to(dtype)


def max_rstd(groups, eps, centered=True):
    """Largest 1/sqrt(var + eps) (or 1/sqrt(mean(x^2) + eps)) over the rows of ``groups``."""
    g = groups.detach().to(torch.float64)
    if g.numel() == 0:
        return 1.0
    v = g.var(dim=1, unbiased=False) if centered else g.pow(2).mean(dim=1)
    return float((v.min() + eps) ** -0.5)


def condition_scales(x, params, buffers, g, rstd):
    """Size of the terms each compared quantity is computed from (see the module docstring).

    Two correct implementations at working precision eps differ by about eps * K, where K is
    the size of the terms, not of the result: ``x.grad = rstd * (w*g - mean(w*g) - xhat *
    mean(w*g*xhat))`` can cancel almost completely (e.g. two-element groups), and ``xhat`` itself
    carries an error of eps * max|x| * rstd. Calibrated on torch vs float64: torch's own error is
    below 2.5 * eps * K for every norm and dtype.
    """
    xd = x.detach().to(F64)
    xmax = float(xd.abs().max()) if xd.numel() else 1.0
    cond = max(1.0, xmax * rstd)
    w = params.get("weight")
    wmax = 1.0 if w is None or w.numel() == 0 else max(1.0, float(w.detach().to(F64).abs().max()))
    gmax = float(g.detach().to(F64).abs().max()) if g is not None and g.numel() else 1.0
    K = {"output": rstd * xmax * wmax, "x.grad": rstd * wmax * gmax * cond}
    for k, v in params.items():
        if v is not None and v.numel():
            m = x.numel() / v.numel()
            K[f"{k}.grad"] = gmax * math.sqrt(m) * (cond if k == "weight" else 1.0)
    for k, v in buffers.items():
        if v is not None and v.numel():
            K[k] = float(v.detach().to(F64).abs().max()) * cond
    return K


def slack(dtype):
    """Absolute slack per unit of condition scale: a few ulps of the working precision."""
    return 8 * torch.finfo(dtype).eps


def run_and_compare(name, call, x, params, buffers, seed, backward=True, ref=None, torch_tol=None,
                    rstd=1.0, torch_same_layout=False):
    """Run ``call(module, x, params, buffers)`` with normlab, torch (same dtype) and torch in
    float64; compare outputs, gradients and the in-place-updated buffers.

    ``ref``: None -> use the float64 reference for low-precision inputs only; True/False forces.
    ``rstd``: the largest 1/std (1/rms for rms_norm) of the case's groups, for the condition scale.
    ``torch_tol=(0, 0)`` demands bitwise equality with torch.

    normlab always gets ``x`` with its layout (strided, channels_last, ...). torch gets a
    contiguous copy of the same values unless ``torch_same_layout``: torch's CPU kernels have
    layout bugs of their own, e.g. batch_norm's backward is wrong for the (1, 2, 1, 2) input with
    strides (1, 1, 1, 2) (ambiguously channels_last; torch fails gradcheck on it), and the
    semantic answer does not depend on the layout.
    """
    dtype = x.dtype
    if ref is None:
        ref = dtype in LOW
    ttol = TORCH_TOL[dtype] if torch_tol is None else torch_tol
    exact = ttol == (0.0, 0.0)
    x_before = copy_strided(x)
    g = randn(x.shape, seed + 999, dtype, 1.0, 0.3) if backward else None

    runs = {}
    modes = [("normlab", NF, None), ("torch", F, None)]
    if ref:
        modes.append(("float64", F, F64))
    for label, mod, cdt in modes:
        if label == "normlab" or torch_same_layout:
            xi = _leaf(x if cdt is None else _cast(x, cdt), backward)
        else:
            xi = _leaf((x if cdt is None else x.to(cdt)).contiguous(), backward)
        pi = {k: _leaf(v if cdt is None else _cast(v, cdt), backward) for k, v in params.items()}
        bi = {k: (None if v is None else v.clone() if cdt is None else v.to(cdt).clone())
              for k, v in buffers.items()}
        forced = label == "normlab" and normlab.current_backend() == "auto"
        with normlab.backend(OURS) if forced else contextlib.nullcontext():
            y = call(mod, xi, pi, bi)
        grads = {}
        if backward:
            (y * (g if cdt is None else g.to(cdt))).sum().backward()
            grads["x.grad"] = xi.grad
            for k, v in pi.items():
                if v is not None:
                    grads[f"{k}.grad"] = v.grad
        runs[label] = (xi, y, grads, bi)

    xn, yn, gn, bn = runs["normlab"]
    _, yt, gt, bt = runs["torch"]

    # dtype / shape contract
    assert isinstance(yn, torch.Tensor), f"{name}: returned {type(yn).__name__}"
    assert yn.dtype == dtype, f"{name}: output dtype {yn.dtype} != input dtype {dtype}"
    assert tuple(yn.shape) == tuple(x.shape), f"{name}: output shape {tuple(yn.shape)} != {tuple(x.shape)}"
    # the input must not be modified
    assert torch.equal(xn.detach(), x_before), f"{name}: the input was modified"

    K = condition_scales(x, params, {k: v for k, v in bt.items()}, g, rstd)
    tslack = 0.0 if exact else slack(dtype)

    def vs_torch(actual, expected, key, what):
        close_normwise(actual, expected, ttol, f"{name} {what} vs torch ({dtype})",
                       extra_atol=tslack * K.get(key, 1.0))

    vs_torch(yn, yt, "output", "output")
    for k in bt:
        if bt[k] is None:
            continue
        assert bn[k].dtype == bt[k].dtype, f"{name}: {k} dtype changed to {bn[k].dtype}"
        vs_torch(bn[k], bt[k], k, f"{k} (updated in place)")
    for k in gt:
        assert gn.get(k) is not None, f"{name}: {k} is None but torch computed it"
        assert gn[k].dtype == gt[k].dtype, f"{name}: {k} dtype {gn[k].dtype} != torch {gt[k].dtype}"
        vs_torch(gn[k], gt[k], k, k)

    if ref:
        # one rounding to the low-precision dtype, plus fp32-computation slack
        _, yr, gr, br = runs["float64"]
        rtol_pair = REF_TOL[dtype]
        rslack = slack(F32)

        def vs_ref(actual, expected, key, what):
            close_normwise(actual, expected, rtol_pair, f"{name} {what} vs float64 reference ({dtype})",
                           extra_atol=rslack * K.get(key, 1.0))

        vs_ref(yn, yr, "output", "output")
        for k in br:
            if br[k] is not None:
                vs_ref(bn[k], br[k], k, k)
        for k in gr:
            vs_ref(gn[k], gr[k], k, k)
    return runs


# --------------------------------------------------------------------------------------------
# strategies
# --------------------------------------------------------------------------------------------
seeds = st.integers(0, 2**31 - 1)
dtypes = st.sampled_from(DTYPES)
offsets = st.floats(-3.0, 3.0, allow_nan=False)
scales = st.floats(0.5, 2.0, allow_nan=False)
eps_values = st.sampled_from([1e-5, 1e-3, 0.1])
momenta = st.sampled_from([0.0, 0.1, 0.5, 1.0])
affines = st.sampled_from(["none", "both", "weight", "bias"])


@st.composite
def nc_shapes(draw, min_rank, max_rank, max_n=5):
    rank = draw(st.integers(min_rank, max_rank))
    n = draw(st.integers(1, max_n))
    c = draw(st.integers(1, 8))
    spatial = draw(st.lists(st.integers(1, 7), min_size=rank - 2, max_size=rank - 2))
    return (n, c, *spatial)


@st.composite
def trailing_shapes(draw):
    """(input shape, normalized_shape): 0-2 leading dims, 1-3 normalized dims."""
    k = draw(st.integers(1, 3))
    lead = draw(st.lists(st.integers(1, 6), min_size=0, max_size=2))
    ns = draw(st.lists(st.integers(1, 7), min_size=k, max_size=k))
    return tuple(lead) + tuple(ns), tuple(ns)


def draw_common(data, rank):
    return dict(
        dtype=data.draw(dtypes, label="dtype"),
        layout=data.draw(st.sampled_from(layouts_for(rank)), label="layout"),
        seed=data.draw(seeds, label="seed"),
        scale=data.draw(scales, label="scale"),
        offset=data.draw(offsets, label="offset"),
    )


# --------------------------------------------------------------------------------------------
# batch_norm
# --------------------------------------------------------------------------------------------
@given(data=st.data())
def test_batch_norm_matches_torch(data):
    shape = data.draw(nc_shapes(2, 5), label="shape")
    c = draw_common(data, len(shape))
    has_running = data.draw(st.booleans(), label="has_running")
    training = data.draw(st.booleans(), label="training") if has_running else True
    if training and shape[0] * math.prod(shape[2:]) == 1:
        shape = (2,) + shape[1:]  # torch refuses one value per channel when training
    affine = data.draw(affines, label="affine")
    momentum = data.draw(momenta, label="momentum")
    eps = data.draw(eps_values, label="eps")
    dtype, seed = c["dtype"], c["seed"]

    x = make_input(shape, dtype, seed, c["scale"], c["offset"], c["layout"])
    C = shape[1]
    w, b = make_affine((C,), dtype, seed, affine)
    rm = randn((C,), seed + 3, dtype, 0.5, c["offset"]) if has_running else None
    rv = positive((C,), seed + 4, dtype) if has_running else None

    def call(m, x, p, bf):
        return m.batch_norm(x, bf["running_mean"], bf["running_var"], weight=p["weight"],
                            bias=p["bias"], training=training, momentum=momentum, eps=eps)

    if training:
        rstd = max_rstd(x.transpose(0, 1).reshape(C, -1), eps)
    else:
        rstd = float((rv.double().min() + eps) ** -0.5)
    run_and_compare("batch_norm", call, x, {"weight": w, "bias": b},
                    {"running_mean": rm, "running_var": rv}, seed, rstd=rstd)


# --------------------------------------------------------------------------------------------
# instance_norm
# --------------------------------------------------------------------------------------------
@given(data=st.data())
def test_instance_norm_matches_torch(data):
    shape = data.draw(nc_shapes(3, 5), label="shape")
    c = draw_common(data, len(shape))
    use_input_stats = data.draw(st.booleans(), label="use_input_stats")
    has_running = True if not use_input_stats else data.draw(st.booleans(), label="has_running")
    if use_input_stats and math.prod(shape[2:]) == 1:
        shape = shape[:2] + (2,) + shape[3:]  # torch refuses one spatial element when training
    affine = data.draw(affines, label="affine")
    momentum = data.draw(momenta, label="momentum")
    eps = data.draw(eps_values, label="eps")
    dtype, seed = c["dtype"], c["seed"]

    x = make_input(shape, dtype, seed, c["scale"], c["offset"], c["layout"])
    C = shape[1]
    w, b = make_affine((C,), dtype, seed, affine)
    rm = randn((C,), seed + 3, dtype, 0.5, c["offset"]) if has_running else None
    rv = positive((C,), seed + 4, dtype) if has_running else None

    def call(m, x, p, bf):
        return m.instance_norm(x, bf["running_mean"], bf["running_var"], weight=p["weight"],
                               bias=p["bias"], use_input_stats=use_input_stats,
                               momentum=momentum, eps=eps)

    if use_input_stats:
        rstd = max_rstd(x.reshape(shape[0] * C, -1), eps)
    else:
        rstd = float((rv.double().min() + eps) ** -0.5)
    run_and_compare("instance_norm", call, x, {"weight": w, "bias": b},
                    {"running_mean": rm, "running_var": rv}, seed, rstd=rstd)


@given(seed=seeds, dtype=dtypes, n=st.integers(1, 5), C=st.integers(1, 8), affine=affines,
       offset=offsets)
def test_instance_norm_2d_input_with_running_stats(seed, dtype, n, C, affine, offset):
    """torch accepts a 2-D (N, C) input when use_input_stats=False (plain eval normalization)."""
    x = make_input((n, C), dtype, seed, 1.0, offset, "contiguous")
    w, b = make_affine((C,), dtype, seed, affine)
    rm = randn((C,), seed + 3, dtype, 0.5, offset)
    rv = positive((C,), seed + 4, dtype)

    def call(m, x, p, bf):
        return m.instance_norm(x, bf["running_mean"], bf["running_var"], p["weight"], p["bias"],
                               False, 0.1, 1e-5)

    run_and_compare("instance_norm(2-D)", call, x, {"weight": w, "bias": b},
                    {"running_mean": rm, "running_var": rv}, seed,
                    rstd=float((rv.double().min() + 1e-5) ** -0.5))


# --------------------------------------------------------------------------------------------
# group_norm
# --------------------------------------------------------------------------------------------
@given(data=st.data())
def test_group_norm_matches_torch(data):
    shape = data.draw(nc_shapes(2, 5), label="shape")
    c = draw_common(data, len(shape))
    C = shape[1]
    groups = data.draw(st.sampled_from([g for g in range(1, C + 1) if C % g == 0]), label="groups")
    if shape[0] * (C // groups) * math.prod(shape[2:]) == 1:
        shape = (2,) + shape[1:]  # torch refuses one value per group
    affine = data.draw(affines, label="affine")
    eps = data.draw(eps_values, label="eps")
    dtype, seed = c["dtype"], c["seed"]

    x = make_input(shape, dtype, seed, c["scale"], c["offset"], c["layout"])
    w, b = make_affine((C,), dtype, seed, affine)

    def call(m, x, p, bf):
        w = p["weight"]
        if m is F and w is None and p["bias"] is not None:
            # torch's group_norm backward fails ("tensor does not have a device") with a bias
            # but no weight; weight=ones is the same function
            w = torch.ones(C, dtype=p["bias"].dtype)
        return m.group_norm(x, groups, weight=w, bias=p["bias"], eps=eps)

    run_and_compare("group_norm", call, x, {"weight": w, "bias": b}, {}, seed,
                    rstd=max_rstd(x.reshape(shape[0] * groups, -1), eps))


# --------------------------------------------------------------------------------------------
# layer_norm / rms_norm
# --------------------------------------------------------------------------------------------
@given(data=st.data())
def test_layer_norm_matches_torch(data):
    shape, ns = data.draw(trailing_shapes(), label="shape/normalized_shape")
    c = draw_common(data, len(shape))
    affine = data.draw(affines, label="affine")
    eps = data.draw(eps_values, label="eps")
    as_list = data.draw(st.booleans(), label="normalized_shape as list")
    dtype, seed = c["dtype"], c["seed"]

    x = make_input(shape, dtype, seed, c["scale"], c["offset"], c["layout"])
    w, b = make_affine(ns, dtype, seed, affine)
    ns_arg = list(ns) if as_list else ns

    def call(m, x, p, bf):
        return m.layer_norm(x, ns_arg, weight=p["weight"], bias=p["bias"], eps=eps)

    run_and_compare("layer_norm", call, x, {"weight": w, "bias": b}, {}, seed,
                    rstd=max_rstd(x.reshape(-1, math.prod(ns)), eps))


@given(data=st.data())
def test_rms_norm_matches_torch(data):
    shape, ns = data.draw(trailing_shapes(), label="shape/normalized_shape")
    c = draw_common(data, len(shape))
    has_weight = data.draw(st.booleans(), label="has_weight")
    eps = data.draw(st.sampled_from([None, 1e-5, 1e-3, 0.1]), label="eps")
    dtype, seed = c["dtype"], c["seed"]

    x = make_input(shape, dtype, seed, c["scale"], c["offset"], c["layout"])
    w = randn(ns, seed + 101, dtype, 1.0, 0.5) if has_weight else None

    def call(m, x, p, bf):
        # eps=None means finfo(compute dtype).eps: the float64 reference of a low-precision
        # input must use fp32's eps, not fp64's
        e = torch.finfo(F32).eps if eps is None and x.dtype != dtype else eps
        return m.rms_norm(x, ns, weight=p["weight"], eps=e)

    rms_eps = torch.finfo(F64 if dtype == F64 else F32).eps if eps is None else eps
    run_and_compare("rms_norm", call, x, {"weight": w}, {}, seed,
                    rstd=max_rstd(x.reshape(-1, math.prod(ns)), rms_eps, centered=False))


@settings(max_examples=6)
@given(seed=seeds, dtype=dtypes, which=st.sampled_from(["layer_norm", "rms_norm"]),
       ns_len=st.sampled_from([1, 2]), affine=st.booleans(), offset=offsets,
       layout=st.sampled_from(["contiguous", "sliced", "transposed"]))
def test_long_rows_match_torch(seed, dtype, which, ns_len, affine, offset, layout):
    """(5, 123, 123): rows of 123 and of 123*123 elements."""
    shape = (5, 123, 123)
    ns = shape[-ns_len:]
    x = make_input(shape, dtype, seed, 1.0, offset, layout)
    w = randn(ns, seed + 101, dtype, 1.0, 0.5) if affine else None
    b = randn(ns, seed + 202, dtype, 1.0, -0.25) if affine and which == "layer_norm" else None
    if which == "layer_norm":
        def call(m, x, p, bf):
            return m.layer_norm(x, ns, p["weight"], p["bias"], 1e-5)
        params = {"weight": w, "bias": b}
    else:
        def call(m, x, p, bf):
            e = torch.finfo(F32).eps if x.dtype != dtype else None  # float64 reference of low precision
            return m.rms_norm(x, ns, p["weight"], e)
        params = {"weight": w}
    run_and_compare(which, call, x, params, {}, seed,
                    rstd=max_rstd(x.reshape(-1, math.prod(ns)), 1e-5, centered=which == "layer_norm"))


# --------------------------------------------------------------------------------------------
# running statistics over several steps
# --------------------------------------------------------------------------------------------
@given(seed=seeds, dtype=dtypes, which=st.sampled_from(["batch_norm", "instance_norm"]),
       shape=nc_shapes(3, 4), momentum=momenta, offset=offsets, eps=eps_values)
def test_running_stats_three_steps(seed, dtype, which, shape, momentum, offset, eps):
    if math.prod(shape[2:]) == 1:
        shape = shape[:2] + (3,) + shape[3:]
    C = shape[1]
    rm0 = randn((C,), seed + 3, dtype, 0.5, 0.0)
    rv0 = positive((C,), seed + 4, dtype)
    bufs = {"normlab": (rm0.clone(), rv0.clone()), "torch": (rm0.clone(), rv0.clone())}
    w = randn((C,), seed + 101, dtype, 1.0, 0.5)
    b = randn((C,), seed + 202, dtype, 1.0, 0.0)
    fn = {"normlab": getattr(NF, which), "torch": getattr(F, which)}
    kw = {"training": True} if which == "batch_norm" else {"use_input_stats": True}
    tol = TORCH_TOL[dtype]
    for step in range(3):
        x = randn(shape, seed + 17 * (step + 1), dtype, 1.0 + step, offset + step)
        ids = {k: (v[0].data_ptr(), v[1].data_ptr()) for k, v in bufs.items()}
        out = {}
        for k in ("normlab", "torch"):
            out[k] = fn[k](x, bufs[k][0], bufs[k][1], weight=w, bias=b, momentum=momentum,
                           eps=eps, **kw)
        groups = x.transpose(0, 1).reshape(C, -1) if which == "batch_norm" else x.reshape(-1, x[0, 0].numel())
        K = condition_scales(x, {"weight": w}, {"running_mean": rm0, "running_var": rv0},
                             None, max_rstd(groups, eps))
        (rm_n, rv_n), (rm_t, rv_t) = bufs["normlab"], bufs["torch"]
        K["running_var"] = max(K["running_var"], float(rv_t.double().abs().max()) * K["output"])
        sl = slack(dtype)
        close_normwise(out["normlab"], out["torch"], tol, f"{which} step {step} output",
                       extra_atol=sl * K["output"])
        assert (rm_n.data_ptr(), rv_n.data_ptr()) == ids["normlab"]
        close_normwise(rm_n, rm_t, tol, f"{which} step {step} running_mean", extra_atol=sl * K["running_mean"])
        close_normwise(rv_n, rv_t, tol, f"{which} step {step} running_var", extra_atol=sl * K["running_var"])
        # each library keeps going from its own buffers


@given(seed=seeds, dtype=st.sampled_from(LOW), which=st.sampled_from(["batch_norm", "instance_norm"]),
       shape=nc_shapes(3, 4), momentum=momenta, offset=offsets)
def test_running_stats_low_precision_vs_float64(seed, dtype, which, shape, momentum, offset):
    """Three steps; before each step, the float64 computation starts from normlab's current
    (low-precision) buffers, so the float64 answer for this step is exact."""
    if math.prod(shape[2:]) == 1:
        shape = shape[:2] + (3,) + shape[3:]
    C = shape[1]
    rm = randn((C,), seed + 3, dtype, 0.5, 0.0)
    rv = positive((C,), seed + 4, dtype)
    kw = {"training": True} if which == "batch_norm" else {"use_input_stats": True}
    for step in range(3):
        x = randn(shape, seed + 17 * (step + 1), dtype, 1.0 + step, offset + step)
        rm_r, rv_r = rm.double(), rv.double()
        getattr(F, which)(x.double(), rm_r, rv_r, momentum=momentum, **kw)
        getattr(NF, which)(x, rm, rv, momentum=momentum, **kw)
        close_normwise(rm, rm_r, REF_TOL[dtype], f"{which} step {step} running_mean vs float64")
        close_normwise(rv, rv_r, REF_TOL[dtype], f"{which} step {step} running_var vs float64")


# --------------------------------------------------------------------------------------------
# mixed dtypes (normlab is more permissive than torch): compare with the float64 computation
# --------------------------------------------------------------------------------------------
@given(seed=seeds, which=st.sampled_from(NORMS),
       pair=st.sampled_from([(F32, BF16), (F32, F16), (BF16, F32), (F16, F32), (F64, F32)]),
       offset=offsets)
def test_mixed_dtypes_match_float64(seed, which, pair, offset):
    xdt, pdt = pair
    shape = (3, 4, 5)
    C = 4
    x = make_input(shape, xdt, seed, 1.0, offset, "contiguous")
    if which in ("layer_norm", "rms_norm"):
        pshape = (5,)
    else:
        pshape = (C,)
    w = randn(pshape, seed + 101, pdt, 1.0, 0.5)
    b = randn(pshape, seed + 202, pdt, 1.0, -0.25)
    sdt = xdt if xdt in (F32, F64) else F32  # running stats: fp32 for low-precision input (torch's rule)
    rm = randn((C,), seed + 3, sdt, 0.5, offset)
    rv = positive((C,), seed + 4, sdt)

    def call(m, x, w, b, rm, rv):
        if which == "batch_norm":
            return m.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5)
        if which == "instance_norm":
            return m.instance_norm(x, rm, rv, w, b, True, 0.1, 1e-5)
        if which == "group_norm":
            return m.group_norm(x, 2, w, b, 1e-5)
        if which == "layer_norm":
            return m.layer_norm(x, (5,), w, b, 1e-5)
        return m.rms_norm(x, (5,), w, 1e-5)

    xn = x.clone().requires_grad_()
    wn, bn = w.clone().requires_grad_(), b.clone().requires_grad_()
    rmn, rvn = rm.clone(), rv.clone()
    yn = call(NF, xn, wn, bn, rmn, rvn)
    assert yn.dtype == xdt and yn.shape == x.shape
    xr = x.double().requires_grad_()
    wr, br = w.double().requires_grad_(), b.double().requires_grad_()
    rmr, rvr = rm.double(), rv.double()
    yr = call(F, xr, wr, br, rmr, rvr)
    g = randn(shape, seed + 999, xdt, 1.0, 0.3)
    (yn * g).sum().backward()
    (yr * g.double()).sum().backward()

    def tol(dt):  # the precision the compared tensor is rounded to
        return REF_TOL.get(dt, {F32: (1e-5, 1e-4), F64: (1e-10, 1e-10)}.get(dt))

    close_normwise(yn, yr, tol(xdt), f"{which} {pair} output vs float64")
    close_normwise(xn.grad, xr.grad, tol(xdt), f"{which} {pair} x.grad vs float64")
    assert wn.grad is not None and wn.grad.dtype == pdt
    close_normwise(wn.grad, wr.grad, tol(pdt), f"{which} {pair} weight.grad vs float64")
    if which != "rms_norm":
        assert bn.grad is not None and bn.grad.dtype == pdt
        close_normwise(bn.grad, br.grad, tol(pdt), f"{which} {pair} bias.grad vs float64")
    if which in ("batch_norm", "instance_norm"):
        assert rmn.dtype == sdt and rvn.dtype == sdt
        close_normwise(rmn, rmr, tol(sdt), f"{which} {pair} running_mean vs float64")
        close_normwise(rvn, rvr, tol(sdt), f"{which} {pair} running_var vs float64")


# --------------------------------------------------------------------------------------------
# signatures, defaults, backends
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NORMS)
def test_signature_matches_torch(name):
    ours = inspect.signature(getattr(NF, name)).parameters
    theirs = inspect.signature(getattr(F, name)).parameters
    assert list(ours) == list(theirs), f"{name}: parameter names {list(ours)} != {list(theirs)}"
    for p in theirs:
        assert ours[p].default == theirs[p].default, (
            f"{name}({p}=...): default {ours[p].default!r} != torch {theirs[p].default!r}"
        )
        assert ours[p].kind == theirs[p].kind, f"{name}({p}): kind {ours[p].kind} != {theirs[p].kind}"


def test_defaults_behave_like_torch():
    x = randn((4, 3, 5), 7, F32, 1.5, 1.0)
    rm, rv = randn((3,), 8, F32, 0.5, 0.2), positive((3,), 9, F32)
    rm_t, rv_t = rm.clone(), rv.clone()
    # batch_norm defaults: training=False -> eval with running stats, no update
    close_normwise(NF.batch_norm(x, rm, rv), F.batch_norm(x, rm_t, rv_t), TORCH_TOL[F32], "batch_norm defaults")
    assert torch.equal(rm, rm_t) and torch.equal(rv, rv_t)
    # instance_norm defaults: use_input_stats=True, no running stats
    close_normwise(NF.instance_norm(x), F.instance_norm(x), TORCH_TOL[F32], "instance_norm defaults")
    close_normwise(NF.group_norm(x, 3), F.group_norm(x, 3), TORCH_TOL[F32], "group_norm defaults")
    close_normwise(NF.layer_norm(x, (5,)), F.layer_norm(x, (5,)), TORCH_TOL[F32], "layer_norm defaults")
    close_normwise(NF.rms_norm(x, [3, 5]), F.rms_norm(x, [3, 5]), TORCH_TOL[F32], "rms_norm defaults")


def _current_backend():
    return normlab.current_backend()


def test_default_backend_is_auto():
    assert _current_backend() == "auto"
    from normlab._dispatch import auto_backend

    has_numba = importlib.util.find_spec("numba") is not None
    assert auto_backend(torch.ones(1)) == ("cpu" if has_numba else "reference")
    assert auto_backend(torch.ones(1, device="meta")) == "reference"


def _one_of_each(seed, dtype):
    """(name, call) for the five norms, with weights/bias/running stats, training mode."""
    shape = (3, 4, 5, 3)
    C = 4
    x = make_input(shape, dtype, seed, 1.3, 1.7, "channels_last")
    pw = randn((C,), seed + 1, dtype, 1.0, 0.5)
    pb = randn((C,), seed + 2, dtype, 1.0, 0.2)
    lw = randn((5, 3), seed + 3, dtype, 1.0, 0.5)
    lb = randn((5, 3), seed + 4, dtype, 1.0, 0.2)
    rm = randn((C,), seed + 5, dtype, 0.5, 1.0)
    rv = positive((C,), seed + 6, dtype)
    return [
        ("batch_norm", lambda m, x, p, bf: m.batch_norm(x, bf["running_mean"], bf["running_var"], p["weight"], p["bias"], True, 0.3, 1e-5),
         x, {"weight": pw, "bias": pb}, {"running_mean": rm, "running_var": rv}),
        ("instance_norm", lambda m, x, p, bf: m.instance_norm(x, bf["running_mean"], bf["running_var"], p["weight"], p["bias"], True, 0.3, 1e-3),
         x, {"weight": pw, "bias": pb}, {"running_mean": rm, "running_var": rv}),
        ("group_norm", lambda m, x, p, bf: m.group_norm(x, 2, p["weight"], p["bias"], 1e-5),
         x, {"weight": pw, "bias": pb}, {}),
        ("layer_norm", lambda m, x, p, bf: m.layer_norm(x, (5, 3), p["weight"], p["bias"], 1e-5),
         x, {"weight": lw, "bias": lb}, {}),
        # eps=None; the float64 reference of a low-precision input uses fp32's eps, as normlab
        ("rms_norm", lambda m, x, p, bf: m.rms_norm(x, (5, 3), p["weight"],
                                                    torch.finfo(F32).eps if x.dtype != dtype else None),
         x, {"weight": lw}, {}),
    ]


@pytest.mark.parametrize("dtype", DTYPES)
def test_torch_backend_is_identical_to_torch(dtype):
    for name, call, x, params, bufs in _one_of_each(11, dtype):
        with normlab.backend("torch"):
            assert _current_backend() == "torch"
            runs = run_and_compare(name, call, x, params, bufs, 11, ref=False,
                                   torch_tol=(0.0, 0.0), torch_same_layout=True)
        xn, yn, gn, bn = runs["normlab"]
        _, yt, gt, bt = runs["torch"]
        assert torch.equal(yn, yt), f"{name}: backend('torch') output differs from torch"
        for k in gt:
            assert torch.equal(gn[k], gt[k]), f"{name}: backend('torch') {k} differs from torch"
        for k in bt:
            assert torch.equal(bn[k], bt[k]), f"{name}: backend('torch') {k} differs from torch"
        assert _current_backend() == "auto"


@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_backend_matches_torch(dtype):
    for name, call, x, params, bufs in _one_of_each(12, dtype):
        with normlab.backend("reference") as chosen:
            assert chosen == "reference"
            assert _current_backend() == "reference"
            run_and_compare(name, call, x, params, bufs, 12)


def test_backend_errors():
    assert issubclass(normlab.BackendUnavailableError, RuntimeError)
    available = normlab.available_backends()
    assert "reference" in available and "torch" in available
    if importlib.util.find_spec("triton") is None:
        assert "triton" not in available
    # known backends that cannot run here ("triton" without triton/GPU, "cpu" without numba)
    for name in sorted({"cpu", "triton"} - set(available)):
        with pytest.raises(normlab.BackendUnavailableError):
            with normlab.backend(name):
                pass
        assert _current_backend() == "auto"
    with pytest.raises(ValueError):
        with normlab.backend("no-such-backend"):
            pass
    assert _current_backend() == "auto"
    # the forced backend is restored after an exception inside the block, and nesting works
    with pytest.raises(KeyError):
        with normlab.backend("torch"):
            with normlab.backend("reference"):
                assert _current_backend() == "reference"
            assert _current_backend() == "torch"
            raise KeyError("boom")
    assert _current_backend() == "auto"
