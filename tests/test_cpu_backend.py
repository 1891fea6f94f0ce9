"""The fused Numba ``cpu`` backend (all five norms, forward and backward) against the reference
engine (tight) and ``torch.nn.functional`` (where torch computes the same case).

Covered: every norm and mode (BatchNorm training/eval, InstanceNorm with input statistics with
and without running statistics and with ``use_input_stats=False``, GroupNorm for several group
counts, LayerNorm and RMSNorm over one or two axes), random shapes, the four dtypes, offsets,
affine options, running statistics (momentum 0 / 0.1 / 1), layouts (contiguous, channels_last,
channels_last_3d, sequence-transposed (N, L, C) inputs, non-dense strided views, dy in another
layout than x), output strides, special shapes (2-D BatchNorm1d inputs, spatial size 1, odd and
long rows, one-element statistics sets), gradients of the parameters only, NaN/inf propagation,
numerical stability at large means, determinism across runs and thread counts, double backward
(gradcheck, gradgradcheck, gradient penalties), that the fused kernels really run (and on the
input's memory), and the fallbacks (empty inputs, non-CPU tensors).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, replace

import numpy as np
import pytest
import torch
import torch.nn.functional as TF
from hypothesis import given
from hypothesis import strategies as st
from torch.autograd import gradcheck, gradgradcheck

import normlab
import normlab.functional as F
from normlab import _engine as E

pytest.importorskip("numba")

F64, F32, F16, BF16 = torch.float64, torch.float32, torch.float16, torch.bfloat16
DTYPES = [F64, F32, F16, BF16]
TOL = {F64: 1e-10, F32: 2e-5, F16: 4e-3, BF16: 2e-2}  # relative to the scale of the expected
PARAM_GRAD_LOOSENESS = 8  # weight/bias gradients sum over many elements
EPS = 1e-5

# Every norm and mode with a distinct code path. "instance" uses the input statistics (running
# statistics optional), "instance_eval" is use_input_stats=False.
NORMS = ("batch_train", "batch_eval", "instance", "instance_eval", "group", "layer", "rms")
CHANNEL_NORMS = NORMS[:5]
RUNNING_REQUIRED = ("batch_eval", "instance_eval")


# --------------------------------------------------------------------------------------------
# cases, layouts, runs and comparisons
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    norm: str
    shape: tuple
    dtype: torch.dtype = F32
    groups: int = 1  # num_groups for "group"; the number of normalized axes for "layer"/"rms"
    affine: str = "both"  # "none", "weight" or "both" (rms: never a bias)
    running: bool = True  # running statistics given (always for the *_eval modes)
    momentum: float = 0.1
    offset: float = 0.0
    scale: float = 1.7
    seed: int = 0

    @property
    def param_shape(self) -> tuple:
        if self.norm in ("layer", "rms"):
            return tuple(self.shape[len(self.shape) - self.groups:])
        return (self.shape[1],)

    def tensors(self) -> dict:
        """Contiguous inputs in the case's dtype: x, dy, weight, bias, running statistics."""
        g = torch.Generator().manual_seed(self.seed)

        def randn(shape):
            return torch.randn(shape, generator=g, dtype=F64)

        c = self.shape[1] if len(self.shape) > 1 else 1
        t = {
            "x": (randn(self.shape) * self.scale + self.offset).to(self.dtype),
            "dy": randn(self.shape).to(self.dtype),
            "w": randn(self.param_shape).to(self.dtype) if self.affine != "none" else None,
            "b": (randn(self.param_shape).to(self.dtype)
                  if self.affine == "both" and self.norm != "rms" else None),
            "rm": None, "rv": None,
        }
        if self.norm in CHANNEL_NORMS[:4] and (self.running or self.norm in RUNNING_REQUIRED):
            t["rm"] = (randn((c,)) * 0.5 + self.offset).to(self.dtype)
            t["rv"] = (torch.rand((c,), generator=g, dtype=F64) + 0.5).to(self.dtype)
        return t


def call(case: Case, fns, x, w, b, rm, rv):
    """The case's norm through ``fns`` (normlab.functional or torch.nn.functional)."""
    n, m = case.norm, case.momentum
    if n == "batch_train":
        return fns.batch_norm(x, rm, rv, w, b, True, m, EPS)
    if n == "batch_eval":
        return fns.batch_norm(x, rm, rv, w, b, False, m, EPS)
    if n == "instance":
        return fns.instance_norm(x, rm, rv, w, b, True, m, EPS)
    if n == "instance_eval":
        return fns.instance_norm(x, rm, rv, w, b, False, m, EPS)
    if n == "group":
        return fns.group_norm(x, case.groups, w, b, EPS)
    ns = tuple(x.shape[x.dim() - case.groups:])
    if n == "layer":
        return fns.layer_norm(x, ns, w, b, EPS)
    return fns.rms_norm(x, ns, w, EPS)


def with_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as ``t`` in another memory layout."""
    if layout == "contiguous":
        return t.contiguous()
    if layout == "channels_last":  # channels innermost
        if t.dim() == 4:
            return t.contiguous(memory_format=torch.channels_last)
        if t.dim() == 5:
            return t.contiguous(memory_format=torch.channels_last_3d)
        if t.dim() == 3:  # a sequence model's (N, L, C) activations, transposed to (N, C, L)
            return t.transpose(1, 2).contiguous().transpose(1, 2)
        raise ValueError(f"no channels_last layout for {t.dim()}-D")
    if layout == "strided":  # not dense: every other element of a larger buffer
        return torch.stack([t, t], -1)[..., 0]
    if layout == "permuted":  # dense, axes in reverse memory order
        dims = tuple(range(t.dim()))[::-1]
        return t.permute(dims).contiguous().permute(dims)
    raise ValueError(layout)


def layouts_for(ndim: int) -> list[str]:
    return ["contiguous", "strided", "permuted"] + (["channels_last"] if 3 <= ndim <= 5 else [])


def run(case: Case, backend: str, layout: str = "contiguous", dy_layout: str | None = None,
        tensors: dict | None = None) -> dict:
    """Forward and backward of ``case`` on a normlab backend, or on ``"torch.nn.functional"``
    (given contiguous copies: torch's own CPU batch_norm backward is wrong on some strides).
    Returns the output, the updated running statistics and the gradients."""
    t = case.tensors() if tensors is None else tensors
    if backend == "torch.nn.functional":
        layout = dy_layout = "contiguous"
        fns, ctx = TF, contextlib.nullcontext()
    else:
        fns, ctx = F, normlab.backend(backend)
    x = with_layout(t["x"], layout).detach().requires_grad_()
    w, b = (p.detach().clone().requires_grad_() if p is not None else None
            for p in (t["w"], t["b"]))
    rm, rv = (s.clone() if s is not None else None for s in (t["rm"], t["rv"]))
    with ctx:
        y = call(case, fns, x, w, b, rm, rv)
    y.backward(with_layout(t["dy"], dy_layout or layout))
    return {"y": y, "running_mean": rm, "running_var": rv, "dx": x.grad,
            "dweight": None if w is None else w.grad, "dbias": None if b is None else b.grad}


def assert_close(actual, expected, tol, what):
    """max |a - e| <= tol * (max |e| + 1), with the worst element reported."""
    if expected is None:
        assert actual is None, f"{what}: expected None"
        return
    assert actual is not None, f"{what}: got None"
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    if expected.numel() == 0:
        return
    a, e = actual.detach().double(), expected.detach().double()
    err = torch.nan_to_num((a - e).abs(), nan=math.inf)
    scale = e.abs().max().item() + 1
    if err.max().item() <= tol * scale:
        return
    i = np.unravel_index(int(err.argmax()), tuple(a.shape))
    raise AssertionError(
        f"{what}: max error {err.max().item():.3g} > {tol:.2g} * {scale:.3g} at index "
        f"{tuple(int(k) for k in i)} (got {a[i].item():.8g}, want {e[i].item():.8g})")


def compare(ours: dict, theirs: dict, dtype: torch.dtype, what: str, tol: float | None = None):
    tol = TOL[dtype] if tol is None else tol
    for key, a in ours.items():
        loose = PARAM_GRAD_LOOSENESS if key in ("dweight", "dbias") else 1
        assert_close(a, theirs[key], tol * loose, f"{what}: {key}")


def torch_peer_ok(case: Case) -> bool:
    """Whether torch.nn.functional computes this case to the tolerance of its dtype."""
    if case.norm == "group" and math.prod(case.shape[1:]) == case.groups:
        return False  # torch refuses one value per (sample, group); normlab gives zeros
    return not (case.dtype in (F16, BF16) and abs(case.offset) >= 1e3)


def float64_truth(case: Case, t: dict) -> dict:
    """torch.nn.functional in float64 on the same (rounded) inputs, cast back to the case's
    dtype: the judge where torch's own error in the case's dtype exceeds the tolerance."""
    t64 = {k: None if v is None else v.double() for k, v in t.items()}
    truth = run(replace(case, dtype=F64), "torch.nn.functional", tensors=t64)
    return {k: None if v is None else v.to(case.dtype) for k, v in truth.items()}


def check(case: Case, layout="contiguous", dy_layout=None, peers=("reference", "torch")):
    t = case.tensors()
    ours = run(case, "cpu", layout, dy_layout, tensors=t)
    assert ours["y"].dtype == case.dtype and ours["y"].shape == case.shape
    if "reference" in peers:
        compare(ours, run(case, "reference", layout, dy_layout, tensors=t), case.dtype,
                f"{case} ({layout}, dy {dy_layout or layout}) vs reference")
    if "torch" in peers and torch_peer_ok(case):
        try:
            compare(ours, run(case, "torch.nn.functional", tensors=t), case.dtype,
                    f"{case} vs torch")
        except AssertionError as torch_differs:
            # torch is off where the statistics are ill-conditioned (a one-pass variance of a
            # few values whose variance is about eps): then normlab must match float64
            try:
                compare(ours, float64_truth(case, t), case.dtype, f"{case} vs float64")
            except AssertionError as e:
                raise AssertionError(f"{torch_differs}\nand {e}") from None
    return ours


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


# --------------------------------------------------------------------------------------------
# random cases: every norm, shape, dtype, offset, affine option, momentum and layout
# --------------------------------------------------------------------------------------------
def draw_case(data, norm: str) -> tuple[Case, str, str]:
    ndim = data.draw(st.integers(2, 5), label="ndim")
    shape = data.draw(st.lists(st.integers(1, 7), min_size=ndim, max_size=ndim), label="shape")
    if norm == "instance":  # needs more than one spatial element
        if ndim == 2:
            shape.append(data.draw(st.integers(2, 7), label="L"))
        if math.prod(shape[2:]) == 1:
            shape[-1] = 2
    if norm == "batch_train" and shape[0] * math.prod(shape[2:]) == 1:
        shape[0] = 2  # needs more than one value per channel
    shape = tuple(shape)
    if norm == "group":
        groups = data.draw(st.sampled_from(divisors(shape[1])), label="groups")
        if shape[0] * (shape[1] // groups) * math.prod(shape[2:]) == 1:
            shape, groups = (2,) + shape[1:], groups  # torch: more than one value per group
    elif norm in ("layer", "rms"):
        groups = data.draw(st.integers(1, 2), label="normalized axes")
    else:
        groups = 1
    affines = ["none", "weight"] if norm == "rms" else ["none", "weight", "both"]
    case = Case(
        norm=norm, shape=shape, groups=groups,
        dtype=data.draw(st.sampled_from(DTYPES), label="dtype"),
        affine=data.draw(st.sampled_from(affines), label="affine"),
        running=data.draw(st.booleans(), label="running") or norm in RUNNING_REQUIRED,
        momentum=data.draw(st.sampled_from([0.0, 0.1, 1.0]), label="momentum"),
        offset=data.draw(st.sampled_from([0.0, -2.5, 3.0, 1e3]), label="offset"),
        seed=data.draw(st.integers(0, 2**16), label="seed"),
    )
    layout = data.draw(st.sampled_from(layouts_for(len(shape))), label="layout")
    dy_layout = data.draw(st.sampled_from(layouts_for(len(shape))), label="dy layout")
    return case, layout, dy_layout


@pytest.mark.parametrize("norm", NORMS)
@given(data=st.data())
def test_random_cases_match_reference_and_torch(norm, data):
    case, layout, dy_layout = draw_case(data, norm)
    check(case, layout, dy_layout)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("norm", NORMS)
def test_every_norm_and_dtype_with_channels_last_and_other_dy_layout(norm, dtype):
    case = Case(norm, (3, 4, 5, 6), dtype, groups=2, offset=-2.5)
    check(case, "channels_last", "strided")
    check(case, "strided", "channels_last")


# --------------------------------------------------------------------------------------------
# layouts: output strides equal the reference's
# --------------------------------------------------------------------------------------------
STRIDE_LAYOUTS = {  # name: (shape, layout)
    "contiguous": ((3, 4, 5, 6), "contiguous"),
    "channels_last": ((3, 4, 5, 6), "channels_last"),
    "channels_last_3d": ((2, 4, 3, 5, 6), "channels_last"),
    "sequence_transposed": ((3, 4, 10), "channels_last"),
    "strided": ((3, 4, 5, 6), "strided"),
    "dense_permuted": ((3, 4, 5, 6), "permuted"),
}


@pytest.mark.parametrize("name", list(STRIDE_LAYOUTS))
def test_output_strides_equal_the_reference(name):
    shape, layout = STRIDE_LAYOUTS[name]
    wrong = []
    for norm in NORMS:
        case = Case(norm, shape, groups=2 if norm == "group" else 1)
        t = case.tensors()
        x = with_layout(t["x"], layout)
        got, want = [], []
        for backend, out in (("cpu", got), ("reference", want)):
            with normlab.backend(backend):
                out.append(call(case, F, x, t["w"], t["b"], t["rm"], t["rv"]))
        torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
        if got[0].stride() != want[0].stride():
            wrong.append(f"{norm}: cpu {got[0].stride()} != reference {want[0].stride()}")
    assert not wrong, f"{name} input {with_layout(torch.empty(shape), layout).stride()}: " \
        + "; ".join(wrong)


# --------------------------------------------------------------------------------------------
# running statistics, group counts, normalized axes
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("momentum", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("norm", ["batch_train", "instance"])
def test_running_stats_update_in_place_over_steps(norm, momentum, layout):
    case = Case(norm, (4, 3, 5, 2), F32, momentum=momentum, offset=3.0)
    t = case.tensors()
    rm, rv = t["rm"].clone(), t["rv"].clone()
    ptrs = rm.data_ptr(), rv.data_ptr()
    rm_ref, rv_ref = t["rm"].clone(), t["rv"].clone()
    rm_torch, rv_torch = t["rm"].clone(), t["rv"].clone()
    for step in range(3):
        x = with_layout((t["x"] + step).contiguous(), layout)
        with normlab.backend("cpu"):
            call(case, F, x, t["w"], t["b"], rm, rv)
        with normlab.backend("reference"):
            call(case, F, x, t["w"], t["b"], rm_ref, rv_ref)
        call(case, TF, x.contiguous(), t["w"], t["b"], rm_torch, rv_torch)
    assert (rm.data_ptr(), rv.data_ptr()) == ptrs  # updated in place
    for got, ref, peer in ((rm, rm_ref, rm_torch), (rv, rv_ref, rv_torch)):
        assert_close(got, ref, TOL[F32], "vs reference")
        assert_close(got, peer, TOL[F32], "vs torch")
    if momentum == 0.0:
        assert torch.equal(rm, t["rm"]) and torch.equal(rv, t["rv"])


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [F64, F32], ids=str)
def test_group_counts_including_one_and_c(dtype, layout):
    for groups in divisors(6):  # 1 (LayerNorm over (C, *)), 2, 3, 6 (InstanceNorm)
        check(Case("group", (3, 6, 4, 5), dtype, groups=groups, offset=-2.5), layout)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("axes", [1, 2])
@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_rows_over_one_and_two_axes(norm, axes, layout):
    for dtype in (F64, F32):
        check(Case(norm, (2, 3, 4, 5), dtype, groups=axes, offset=3.0), layout)


def test_mixed_parameter_dtypes_match_reference():
    """bfloat16 inputs with float32 parameters and running statistics (torch refuses these)."""
    for norm in NORMS:
        case = Case(norm, (3, 4, 5), BF16, groups=2 if norm == "group" else 1)
        t = case.tensors()
        t.update({k: t[k].float() for k in ("w", "b", "rm", "rv") if t[k] is not None})
        ours = run(case, "cpu", tensors=t)
        compare(ours, run(case, "reference", tensors=t), BF16, f"{norm} mixed dtypes")
        assert ours["dweight"].dtype == F32 and ours["y"].dtype == BF16


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("norm", NORMS)
def test_gradients_of_parameters_only(norm, layout):
    """x without gradient (the kernels skip dx), then only the bias or only the weight; and a
    gradient penalty on dx differentiated for the weight only."""
    case = Case(norm, (3, 4, 5, 6), F32, groups=2 if norm == "group" else 1, offset=1.0)
    t = case.tensors()
    names = ["w"] if norm == "rms" else ["w", "b"]
    for wanted in ([["w", "b"], ["b"], ["w"]] if norm != "rms" else [["w"]]):
        got = {}
        for backend in ("cpu", "reference"):
            x = with_layout(t["x"], layout)
            p = {k: t[k].detach().clone().requires_grad_(k in wanted) for k in names}
            rm, rv = (s.clone() if s is not None else None for s in (t["rm"], t["rv"]))
            with normlab.backend(backend):
                y = call(case, F, x, p["w"], p.get("b"), rm, rv)
            y.backward(with_layout(t["dy"], layout))
            got[backend] = [p[k].grad for k in names] + [y, rm, rv]
        for i, (a, e) in enumerate(zip(got["cpu"], got["reference"])):
            what = f"{norm}, grads of {wanted}: tensor {i}"
            if e is None:
                assert a is None, what
            else:
                assert_close(a, e, TOL[F32] * PARAM_GRAD_LOOSENESS, what)
    # a gradient penalty on dx, differentiated for the weight only
    pens = {}
    for backend in ("cpu", "reference"):
        x = with_layout(t["x"].double(), layout).detach().requires_grad_()
        w = t["w"].double().requires_grad_()
        with normlab.backend(backend):
            y = call(case, F, x, w, None, *(
                None if s is None else s.double() for s in (t["rm"], t["rv"])))
        (gx,) = torch.autograd.grad((y * t["dy"].double()).sum(), x, create_graph=True)
        gx.pow(2).sum().backward(inputs=[w])
        pens[backend] = (gx.detach(), w.grad)
        assert x.grad is None
    for a, e in zip(pens["cpu"], pens["reference"]):
        assert_close(a, e, 1e-10, f"{norm}: weight-only gradient penalty")


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nan_and_inf_propagate_like_the_reference(bad, layout):
    for norm in NORMS:
        case = Case(norm, (2, 4, 3, 5), F32, groups=2 if norm == "group" else 1)
        t = case.tensors()
        t["x"][0, 1, 2, 3] = bad
        x = with_layout(t["x"], layout)
        got = []
        for backend in ("cpu", "reference"):
            with normlab.backend(backend):
                got.append(call(case, F, x, t["w"], t["b"], t["rm"], t["rv"]))
        a, e = got
        assert torch.equal(a.isnan(), e.isnan()), f"{norm}: NaNs in different places"
        torch.testing.assert_close(a, e, equal_nan=True, atol=1e-4, rtol=1e-4, msg=norm)


@pytest.mark.parametrize("norm, shape, groups", [
    ("layer", (64, 1), 1),  # LayerNorm over a size-1 axis
    ("layer", (8, 3, 1, 1), 2),
    ("group", (16, 8, 1), 8),  # GroupNorm with one element per (sample, group)
    ("group", (16, 8), 8),
], ids=["layer-1", "layer-1x1", "group-1-per-group", "group-2d"])
@pytest.mark.parametrize("dtype", [F64, F32], ids=str)
def test_single_element_statistics_sets(norm, shape, groups, dtype):
    """The output of a one-element set is the bias whatever x is: its input gradient is zero.
    eps=1e-6 (ViT's), so rstd = 1/sqrt(eps) = 1000 amplifies any rounding in
    dx = rstd (g w - <g w> - ...)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g, dtype=F64).to(dtype)
    dy = torch.randn(shape, generator=g, dtype=F64).to(dtype)
    c = shape[1] if norm == "group" else None
    pshape = (c,) if norm == "group" else shape[len(shape) - groups:]
    w, b = (torch.randn(pshape, generator=g, dtype=F64).to(dtype) for _ in range(2))
    got = {}
    for backend in ("cpu", "reference"):
        xx = x.clone().requires_grad_()
        with normlab.backend(backend):
            if norm == "group":
                y = F.group_norm(xx, groups, w, b, eps=1e-6)
            else:
                y = F.layer_norm(xx, pshape, w, b, eps=1e-6)
        y.backward(dy)
        got[backend] = (y, xx.grad)
    assert_close(got["cpu"][0], got["reference"][0], TOL[dtype], "output")
    assert_close(got["cpu"][1], got["reference"][1], TOL[dtype], "input gradient")


# --------------------------------------------------------------------------------------------
# special shapes
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("norm", ["batch_train", "batch_eval"])
def test_batchnorm1d_two_dimensional_input(norm, dtype):
    for shape in [(5, 3), (2, 7), (64, 1)]:
        check(Case(norm, shape, dtype, offset=3.0))
    with normlab.backend("cpu"):  # and the module
        m = normlab.nn.BatchNorm1d(3)
        ref = torch.nn.BatchNorm1d(3)
        x = torch.randn(6, 3) + 2
        torch.testing.assert_close(m(x), ref(x))
        torch.testing.assert_close(m.running_var, ref.running_var)
        assert m.num_batches_tracked.item() == 1


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("norm", ["batch_train", "batch_eval", "instance_eval", "group"])
def test_spatial_size_one(norm, layout):
    for shape in [(4, 6, 1, 1), (4, 6, 1), (3, 6, 1, 1, 1)]:
        for dtype in (F64, F32, BF16):
            check(Case(norm, shape, dtype, groups=3, offset=-2.5), layout)


ROW_LENGTHS = [1, 7, 33, 1000, 4099]  # the vectorized lanes' tails (32 lanes, 8-lane blocks)


@pytest.mark.parametrize("length", ROW_LENGTHS)
@pytest.mark.parametrize("norm", ["layer", "rms", "group", "instance", "batch_train",
                                  "batch_eval", "batch_train_channels_innermost",
                                  "group_channels_innermost"])
def test_odd_and_long_rows(norm, length):
    if norm == "instance" and length == 1:
        pytest.skip("instance_norm needs more than one spatial element")
    layout = "contiguous"
    if norm in ("layer", "rms"):
        shape = (4, length)
    elif norm.endswith("channels_innermost"):  # C = length, channels innermost
        norm, layout = norm.split("_channels")[0], "channels_last"
        shape = (3, length, 5)
    else:
        shape = (3, 4, length)  # rows of length (group: 2 channels a row), nchw of length
    groups = 1 if norm != "group" else (2 if layout == "contiguous" else 1)
    for dtype in (F64, F32):
        check(Case(norm, shape, dtype, groups=groups, offset=0.5, seed=length), layout)


# --------------------------------------------------------------------------------------------
# numerical stability: fp32 1e4 + N(0, 1) and 1e5 + N(0, 1)
# --------------------------------------------------------------------------------------------
STABLE_NORMS = ["batch_train", "instance", "group", "layer", "rms"]


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("offset", [1e4, 1e5])
@pytest.mark.parametrize("norm", STABLE_NORMS)
def test_large_mean_fp32_matches_float64(norm, offset, layout):
    """Output within 1e-3 of torch in float64 (of the same rounded input), and the weight
    gradient (a sum of dy * x_hat) relatively accurate: a one-pass variance, or x * a + b',
    would lose every digit here."""
    case = Case(norm, (4, 8, 12, 12), F32, groups=2 if norm == "group" else 3, offset=offset,
                scale=1.0, running=False)
    t = case.tensors()
    ours = run(case, "cpu", layout, tensors=t)
    t64 = {k: None if v is None else v.double() for k, v in t.items()}
    want = run(replace(case, dtype=F64), "torch.nn.functional", tensors=t64)
    err = (ours["y"].double() - want["y"]).abs().max().item()
    assert err < 1e-3, f"output error {err:.3g}"
    dw_err = ((ours["dweight"].double() - want["dweight"]).abs().max()
              / want["dweight"].abs().max()).item()
    assert dw_err < 1e-5, f"weight gradient relative error {dw_err:.3g}"
    db_err = ((ours["dbias"].double() - want["dbias"]).abs().max()
              / want["dbias"].abs().max()).item() if want["dbias"] is not None else 0.0
    assert db_err < 1e-5, f"bias gradient relative error {db_err:.3g}"


# --------------------------------------------------------------------------------------------
# determinism: bits independent of the run and of the thread count
# --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def num_threads(n):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("norm", NORMS)
def test_bitwise_deterministic_across_runs_and_thread_counts(norm, layout):
    # big enough for many rows/channels/chunks per thread and many gradient blocks
    case = Case(norm, (8, 32, 12, 12), F32, groups=4 if norm == "group" else 1, offset=1.0)
    t = case.tensors()
    with num_threads(2):
        first, second = run(case, "cpu", layout, tensors=t), run(case, "cpu", layout, tensors=t)
    with num_threads(1):
        single = run(case, "cpu", layout, tensors=t)
    for key, a in first.items():
        if a is None:
            continue
        assert torch.equal(a, second[key]), f"{key} differs between two runs"
        assert torch.equal(a, single[key]), f"{key} differs between 2 threads and 1"
    compare(first, run(case, "reference", layout, tensors=t), F32, f"{norm} vs reference")


# --------------------------------------------------------------------------------------------
# double backward
# --------------------------------------------------------------------------------------------
GRAD_CASES = {  # name: (norm, shape, groups)
    "batch_train": ("batch_train", (2, 4, 2, 2), 1),
    "batch_train-no-running": ("batch_train", (2, 4, 2, 2), 1),
    "batch_eval": ("batch_eval", (2, 4, 2, 2), 1),
    "instance": ("instance", (2, 4, 2, 2), 1),
    "instance-no-running": ("instance", (2, 4, 2, 2), 1),
    "instance_eval": ("instance_eval", (2, 4, 2, 2), 1),
    "group-2": ("group", (2, 4, 2, 2), 2),
    "group-1": ("group", (2, 4, 2, 2), 1),
    "layer-1-axis": ("layer", (2, 4, 2, 2), 1),
    "layer-2-axes": ("layer", (2, 4, 2, 2), 2),
    "rms-1-axis": ("rms", (2, 4, 2, 2), 1),
    "rms-2-axes": ("rms", (2, 4, 2, 2), 2),
}


def grad_case(name, dtype=F64):
    norm, shape, groups = GRAD_CASES[name]
    return Case(norm, shape, dtype, groups=groups, running=not name.endswith("no-running"),
                offset=0.7, scale=1.5, momentum=0.3)


def grad_fn(case, t, backend="cpu"):
    def fn(x, w, *b):
        with normlab.backend(backend):
            rm, rv = (s.clone() if s is not None else None for s in (t["rm"], t["rv"]))
            return call(case, F, x, w, b[0] if b else None, rm, rv)
    return fn


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("name", list(GRAD_CASES))
def test_gradcheck_and_gradgradcheck_float64(name, layout):
    case = grad_case(name)
    t = case.tensors()
    x = with_layout(t["x"], layout).detach().requires_grad_()
    inputs = [x] + [t[k].detach().requires_grad_() for k in ("w", "b") if t[k] is not None]
    fn = grad_fn(case, t)
    assert gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)
    assert gradgradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("name", list(GRAD_CASES))
def test_gradient_penalty_matches_reference(name, layout):
    case = grad_case(name)
    t = case.tensors()

    def penalty(backend):
        x = with_layout(t["x"], layout).detach().requires_grad_()
        params = [t[k].detach().clone().requires_grad_() for k in ("w", "b") if t[k] is not None]
        y = grad_fn(case, t, backend)(x, *params)
        grads = torch.autograd.grad((y * t["dy"]).sum(), [x] + params, create_graph=True)
        loss = sum(g.pow(2).sum() for g in grads) + y.pow(2).mean()
        loss.backward()
        return [g.detach() for g in grads] + [x.grad] + [p.grad for p in params]

    for i, (a, e) in enumerate(zip(penalty("cpu"), penalty("reference"))):
        assert_close(a, e, 1e-10, f"{name}: tensor {i}")


# --------------------------------------------------------------------------------------------
# the fused path is taken; fallbacks
# --------------------------------------------------------------------------------------------
@pytest.fixture
def count_kernels(monkeypatch):
    """``count_kernels()`` wraps every Numba kernel of ``normlab.kernels._numba`` (the
    module attributes the cpu backend calls, both their parallel and serial versions) and
    returns the list that each call appends ``(kernel name, address of its first array)`` to."""
    from normlab.kernels import _numba as K

    def start():
        calls = []

        def wrap(name, kernel):
            def counted(*args, **kwargs):
                first = getattr(args[0], "__array_interface__", None) if args else None
                calls.append((name, first["data"][0] if first else None))
                return kernel(*args, **kwargs)
            return counted

        class Counted:
            def __init__(self, name, kernel):
                self.parallel = wrap(name, kernel.parallel)
                self.serial = wrap(name, kernel.serial)

            def pick(self, threads):
                return self.parallel if threads > 1 else self.serial

        for name, kernel in list(vars(K).items()):
            if isinstance(kernel, K.Kernel):
                monkeypatch.setattr(K, name, Counted(name, kernel))
        return calls

    return start


# norm, shape, layout -> the kernel family that must run: contiguous rows (per-element parameters),
# rows of per-channel segments (GroupNorm/InstanceNorm on NCHW), (N, C, L) per-channel
# statistics, or channels innermost (P, R, C) straight on the input's memory
KERNEL_PATHS = [
    ("layer", (3, 4, 5, 6), "contiguous", "rows"),
    ("rms", (3, 4, 5, 6), "contiguous", "rows"),
    ("group", (3, 4, 5, 6), "contiguous", "segments"),
    ("instance", (3, 4, 5, 6), "contiguous", "segments"),
    ("batch_train", (3, 4, 5, 6), "contiguous", "nchw"),
    ("batch_eval", (3, 4, 5, 6), "contiguous", "nchw"),
    ("instance_eval", (3, 4, 5, 6), "contiguous", "nchw"),
    ("batch_train", (6, 4), "contiguous", "nhwc"),  # BatchNorm1d (N, C)
    ("batch_eval", (6, 4), "contiguous", "nhwc"),
    ("group", (3, 4, 5, 6), "channels_last", "nhwc"),
    # InstanceNorm's output is contiguous, as torch's: the kernels read a contiguous copy
    ("instance", (3, 4, 5, 6), "channels_last", "segments"),
    ("batch_train", (3, 4, 5, 6), "channels_last", "nhwc"),
    ("batch_eval", (3, 4, 5, 6), "channels_last", "nhwc"),
    ("instance_eval", (3, 4, 5, 6), "channels_last", "nchw"),
    ("batch_train", (2, 4, 3, 5, 6), "channels_last", "nhwc"),  # channels_last_3d
    ("group", (2, 4, 3, 5, 6), "channels_last", "nhwc"),
    ("batch_train", (3, 4, 10), "channels_last", "nhwc"),  # sequence-transposed (N, L, C)
    ("instance", (3, 4, 10), "channels_last", "segments"),
    ("group", (3, 4, 10), "channels_last", "nhwc"),
    ("layer", (3, 4, 10), "channels_last", "rows"),  # copied to rows
    ("rms", (3, 4, 5, 6), "channels_last", "rows"),
    ("layer", (3, 4, 5, 6), "strided", "rows"),  # not dense: copied first
    ("group", (3, 4, 5, 6), "strided", "segments"),
    ("batch_train", (3, 4, 5, 6), "strided", "nchw"),
    ("batch_train", (3, 4, 5, 6), "permuted", "nchw"),
]


@pytest.mark.parametrize("norm, shape, layout, family", KERNEL_PATHS,
                         ids=[f"{n}-{len(s)}d-{lay}" for n, s, lay, _ in KERNEL_PATHS])
def test_fused_kernels_run_forward_and_backward(count_kernels, norm, shape, layout, family):
    """The fused kernels run in forward and in backward, of the family the layout calls for
    (channels-innermost inputs as (P, R, C), no transposing copy), and float32 inputs that the
    kernels can read reach the first kernel without a copy."""
    case = Case(norm, shape, F32, groups=2 if norm == "group" else 1)
    t = case.tensors()
    run(case, "cpu", layout, tensors=t)  # compile (or load) the kernels before wrapping them
    calls = count_kernels()
    x = with_layout(t["x"], layout).detach().requires_grad_()
    w, b = (p.detach().clone().requires_grad_() if p is not None else None
            for p in (t["w"], t["b"]))
    with normlab.backend("cpu"):
        y = call(case, F, x, w, b, t["rm"], t["rv"])
    forward = [n for n, _ in calls]
    y.backward(t["dy"])
    backward = [n for n, _ in calls[len(forward):]]
    assert forward, "no kernel ran in forward"
    assert backward, "no kernel ran in backward"
    assert all(n.startswith(family + "_") for n in forward + backward), (forward, backward)
    if layout in ("contiguous", "channels_last") and not (
            norm in ("layer", "rms", "instance", "instance_eval") and layout != "contiguous"):
        assert calls[0][1] == x.data_ptr(), f"{forward[0]} got a copy of the input"
    ours = {"y": y, "dx": x.grad, "dweight": w.grad, "dbias": b.grad if b is not None else None}
    want = run(case, "reference", layout, tensors=t)
    del want["running_mean"], want["running_var"]
    compare(ours, want, F32, norm)


EMPTY = [  # norm, shape, groups
    ("batch_eval", (0, 3, 4), 1), ("batch_eval", (0, 3), 1), ("instance", (0, 3, 4), 1),
    ("instance_eval", (0, 3, 4), 1), ("group", (0, 4, 3), 2), ("group", (2, 4, 0), 2),
    ("layer", (0, 5), 1), ("layer", (2, 0, 5), 2), ("rms", (0, 5), 1), ("rms", (3, 0, 2), 1),
]


@pytest.mark.parametrize("norm, shape, groups", EMPTY, ids=[f"{n}-{s}" for n, s, _ in EMPTY])
def test_empty_inputs_fall_back_cleanly(count_kernels, norm, shape, groups):
    """Empty inputs get torch's answer, or torch's error where torch raises, except
    InstanceNorm's empty batch (torch fails inside: a bug, see the README), and no kernel
    runs."""
    calls = count_kernels()
    case = Case(norm, shape, F32, groups=groups)
    try:
        want = run(case, "torch.nn.functional")
    except Exception as e:  # noqa: BLE001
        if norm.startswith("instance"):  # torch fails on an empty batch: normlab returns it
            assert run(case, "cpu")["y"].shape == shape
        else:
            with pytest.raises(type(e)):
                run(case, "cpu")
    else:
        ours = run(case, "cpu")
        for k, v in want.items():
            if v is not None:
                torch.testing.assert_close(ours[k], v, equal_nan=True)
    assert calls == []


@pytest.mark.parametrize("norm", NORMS)
def test_non_cpu_tensors_fall_back_cleanly(count_kernels, norm):
    calls = count_kernels()
    case = Case(norm, (3, 4, 5), groups=2 if norm == "group" else 1)
    t = {k: None if v is None else v.to("meta") for k, v in case.tensors().items()}
    with normlab.backend("cpu"):
        y = call(case, F, t["x"], t["w"], t["b"], t["rm"], t["rv"])
    assert y.device.type == "meta" and y.shape == case.shape and y.dtype == F32
    assert calls == []


def test_modules_train_step_on_cpu_backend():
    """normlab.nn modules on the cpu backend take a training step like torch.nn (running
    statistics, num_batches_tracked, cumulative momentum=None)."""
    torch.manual_seed(0)
    pairs = [(normlab.nn.BatchNorm2d(4, momentum=None), torch.nn.BatchNorm2d(4, momentum=None)),
             (normlab.nn.InstanceNorm2d(4, affine=True, track_running_stats=True),
              torch.nn.InstanceNorm2d(4, affine=True, track_running_stats=True)),
             (normlab.nn.GroupNorm(2, 4), torch.nn.GroupNorm(2, 4)),
             (normlab.nn.LayerNorm([5, 6]), torch.nn.LayerNorm([5, 6])),
             (normlab.nn.RMSNorm([6]), torch.nn.RMSNorm([6]))]
    for ours, ref in pairs:
        ours.load_state_dict(ref.state_dict())
        for step in range(2):
            x = (torch.randn(3, 4, 5, 6) + step).contiguous(memory_format=torch.channels_last)
            with normlab.backend("cpu"):
                y = ours(x)
            torch.testing.assert_close(y, ref(x))
        for (k, a), b in zip(ours.state_dict().items(), ref.state_dict().values()):
            torch.testing.assert_close(a, b, msg=f"{type(ours).__name__}.{k}")


def test_missing_dependency_makes_a_backend_unavailable(monkeypatch):
    import normlab._dispatch as D

    monkeypatch.setitem(D._KNOWN, "fake", ("normlab_no_such_module:BACKEND",
                                           "normlab_no_such_module"))
    assert "fake" not in normlab.available_backends()
    with pytest.raises(normlab.BackendUnavailableError, match="fake"):
        with normlab.backend("fake"):
            pass


# --------------------------------------------------------------------------------------------
# 16-bit floats: bfloat16 and float16 read and written in place by the *_16 kernels
# --------------------------------------------------------------------------------------------
HALF = [BF16, F16]

# norm, shape, layout, fused (nchw: one-region kernels), the kernels that must run in forward and
# in backward. Odd sizes: rows and channels that are no multiple of the vector width, rows longer
# than the kernels' 1024-element scratch slice, more channels than fit one slice (nhwc).
HALF_PATHS = [
    ("batch_train", (3, 16, 5, 7), "contiguous", True, ["nchw_forward_16"], ["nchw_backward_16"]),
    ("batch_train", (3, 5, 7, 9), "contiguous", False, ["nchw_stats_16", "nchw_affine_16"],
     ["nchw_grad_sums_16", "nchw_dx_16"]),
    ("batch_train", (2, 12, 1100), "contiguous", True, ["nchw_forward_16"], ["nchw_backward_16"]),
    ("batch_train", (2, 3, 1100), "contiguous", False, ["nchw_stats_16", "nchw_affine_16"],
     ["nchw_grad_sums_16", "nchw_dx_16"]),
    ("batch_eval", (3, 16, 5, 7), "contiguous", True, ["nchw_affine_16"], ["nchw_backward_16"]),
    ("batch_eval", (3, 5, 7, 9), "contiguous", False, ["nchw_affine_16"],
     ["nchw_grad_sums_16", "nchw_dx_16"]),
    ("instance_eval", (3, 5, 7, 9), "contiguous", True, ["nchw_affine_16"], ["nchw_backward_16"]),
    ("batch_train", (50, 33), "contiguous", None, ["nhwc_moments_16", "nhwc_affine_16"],
     ["nhwc_grad_moments_16", "nhwc_dx_16"]),  # BatchNorm1d (N, C)
    ("batch_eval", (50, 33), "contiguous", None, ["nhwc_affine_16"],
     ["nhwc_grad_moments_16", "nhwc_dx_16"]),
    ("batch_train", (3, 5, 7, 9), "channels_last", None, ["nhwc_moments_16", "nhwc_affine_16"],
     ["nhwc_grad_moments_16", "nhwc_dx_16"]),
    ("batch_eval", (3, 5, 7, 9), "channels_last", None, ["nhwc_affine_16"],
     ["nhwc_grad_moments_16", "nhwc_dx_16"]),
    ("batch_train", (2, 5, 3, 4, 6), "channels_last", None, ["nhwc_moments_16", "nhwc_affine_16"],
     ["nhwc_grad_moments_16", "nhwc_dx_16"]),  # channels_last_3d
    ("batch_train", (3, 300, 70), "channels_last", None, ["nhwc_moments_16", "nhwc_affine_16"],
     ["nhwc_grad_moments_16", "nhwc_dx_16"]),  # (N, L, C) sequence, C > a slice's rows
    ("batch_eval", (3, 300, 70), "channels_last", None, ["nhwc_affine_16"],
     ["nhwc_grad_moments_16", "nhwc_dx_16"]),
    # InstanceNorm's output is contiguous, as torch's: the kernels read a contiguous copy
    ("instance", (3, 6, 7, 9), "channels_last", None, ["rows_forward_16"], ["rows_backward_16"]),
    ("instance_eval", (3, 6, 7, 9), "channels_last", True, ["nchw_affine_16"],
     ["nchw_backward_16"]),
    ("group", (3, 6, 7, 9), "channels_last", None, ["nhwc_moments_16", "nhwc_affine_16"],
     ["nhwc_grad_moments_16", "nhwc_dx_16"]),
    ("group", (3, 6, 7, 9), "contiguous", None, ["rows_forward_16"], ["rows_backward_16"]),
    ("instance", (3, 6, 7, 9), "contiguous", None, ["rows_forward_16"], ["rows_backward_16"]),
    ("layer", (3, 6, 7, 9), "contiguous", None, ["rows_forward_16"], ["rows_backward_16"]),
    ("rms", (3, 6, 7, 9), "contiguous", None, ["rows_forward_16"], ["rows_backward_16"]),
]


def ordered_bits(t: torch.Tensor) -> torch.Tensor:
    """The 16-bit patterns of t as integers in the order of the values (-0 and +0 equal), so
    that a difference counts ulps."""
    b = t.view(torch.int16).int() & 0xFFFF
    return torch.where(b >= 0x8000, 0x8000 - b, b)


def assert_within_ulps(actual, truth64, what, most=0.999):
    """``actual`` (16-bit) at most 1 ulp from ``truth64`` correctly rounded to its dtype in at
    least a fraction ``most`` of the elements, and within the dtype's tolerance everywhere."""
    assert actual.dtype in HALF, what
    rounded = truth64.to(actual.dtype)
    ulps = (ordered_bits(actual) - ordered_bits(rounded)).abs()
    ok = (ulps <= 1).double().mean().item()
    assert ok >= most, f"{what}: {1 - ok:.2%} elements more than 1 ulp off (max {ulps.max()})"
    assert_close(actual, rounded, TOL[actual.dtype], what)


def half_run(case: Case, layout: str, tensors: dict, backend="cpu"):
    """run() with the case's 16-bit parameters and running statistics as given."""
    return run(case, backend, layout, tensors=tensors)


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("norm, shape, layout, fused, fwd, bwd", HALF_PATHS,
                         ids=[f"{n}-{'x'.join(map(str, s))}-{lay}" + (
                             "" if f is None else ("-fused" if f else "-split"))
                              for n, s, lay, f, _, _ in HALF_PATHS])
def test_16bit_kernels_read_in_place_and_round_correctly(count_kernels, monkeypatch, dtype, norm,
                                                         shape, layout, fused, fwd, bwd):
    """bfloat16/float16 in every layout run the 16-bit kernels on the input's own memory (no
    float32 copy), forward and backward; y and dx are within 1 ulp of the float64 truth
    correctly rounded (nearly all exact), parameter gradients too (in their dtype), and all of
    them agree with the float32-copy path (the input widened, float32 kernels, rounded)."""
    from normlab.kernels import cpu as C

    if fused is not None:
        monkeypatch.setattr(C, "_fuse_channels", lambda c, threads, _f=fused: _f)
    case = Case(norm, shape, dtype, groups=2 if norm == "group" else 1, offset=0.5)
    t = case.tensors()
    half_run(case, layout, t)  # compile (or load) the kernels before counting
    calls = count_kernels()
    ours = half_run(case, layout, t)
    names = [n for n, _ in calls]
    assert names[:len(fwd)] == fwd and names[len(fwd):] == bwd, names
    keeps = norm in ("batch_train", "batch_eval", "group", "rms")  # torch's output layout
    assert ours["y"].stride() == E.output_like(with_layout(t["x"], layout), keeps).stride()
    assert ours["y"].dtype == dtype and ours["dx"].dtype == dtype
    truth = run(replace(case, dtype=F64), "torch.nn.functional",
                tensors={k: None if v is None else v.double() for k, v in t.items()})
    for key in ("y", "dx", "dweight", "dbias"):
        if ours[key] is not None:
            assert_within_ulps(ours[key], truth[key], f"{case} {layout}: {key} vs float64")
    # the float32-copy path: x and the parameters widened, float32 kernels, outputs rounded
    t32 = {k: None if v is None else v.float() for k, v in t.items()}
    copy32 = run(replace(case, dtype=F32), "cpu", layout, tensors=t32)
    for key in ("y", "dx"):
        same = (ours[key] == copy32[key].to(dtype)).double().mean().item()
        assert same >= 0.99, f"{key}: {1 - same:.2%} differ from the float32-copy path"
        assert_within_ulps(ours[key], copy32[key].double(), f"{key} vs float32-copy path",
                           most=1.0)
    for key in ("running_mean", "running_var"):
        if ours[key] is not None:
            assert_close(ours[key], copy32[key].to(dtype), TOL[dtype], key)


def test_16bit_kernels_take_the_input_memory(count_kernels):
    """No copy of a 16-bit input: the first kernel gets x's own buffer (NCHW and channels-last)."""
    calls = count_kernels()
    for layout, shape in (("contiguous", (4, 16, 6, 5)), ("channels_last", (4, 16, 6, 5)),
                          ("contiguous", (40, 16))):
        x = with_layout(torch.randn(shape).bfloat16(), layout)
        calls.clear()
        with normlab.backend("cpu"):
            F.batch_norm(x, None, None, training=True)
        assert calls and calls[0][1] == x.data_ptr(), (layout, calls)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_16bit_fused_and_split_nchw_kernels_agree_bitwise(monkeypatch, layout):
    """The one-region nchw kernels and the two-pass ones give the same bits (which one runs
    depends on the thread count), and so do 1 and 2 threads."""
    from normlab.kernels import cpu as C

    case = Case("batch_train", (4, 16, 9, 37), BF16, offset=1.0)
    t = case.tensors()
    got = []
    for fused, threads in ((True, 2), (False, 2), (True, 1)):
        monkeypatch.setattr(C, "_fuse_channels", lambda c, threads, _f=fused: _f)
        with num_threads(threads):
            got.append(half_run(case, layout, t))
    for other in got[1:]:
        for key, a in got[0].items():
            assert a is None or torch.equal(a, other[key]), key


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_16bit_large_mean_statistics(dtype):
    """Shifted sums in the 16-bit kernels too: 300 + N(0, 1) (bfloat16 spacing 2 there, float16
    0.25), statistics and output as float64 gives them from the same rounded input."""
    for norm, layout in (("batch_train", "contiguous"), ("batch_train", "channels_last"),
                         ("group", "contiguous"), ("layer", "contiguous")):
        case = Case(norm, (8, 16, 12, 12), dtype, groups=4 if norm == "group" else 1,
                    offset=300.0, scale=1.0 if dtype == F16 else 8.0, running=False)
        t = case.tensors()
        ours = half_run(case, layout, t)
        truth = run(replace(case, dtype=F64), "torch.nn.functional",
                    tensors={k: None if v is None else v.double() for k, v in t.items()})
        assert_within_ulps(ours["y"], truth["y"], f"{norm} {layout} {dtype}: y")


def test_bfloat16_widening_is_exact_for_every_pattern():
    from normlab.kernels import _numba as K

    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    out = np.empty(bits.size, np.float32)
    K._widen(bits, out)
    want = torch.from_numpy(bits.view(np.int16)).view(BF16).float().numpy()
    assert np.array_equal(out.view(np.uint32), want.view(np.uint32))  # NaN payloads included


def test_float16_widening_is_exact_for_every_pattern():
    from normlab.kernels import _numba as K

    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.int16)
    out = np.empty(bits.size, np.float32)
    K._widen(bits, out)
    want = torch.from_numpy(bits).view(F16).float().numpy()
    nan = np.isnan(want)
    assert np.isnan(out[nan]).all() and nan.sum() == 2 * 1023
    assert np.array_equal(out[~nan].view(np.uint32), want[~nan].view(np.uint32))  # -0, subnormals


def narrowing_inputs() -> torch.Tensor:
    """float32 values for the rounding tests: random bit patterns (every exponent, NaNs and
    infinities among them), random magnitudes, and edge cases: signed zeros, infinities, NaNs
    with several payloads, the largest values, subnormals, and ties of both 16-bit formats
    (halfway between two neighbours, both parities) with their neighbours one float32 ulp off."""
    g = torch.Generator().manual_seed(5)
    rand_bits = torch.randint(-2**31, 2**31, (1 << 18,), generator=g, dtype=torch.int64)
    rand_bits = rand_bits.to(torch.int32).view(F32)
    mags = torch.randn(1 << 16, generator=g) * 10.0 ** torch.randint(-40, 39, (1 << 16,),
                                                                      generator=g)
    ties = []
    for dt in (BF16, F16):  # a 16-bit value and the next one away from zero (bits + 1)
        lo = torch.randint(0, 0x7FFF, (1 << 14,), generator=g)
        lo = torch.where(torch.rand(lo.shape, generator=g) < 0.5, lo, lo | 0x8000)
        pair = [b.to(torch.int32).to(torch.int16).view(dt).double() for b in (lo, lo + 1)]
        ok = torch.isfinite(pair[0]) & torch.isfinite(pair[1])
        tie = ((pair[0] + pair[1]) / 2)[ok].float()  # exact in float32
        ties += [tie, torch.nextafter(tie, torch.tensor(math.inf)),
                 torch.nextafter(tie, torch.tensor(-math.inf))]
    edge = torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, -math.nan, 3.4028235e38,
                         -3.4028235e38, 1e-40, -1e-40, 1.4e-45, 6e-8, 3e-8, 6.1e-5, 65504.0,
                         65519.0, 65520.0, 1.00390625, 1.01171875, 1.0009765625, 1.0029296875])
    payloads = torch.tensor([0x7F800001, 0x7FC00000, 0xFF800001, 0x7FFFFFFF, 0x7F80FFFF,
                             0xFFC12345], dtype=torch.int64).to(torch.int32).view(F32)
    return torch.cat([rand_bits, mags, *ties, edge, payloads])


def test_bfloat16_narrowing_matches_torch():
    """float32 -> bfloat16 round to nearest even, as torch's ``.bfloat16()``; NaN stays NaN."""
    from normlab.kernels import _numba as K

    f = narrowing_inputs()
    out = np.empty(f.numel(), np.uint16)
    K._narrow(f.numpy(), out)
    got = torch.from_numpy(out.view(np.int16)).view(BF16)
    want = f.bfloat16()
    nan = want.isnan()
    assert torch.equal(got.isnan(), nan)
    assert torch.equal(got[~nan].view(torch.int16), want[~nan].view(torch.int16))  # -0 too


def test_float16_narrowing_matches_torch():
    """float32 -> float16 as torch's ``.half()``: nearest even, subnormals, overflow to inf."""
    from normlab.kernels import _numba as K

    f = narrowing_inputs()
    out = np.empty(f.numel(), np.int16)
    K._narrow(f.numpy(), out)
    got = torch.from_numpy(out).view(F16)
    want = f.half()
    nan = want.isnan()
    assert torch.equal(got.isnan(), nan)
    assert torch.equal(got[~nan].view(torch.int16), want[~nan].view(torch.int16))


@pytest.mark.parametrize("dtype", [F32, torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("count", [1, 2, 51])
def test_running_stats_update_is_torchs_bitwise(dtype, count):
    """update_running_stats (one call for both buffers on the CPU) gives bitwise torch's
    ``mul_(1 - m).add_(new, alpha=m)`` per buffer, the variance unbiased by n / (n - 1)."""
    from normlab import _engine
    g = torch.Generator().manual_seed(count)
    for n, momentum in ((1, 0.1), (37, 0.3333), (4099, 0.01)):
        rm, rv = torch.randn(n, generator=g).to(dtype) * 10, torch.rand(n, generator=g).to(dtype)
        mean, var = torch.randn(n, generator=g) * 10, torch.rand(n, generator=g) * 5
        got_m, got_v = rm.clone(), rv.clone()
        _engine.update_running_stats(got_m, got_v, mean, var, count, momentum)
        unbiased = var * (count / (count - 1)) if count > 1 else var
        want_m = rm.clone().mul_(1 - momentum).add_(mean.to(dtype), alpha=momentum)
        want_v = rv.clone().mul_(1 - momentum).add_(unbiased.to(dtype), alpha=momentum)
        assert torch.equal(got_m, want_m) and torch.equal(got_v, want_v)
        only = rv.clone()
        _engine.update_running_stats(None, only, mean, var, count, momentum)
        assert torch.equal(only, want_v)
