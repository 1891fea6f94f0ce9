"""The fused residual add + norm: ``add_rms_norm`` / ``add_layer_norm`` and the modules
``AddRMSNorm`` / ``AddLayerNorm``, on every backend that can run here.

The contract is the unfused torch composition ``h = input + residual; y = F.rms_norm(h, ...)``
(or ``F.layer_norm``), returned as ``(y, h)``:

* ``h`` is bitwise torch's ``input + residual`` (promoted dtype, one rounding), whatever the
  backend: it is the residual stream carried through every block;
* ``y`` is compared with torch's unfused composition and with a float64 oracle computed at the
  same (rounded) ``h``: no further from the oracle than torch's own result plus a margin (one
  ulp of the dtype for bf16/fp16; a few ulps for fp32; 1e-10 for fp64, where the oracle *is*
  torch's result), and for fp32/fp64 also elementwise within a tight tolerance of torch (plus
  twice torch's own error, which is large for fp32 LayerNorm at offset 1e3);
* gradients reach ``input``, ``residual``, ``weight`` and ``bias`` through both outputs:
  ``L = (y * a).sum() + (h * c).sum()`` with random ``a``, ``c``; they are compared the same way.

Inputs are random, at offsets 0 and 1e3, contiguous or not; never all zeros.
"""
from __future__ import annotations

import inspect
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import normlab
import normlab.functional as NF
import normlab.nn as nlnn
from normlab._engine import compute_dtype
from normlab.kernels.reference import BACKEND as REFERENCE

BACKENDS = normlab.available_backends()
F64, F32, BF16, F16 = torch.float64, torch.float32, torch.bfloat16, torch.float16
DTYPES = [F64, F32, BF16, F16]
WHICH = ["rms", "layer"]

# Normwise margin over torch's own distance to the float64 oracle, in units of max(1, max|oracle|).
MARGIN = {F64: 1e-10, F32: 2e-6, BF16: torch.finfo(BF16).eps, F16: torch.finfo(F16).eps}
# Elementwise (atol, rtol) against the unfused torch composition, fp32/fp64, plus torch's error.
TIGHT = {F64: (1e-10, 1e-10), F32: (2e-6, 1e-5)}


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def rand(shape, seed, dtype=F64, scale=1.0, offset=0.0, layout="contiguous"):
    """``randn * scale + offset`` in ``dtype`` with the given memory layout."""
    g = torch.Generator().manual_seed(int(seed) % (2**63))
    shape = tuple(shape)
    if layout == "sliced":  # every other element along the last dim
        big = torch.randn(shape[:-1] + (2 * shape[-1],), generator=g, dtype=F64)
        t = (big * scale + offset).to(dtype)[..., ::2]
    elif layout == "transposed" and len(shape) >= 2:  # dims 0 and -1 swapped in memory
        tshape = (shape[-1],) + shape[1:-1] + (shape[0],)
        t = (torch.randn(tshape, generator=g, dtype=F64) * scale + offset).to(dtype).transpose(0, -1)
    else:
        t = (torch.randn(shape, generator=g, dtype=F64) * scale + offset).to(dtype)
    assert tuple(t.shape) == shape
    return t


def copy_strided(t):
    """An independent copy with the same sizes and strides (None stays None)."""
    if t is None:
        return None
    out = torch.empty_strided(t.size(), t.stride(), dtype=t.dtype)
    out.copy_(t.detach())
    return out


def leaf(t):
    return None if t is None else copy_strided(t).requires_grad_(True)


def torch_unfused(which, x, r, ns, w, b, eps):
    """The composition normlab's fused functions must reproduce."""
    h = x + r
    y = F.rms_norm(h, ns, w, eps) if which == "rms" else F.layer_norm(h, ns, w, b, eps)
    return y, h


def normlab_fused(which, x, r, ns, w, b, eps):
    if which == "rms":
        return NF.add_rms_norm(x, r, ns, w, eps)
    return NF.add_layer_norm(x, r, ns, w, b, eps)


def run(fn, which, x, r, ns, w, b, eps, a, c):
    """Forward and backward of ``L = (y * a).sum() + (h * c).sum()``; returns
    ``(y, h, {name: grad})`` and the leaves."""
    xs, rs, ws, bs = leaf(x), leaf(r), leaf(w), leaf(b)
    y, h = fn(which, xs, rs, ns, ws, bs, eps)
    ((y * a).sum() + (h * c).sum()).backward()
    grads = {"input": xs.grad, "residual": rs.grad}
    if w is not None:
        grads["weight"] = ws.grad
    if b is not None:
        grads["bias"] = bs.grad
    return y, h, grads, (xs, rs, ws, bs)


def oracle(which, h, ns, w, b, eps, a, c):
    """float64 ``(y, {name: grad})`` at the *rounded* ``h`` every implementation shares:
    dL/dinput = dL/dresidual = dL/dh."""
    hd = h.detach().to(F64).requires_grad_(True)
    wd = None if w is None else w.detach().to(F64).requires_grad_(True)
    bd = None if b is None else b.detach().to(F64).requires_grad_(True)
    if which == "rms":
        if eps is None:  # the eps of h's compute dtype, as torch and normlab use
            eps = torch.finfo(compute_dtype(h.dtype)).eps
        yd = F.rms_norm(hd, ns, wd, eps)
    else:
        yd = F.layer_norm(hd, ns, wd, bd, eps)
    ((yd * a.to(F64)).sum() + (hd * c.to(F64)).sum()).backward()
    grads = {"input": hd.grad, "residual": hd.grad}
    if w is not None:
        grads["weight"] = wd.grad
    if b is not None:
        grads["bias"] = bd.grad
    return yd.detach(), grads


def check(actual, peer, exact, what):
    """``actual`` (normlab) against ``peer`` (torch's unfused composition) and ``exact`` (the
    float64 oracle); see the module docstring."""
    assert actual.dtype == peer.dtype, f"{what}: dtype {actual.dtype} != torch's {peer.dtype}"
    assert actual.shape == peer.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(peer.shape)}"
    if actual.numel() == 0:
        return
    dtype = actual.dtype
    a, p, e = (t.detach().to(F64) for t in (actual, peer, exact))
    assert torch.isfinite(a).all(), f"{what}: non-finite values"
    scale = max(1.0, float(e.abs().max()))
    err_peer = float((p - e).abs().max())
    err = float((a - e).abs().max())
    allowed = err_peer + MARGIN[dtype] * scale
    assert err <= allowed, (
        f"{what} ({dtype}): max error {err:.3g} vs the float64 oracle, torch's unfused "
        f"composition {err_peer:.3g}, allowed {allowed:.3g}"
    )
    if dtype in TIGHT:
        atol, rtol = TIGHT[dtype]
        # + torch's own error, twice: an implementation as accurate as torch may round the
        # other way (torch's fp32 LayerNorm loses ~1e-4 at offset 1e3; the oracle check above
        # holds normlab to torch's accuracy there)
        bad = (a - p).abs() > atol * scale + rtol * p.abs() + 2 * err_peer
        if bool(bad.any()):
            i = int(bad.reshape(-1).nonzero()[0])
            raise AssertionError(
                f"{what} ({dtype}): {int(bad.sum())}/{a.numel()} elements off torch; first at "
                f"flat index {i}: {a.reshape(-1)[i].item()!r} vs {p.reshape(-1)[i].item()!r}"
            )


def compare(backend, which, x, r, ns, w, b, eps, seed):
    """Run normlab on ``backend`` and torch's unfused composition on identical data; check the
    outputs and all gradients. Returns normlab's ``(y, h, grads)``."""
    hdt = torch.result_type(x, r)
    a = rand(x.shape, seed + 7, hdt, 1.0, 0.3)
    c = rand(x.shape, seed + 8, hdt, 1.0, -0.2)
    x0, r0 = copy_strided(x), copy_strided(r)
    with normlab.backend(backend):
        yn, hn, gn, (xs, rs, _, _) = run(normlab_fused, which, x, r, ns, w, b, eps, a, c)
    yt, ht, gt, _ = run(torch_unfused, which, x, r, ns, w, b, eps, a, c)
    ye, ge = oracle(which, ht, ns, w, b, eps, a, c)
    tag = f"[{backend}] add_{which}_norm{tuple(x.shape)} ns={ns}"

    assert isinstance(yn, torch.Tensor) and isinstance(hn, torch.Tensor), tag
    assert hn.dtype == yn.dtype == hdt, f"{tag}: dtypes y {yn.dtype}, h {hn.dtype}, want {hdt}"
    assert hn.shape == yn.shape == x.shape, tag
    assert torch.equal(hn.detach(), ht.detach()), f"{tag}: h is not bitwise input + residual"
    assert torch.equal(xs.detach(), x0) and torch.equal(rs.detach(), r0), f"{tag}: an input was modified"
    assert hn.data_ptr() not in (xs.data_ptr(), rs.data_ptr()), f"{tag}: h aliases an input"
    check(yn, yt, ye, f"{tag} output")
    assert set(gn) == set(gt), tag
    for k in gt:
        assert gn[k] is not None, f"{tag}: no gradient for {k}"
        check(gn[k], gt[k], ge[k], f"{tag} {k}.grad")
    if backend == "torch":  # the torch backend *is* the composition
        assert torch.equal(yn, yt), f"{tag}: backend('torch') output differs from torch"
        for k in gt:
            assert torch.equal(gn[k], gt[k]), f"{tag}: backend('torch') {k}.grad differs"
    return yn, hn, gn


# --------------------------------------------------------------------------------------------
# property test: random shapes, dtypes, layouts, affine options, eps, offsets
# --------------------------------------------------------------------------------------------
@st.composite
def cases(draw):
    k = draw(st.integers(1, 3), label="normalized ndim")
    lead = draw(st.lists(st.integers(1, 5), min_size=0, max_size=2), label="leading dims")
    ns = tuple(draw(st.lists(st.integers(1, 7), min_size=k, max_size=k), label="normalized_shape"))
    which = draw(st.sampled_from(WHICH), label="which")
    if which == "rms":
        eps = draw(st.sampled_from([None, 1e-6, 0.1]), label="eps")
        affine = draw(st.sampled_from(["none", "weight"]), label="affine")
    else:
        eps = draw(st.sampled_from([1e-5, 1e-3, 0.1]), label="eps")
        affine = draw(st.sampled_from(["none", "weight", "bias", "both"]), label="affine")
    return dict(
        shape=tuple(lead) + ns, ns=ns, which=which, eps=eps, affine=affine,
        dtype=draw(st.sampled_from(DTYPES), label="dtype"),
        offsets=(draw(st.sampled_from([0.0, 1e3, -0.7]), label="input offset"),
                 draw(st.sampled_from([0.0, 1e3, 1.3]), label="residual offset")),
        layouts=(draw(st.sampled_from(["contiguous", "sliced", "transposed"]), label="input layout"),
                 draw(st.sampled_from(["contiguous", "sliced", "transposed"]), label="residual layout")),
        seed=draw(st.integers(0, 2**31 - 1), label="seed"),
    )


@pytest.mark.parametrize("backend", BACKENDS)
@given(case=cases())
def test_matches_unfused_torch(backend, case):
    shape, ns, dtype, seed = case["shape"], case["ns"], case["dtype"], case["seed"]
    x = rand(shape, seed, dtype, 1.0, case["offsets"][0], case["layouts"][0])
    r = rand(shape, seed + 1, dtype, 1.5, case["offsets"][1], case["layouts"][1])
    w = rand(ns, seed + 2, dtype, 1.0, 0.5) if case["affine"] in ("weight", "both") else None
    b = rand(ns, seed + 3, dtype, 1.0, -0.25) if case["affine"] in ("bias", "both") else None
    compare(backend, case["which"], x, r, ns, w, b, case["eps"], seed)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which", WHICH)
def test_one_of_each_dtype_noncontiguous_at_1e3(backend, which):
    """A fixed, larger case per dtype (the property test's shapes are small): 3-D input with a
    2-D normalized shape, transposed input, sliced residual at 1e3, weight and bias."""
    ns = (6, 33)
    for i, dtype in enumerate(DTYPES):
        x = rand((5,) + ns, 10 + i, dtype, 1.0, 0.5, "transposed")
        r = rand((5,) + ns, 20 + i, dtype, 2.0, 1e3, "sliced")
        w = rand(ns, 30 + i, dtype, 1.0, 0.5)
        b = rand(ns, 40 + i, dtype, 1.0, -0.25) if which == "layer" else None
        compare(backend, which, x, r, ns, w, b, None if which == "rms" else 1e-5, 50 + i)


# --------------------------------------------------------------------------------------------
# dtype promotion and eps=None
# --------------------------------------------------------------------------------------------
PAIRS = [(F32, F64), (F64, F32), (BF16, F32), (F32, F16), (F16, BF16), (BF16, BF16)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which", WHICH)
@pytest.mark.parametrize("pair", PAIRS, ids=lambda p: f"{p[0]}+{p[1]}".replace("torch.", ""))
def test_mixed_dtypes_promote(backend, which, pair):
    """h (and y) take torch.result_type(input, residual); each gradient has its leaf's dtype."""
    xdt, rdt = pair
    hdt = torch.result_type(torch.empty(0, dtype=xdt), torch.empty(0, dtype=rdt))
    ns = (12,)
    x = rand((4, 3) + ns, 1, xdt, 1.0, 0.5, "sliced")
    r = rand((4, 3) + ns, 2, rdt, 2.0, 3.0)
    w = rand(ns, 3, hdt, 1.0, 0.5)
    b = rand(ns, 4, hdt, 1.0, 0.25) if which == "layer" else None
    _, _, grads = compare(backend, which, x, r, ns, w, b, None if which == "rms" else 1e-5, 5)
    assert grads["input"].dtype == xdt and grads["residual"].dtype == rdt


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pair", [(F32, F32), (F32, F64), (F64, F64), (BF16, F16), (BF16, BF16)],
                         ids=lambda p: f"{p[0]}+{p[1]}".replace("torch.", ""))
def test_rms_eps_none_is_that_of_the_sum(backend, pair):
    """eps=None is the machine epsilon of h's compute dtype: values so small that eps dominates
    the mean square make any other choice visible."""
    xdt, rdt = pair
    hdt = torch.result_type(torch.empty(0, dtype=xdt), torch.empty(0, dtype=rdt))
    tiny = 1e-9 if hdt == F64 else 1e-5  # mean square 1e-18 / 1e-10, below each dtype's eps
    x = rand((3, 8), 1, xdt, tiny, tiny)
    r = rand((3, 8), 2, rdt, tiny, -tiny / 3)
    with normlab.backend(backend):
        y, h = NF.add_rms_norm(x, r, 8)
        y_explicit, _ = NF.add_rms_norm(x, r, 8, eps=torch.finfo(compute_dtype(hdt)).eps)
    yt = F.rms_norm(x + r, (8,))
    assert y.dtype == hdt
    assert torch.equal(y, y_explicit)
    ye = F.rms_norm(h.double(), (8,), eps=torch.finfo(compute_dtype(hdt)).eps)
    check(y, yt, ye, f"[{backend}] eps=None {pair}")
    assert float(y.double().abs().max()) < 0.5  # eps does dominate: far from unit rms


# --------------------------------------------------------------------------------------------
# gradcheck, dispatch, edge cases
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", WHICH)
def test_gradcheck_reference_float64(which):
    """Exact first and second derivatives of both outputs in float64 on the reference backend
    (non-contiguous input, offset residual)."""
    ns = (3, 4)
    x = leaf(rand((2,) + ns, 1, F64, 1.0, 0.5, "transposed"))
    r = leaf(rand((2,) + ns, 2, F64, 1.0, 2.0, "sliced"))
    w = leaf(rand(ns, 3, F64, 1.0, 0.5))
    b = leaf(rand(ns, 4, F64, 1.0, 0.2))
    with normlab.backend("reference"):
        if which == "rms":
            def fn(x, r, w):
                return NF.add_rms_norm(x, r, ns, w, 1e-3)
            inputs = (x, r, w)
        else:
            def fn(x, r, w, b):
                return NF.add_layer_norm(x, r, ns, w, b, 1e-3)
            inputs = (x, r, w, b)
        assert torch.autograd.gradcheck(fn, inputs)
        assert torch.autograd.gradgradcheck(fn, inputs)


class _Plain:
    """A backend with the norms only, delegating to the reference; records what it is called with."""

    def __init__(self):
        self.calls = []
        self._ref = REFERENCE

    def rms_norm(self, x, normalized_shape, weight, eps):
        self.calls.append(("rms_norm", x.detach().clone(), normalized_shape, eps))
        return self._ref.rms_norm(x, normalized_shape, weight, eps)

    def layer_norm(self, x, normalized_shape, weight, bias, eps):
        self.calls.append(("layer_norm", x.detach().clone(), normalized_shape, eps))
        return self._ref.layer_norm(x, normalized_shape, weight, bias, eps)


class _Fused(_Plain):
    def add_rms_norm(self, x, residual, normalized_shape, weight, eps):
        self.calls.append(("add_rms_norm", normalized_shape, eps))
        return "fused-rms"

    def add_layer_norm(self, x, residual, normalized_shape, weight, bias, eps):
        self.calls.append(("add_layer_norm", normalized_shape, eps))
        return "fused-layer"


def test_a_backend_without_the_add_methods_is_refused_and_the_methods_get_canonical_args(
        monkeypatch):
    """Every backend implements add_layer_norm/add_rms_norm (normlab._dispatch.Backend): one
    without them is refused when it is registered, naming what it lacks; the methods receive
    canonical arguments (normalized_shape a tuple, eps a float)."""
    from normlab._dispatch import check_backend

    x, r = rand((2, 3, 4), 1, F32, 1.0, 0.5), rand((2, 3, 4), 2, F64, 1.0, 1.0)
    with pytest.raises(TypeError, match=r"add_layer_norm\(.*add_rms_norm\("):
        check_backend(_Plain(), "plain")
    fused = _Fused()
    monkeypatch.setattr(NF, "get_backend", lambda *_: fused)
    assert NF.add_rms_norm(x.float(), r.float(), 4) == "fused-rms"
    assert fused.calls[-1] == ("add_rms_norm", (4,), torch.finfo(F32).eps)
    assert NF.add_rms_norm(x, r, [3, 4]) == "fused-rms"  # h's dtype (float64) gives eps
    assert fused.calls[-1] == ("add_rms_norm", (3, 4), torch.finfo(F64).eps)
    assert NF.add_layer_norm(x, r, [3, 4], eps=1) == "fused-layer"
    assert fused.calls[-1] == ("add_layer_norm", (3, 4), 1.0)
    assert isinstance(fused.calls[-1][2], float)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_and_unbatched(backend):
    with normlab.backend(backend):
        y, h = NF.add_rms_norm(torch.empty(0, 5), torch.empty(0, 5), 5)
        assert y.shape == h.shape == (0, 5)
        y, h = NF.add_layer_norm(torch.empty(2, 0, 5), torch.empty(2, 0, 5), (0, 5))
        assert y.shape == h.shape == (2, 0, 5)
        x, r = rand((7,), 1, F32, 1.0, 0.5), rand((7,), 2, F32, 1.0, -1.0)  # no leading dims
        y, h = NF.add_layer_norm(x, r, 7)
        assert torch.equal(h, x + r)
        torch.testing.assert_close(y, F.layer_norm(x + r, (7,)), atol=2e-6, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# modules
# --------------------------------------------------------------------------------------------
MODULES = [
    (nlnn.AddRMSNorm, torch.nn.RMSNorm, {}),
    (nlnn.AddRMSNorm, torch.nn.RMSNorm, {"eps": 1e-4}),
    (nlnn.AddRMSNorm, torch.nn.RMSNorm, {"elementwise_affine": False}),
    (nlnn.AddLayerNorm, torch.nn.LayerNorm, {}),
    (nlnn.AddLayerNorm, torch.nn.LayerNorm, {"bias": False, "eps": 1e-3}),
    (nlnn.AddLayerNorm, torch.nn.LayerNorm, {"elementwise_affine": False}),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls,tcls,kw", MODULES, ids=lambda v: getattr(v, "__name__", str(v)))
def test_module_loads_torch_checkpoint_and_matches(backend, cls, tcls, kw):
    ns = (4, 6)
    t = tcls(ns, **kw)
    with torch.no_grad():
        for i, p in enumerate(t.parameters()):
            p.copy_(rand(p.shape, 60 + i, F32, 1.0, 0.5))
    n = cls(ns, **kw)
    assert isinstance(n, tcls) and isinstance(n, getattr(nlnn, tcls.__name__))
    assert n.extra_repr() == t.extra_repr()
    assert list(n.state_dict()) == list(t.state_dict())
    n.load_state_dict(t.state_dict(), strict=True)
    back = tcls(ns, **kw)
    back.load_state_dict(n.state_dict(), strict=True)  # and back into torch
    for p, q in zip(back.parameters(), t.parameters()):
        assert torch.equal(p, q)

    x = rand((3,) + ns, 61, F32, 1.0, 0.3, "transposed")
    r = rand((3,) + ns, 62, F32, 1.0, 1e3)
    a, c = rand(x.shape, 63, F32), rand(x.shape, 64, F32)
    xn, rn, xt, rt = (leaf(v) for v in (x, r, x, r))
    with normlab.backend(backend):
        yn, hn = n(xn, rn)
    ht = xt + rt
    yt = t(ht)
    ((yn * a).sum() + (hn * c).sum()).backward()
    ((yt * a).sum() + (ht * c).sum()).backward()
    assert torch.equal(hn, ht)
    # torch's own fp32 LayerNorm loses ~1e-4 at offset 1e3 (normlab does not): a normwise
    # tolerance that holds for both
    tol = dict(atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(yn, yt, **tol)
    torch.testing.assert_close(xn.grad, xt.grad, **tol)
    torch.testing.assert_close(rn.grad, rt.grad, **tol)
    for (name, p), q in zip(n.named_parameters(), t.parameters()):
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, q.grad, atol=2e-4 * max(1.0, float(q.grad.abs().max())),
                                   rtol=1e-4, msg=name)


def test_modules_are_left_alone_by_patch():
    model = torch.nn.Sequential(nlnn.AddRMSNorm(4), nlnn.AddLayerNorm(4), torch.nn.LayerNorm(4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        normlab.patch(model)
    assert type(model[0]) is nlnn.AddRMSNorm and type(model[1]) is nlnn.AddLayerNorm
    assert type(model[2]) is nlnn.LayerNorm


# --------------------------------------------------------------------------------------------
# signatures and errors
# --------------------------------------------------------------------------------------------
def test_signatures():
    assert list(inspect.signature(NF.add_rms_norm).parameters) == [
        "input", "residual", "normalized_shape", "weight", "eps"]
    assert list(inspect.signature(NF.add_layer_norm).parameters) == [
        "input", "residual", "normalized_shape", "weight", "bias", "eps"]
    assert inspect.signature(NF.add_rms_norm).parameters["eps"].default is None
    assert inspect.signature(NF.add_layer_norm).parameters["eps"].default == 1e-5
    # the modules take the arguments of the torch classes they extend
    for cls, tcls in ((nlnn.AddRMSNorm, torch.nn.RMSNorm), (nlnn.AddLayerNorm, torch.nn.LayerNorm)):
        assert inspect.signature(cls) == inspect.signature(tcls)
        assert list(inspect.signature(cls.forward).parameters) == ["self", "input", "residual"]


def _x(shape=(2, 4), dtype=F32):
    return rand(shape, 9, dtype, 1.0, 0.5)


ERRORS = [
    # (description, call, exception, fragments the message must contain)
    ("residual of another shape", lambda f: f(_x((2, 4)), _x((2, 5)), 4),
     normlab.ShapeError, ["(2, 4)", "(2, 5)", "residual"]),
    ("residual that would broadcast (rows)", lambda f: f(_x((2, 4)), _x((1, 4)), 4),
     normlab.ShapeError, ["(2, 4)", "(1, 4)", "broadcast"]),
    ("residual that would broadcast (rank)", lambda f: f(_x((2, 4)), _x((4,)), 4),
     normlab.ShapeError, ["(2, 4)", "(4,)"]),
    ("residual with an extra dim", lambda f: f(_x((2, 4)), _x((3, 2, 4)), 4),
     normlab.ShapeError, ["(2, 4)", "(3, 2, 4)"]),
    ("integer input", lambda f: f(torch.arange(8).reshape(2, 4), _x(), 4),
     normlab.DTypeError, ["torch.int64", "input"]),
    ("integer residual", lambda f: f(_x(), torch.arange(8).reshape(2, 4), 4),
     normlab.DTypeError, ["torch.int64", "residual"]),
    ("bool residual", lambda f: f(_x(), torch.ones(2, 4, dtype=torch.bool), 4),
     normlab.DTypeError, ["torch.bool", "residual"]),
    ("complex input", lambda f: f(torch.ones(2, 4, dtype=torch.complex64), _x(), 4),
     normlab.DTypeError, ["complex64"]),
    ("residual not a tensor", lambda f: f(_x(), [[1.0] * 4] * 2, 4), TypeError, ["residual", "list"]),
    ("wrong normalized_shape", lambda f: f(_x((2, 4)), _x((2, 4)), 5),
     normlab.ShapeError, ["normalized_shape=[5]", "(2, 4)"]),
    ("normalized_shape longer than the input", lambda f: f(_x((2, 4)), _x((2, 4)), (3, 2, 4)),
     normlab.ShapeError, ["normalized_shape=[3, 2, 4]"]),
    ("empty normalized_shape", lambda f: f(_x(), _x(), ()), normlab.ShapeError, ["()"]),
    ("weight of the wrong shape", lambda f: f(_x(), _x(), 4, torch.ones(5)),
     normlab.ShapeError, ["weight", "(5,)"]),
    ("integer weight", lambda f: f(_x(), _x(), 4, torch.ones(4, dtype=torch.int32)),
     normlab.DTypeError, ["weight", "int32"]),
    ("residual on another device", lambda f: f(_x(), torch.ones(2, 4, device="meta"), 4),
     normlab.ArgumentError, ["cpu", "meta"]),
]


@pytest.mark.parametrize("which", WHICH)
@pytest.mark.parametrize("desc,call,exc,fragments", ERRORS, ids=[e[0] for e in ERRORS])
def test_errors(which, desc, call, exc, fragments):
    fn = NF.add_rms_norm if which == "rms" else NF.add_layer_norm
    with pytest.raises(exc) as info:
        call(fn)
    msg = str(info.value)
    assert msg.startswith(f"add_{which}_norm: "), msg
    for frag in fragments:
        assert frag in msg, f"{desc}: {frag!r} not in {msg!r}"
    if exc is not TypeError:
        assert isinstance(info.value, RuntimeError)  # code catching torch's errors keeps working


def test_layer_bias_errors_and_module_errors():
    with pytest.raises(normlab.ShapeError, match=r"bias .*\(3,\)"):
        NF.add_layer_norm(_x(), _x(), 4, None, torch.ones(3))
    with pytest.raises(normlab.ShapeError, match=r"\(2, 4\).*\(2, 3\)"):
        nlnn.AddRMSNorm(4)(_x((2, 4)), _x((2, 3)))
    with pytest.raises(normlab.ShapeError, match=r"normalized_shape=\[4\]"):
        nlnn.AddLayerNorm(4)(_x((2, 5)), _x((2, 5)))
    with pytest.raises(TypeError):
        nlnn.AddLayerNorm(4)(_x((2, 4)))  # the residual is required
    assert math.isfinite(float(nlnn.AddLayerNorm(4)(_x(), _x())[0].detach().sum()))


@pytest.mark.parametrize("backend", normlab.available_backends())
def test_new_residual_does_not_depend_on_the_parameters(backend):
    x, r = torch.randn(4, 6) + 1, torch.randn(4, 6)
    w, b = torch.ones(6, requires_grad=True), torch.zeros(6, requires_grad=True)
    with normlab.backend(backend):
        y1, h1 = NF.add_layer_norm(x, r, 6, w, b)
        y2, h2 = NF.add_rms_norm(x, r, 6, w)
    assert y1.requires_grad and y2.requires_grad
    assert not h1.requires_grad and not h2.requires_grad  # as unfused x + r
