"""Property: torch accepts a call <=> normlab accepts it, and where both return, the answers
agree (NaN where torch gives NaN). Arguments are drawn from valid and invalid types and values
of each of the five functionals' parameters (issue 13). Parameters share the input's dtype:
mixed floating dtypes are a documented extension of normlab's (torch refuses some), and so is
an int ``normalized_shape`` in the functions (torch's modules take one, its functions only
sequences), which is therefore not drawn."""
from __future__ import annotations

import contextlib
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as TF
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import normlab
import normlab.functional as NF

SETTINGS = settings(max_examples=120, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])
DTYPES = [torch.float32, torch.float64, torch.int64]
BACKENDS = ["auto", "cpu", "reference"]


def _tensor(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.5
    return t.to(dtype) if dtype.is_floating_point else (t * 3).round().to(dtype)


def _draw_input(draw, max_ndim):
    """(x, its shape, a seed, the parameters' dtype): sizes 0-4 in 0 to ``max_ndim`` dims, a
    floating or integer dtype; parameters are floating (the input's dtype when it is one)."""
    ndim = draw(st.integers(0, max_ndim))
    shape = tuple(draw(st.lists(st.integers(0, 4), min_size=ndim, max_size=ndim)))
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 3))
    pdtype = dtype if dtype.is_floating_point else torch.float32
    return _tensor(shape, dtype, seed), shape, seed, pdtype


@st.composite
def channel_calls(draw, norm):
    x, shape, seed, pdtype = _draw_input(draw, max_ndim=5)
    c = shape[1] if len(shape) >= 2 else 3
    per = st.sampled_from(["none", "ok", "short", "2d", "int"])

    def param(kind, fill=None):
        if kind == "none":
            return None
        if kind == "ok":
            return _tensor((c,), pdtype, seed + 1).abs() + 0.1 if fill else _tensor((c,), pdtype,
                                                                                  seed + 1)
        if kind == "short":
            return _tensor((max(c - 1, 0) + 2,), pdtype, seed)
        if kind == "2d":
            return _tensor((1, c), pdtype, seed)
        return torch.ones(c, dtype=torch.int64)
    eps = draw(st.sampled_from([1e-5, 0.0, -1.0, 1e-3, float("nan"), 1]))
    args = dict(weight=param(draw(per)), bias=param(draw(per)), eps=eps)
    if norm == "group_norm":
        groups = draw(st.sampled_from([1, 2, 3, 0, -1, 2.0, np.int64(2), "2", True]))
        return (x, groups), args
    kinds = (draw(per), draw(per))
    rm, rv = param(kinds[0]), param(kinds[1], fill=True)
    momentum = draw(st.sampled_from([0.1, 0.0, 1, np.float32(0.5), None, "0.1"]))
    flag = draw(st.booleans())
    if norm == "batch_norm":
        return (x, rm, rv), dict(args, training=flag, momentum=momentum)
    return (x,), dict(args, running_mean=rm, running_var=rv, use_input_stats=flag,
                      momentum=momentum)


@st.composite
def row_calls(draw, norm):
    x, shape, seed, pdtype = _draw_input(draw, max_ndim=4)
    tail = shape[-1:] if shape else (3,)
    normalized = draw(st.sampled_from([
        tail, list(tail), shape[-2:] if len(shape) >= 2 else (2, 2), (), (5,), (-1,),
        (2.0,), "3", None, torch.Size(tail)]))
    try:
        nshape = tuple(normalized) if isinstance(normalized, (tuple, list)) else (normalized,)
        wshape = tuple(int(s) for s in nshape)
    except (TypeError, ValueError):
        wshape = tail
    pick = st.sampled_from(["none", "ok", "wrong"])

    def param(kind):
        if kind == "none":
            return None
        if kind == "ok":
            try:
                return _tensor(wshape, pdtype, seed + 1)
            except RuntimeError:  # a negative size
                return None
        return _tensor((7,), pdtype, seed)
    eps = draw(st.sampled_from([1e-5, 0.0, 1e-3, float("nan"), 1] +
                               ([None] if norm == "rms_norm" else [-1.0])))
    if norm == "rms_norm":
        return (x, normalized), dict(weight=param(draw(pick)), eps=eps)
    return (x, normalized), dict(weight=param(draw(pick)), bias=param(draw(pick)), eps=eps)


def _call(fn, args, kwargs):
    clone = lambda v: v.clone() if isinstance(v, torch.Tensor) else v
    args, kwargs = [clone(a) for a in args], {k: clone(v) for k, v in kwargs.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            out = fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - which exception is compared below
            return e, args, kwargs
    return out, args, kwargs


def _check(norm, args, kwargs, backend):
    want, targs, tkw = _call(getattr(TF, norm), args, kwargs)
    ctx = normlab.backend(backend) if backend != "auto" else contextlib.nullcontext()
    with ctx:
        got, nargs, nkw = _call(getattr(NF, norm), args, kwargs)
    torch_ok, ours_ok = not isinstance(want, Exception), not isinstance(got, Exception)
    x = args[0]
    if norm == "instance_norm" and not torch_ok and ours_ok and x.numel() == 0 \
            and x.dim() >= 2 and x.is_floating_point():
        # torch's InstanceNorm fails on an empty batch (an IndexError from inside its
        # batch_norm call: a torch bug, see the README); normlab returns the empty output
        assert got.shape == x.shape
        return
    assert torch_ok == ours_ok, (
        f"torch {'accepts' if torch_ok else 'raises ' + repr(want)[:200]}, normlab "
        f"{'accepts' if ours_ok else 'raises ' + repr(got)[:200]}")
    if torch_ok:
        torch.testing.assert_close(got, want, equal_nan=True, atol=1e-4, rtol=1e-4)
        for a, b in zip(list(nargs) + list(nkw.values()), list(targs) + list(tkw.values())):
            if isinstance(a, torch.Tensor):  # running statistics updated alike
                torch.testing.assert_close(a, b, equal_nan=True, atol=1e-4, rtol=1e-4)
    else:  # normlab's errors are the exceptions torch raises (RuntimeError, TypeError, ...)
        assert isinstance(got, (RuntimeError, TypeError, ValueError, IndexError)) \
            or type(got) is type(want), repr(got)  # (torch's own ZeroDivisionError: empty GN)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm", ["batch_norm", "instance_norm", "group_norm"])
def test_channel_norms_accept_what_torch_accepts(norm, backend):
    @SETTINGS
    @given(channel_calls(norm))
    def run(call):
        _check(norm, *call, backend)
    run()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm", ["layer_norm", "rms_norm"])
def test_row_norms_accept_what_torch_accepts(norm, backend):
    @SETTINGS
    @given(row_calls(norm))
    def run(call):
        _check(norm, *call, backend)
    run()
