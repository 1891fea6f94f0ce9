"""The fused Numba ``cpu`` backend against the reference engine and torch: LayerNorm and RMSNorm
rows (fused), forward and backward, random shapes, layouts, dtypes and affine options; the
norms not fused yet must equal the reference exactly."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import normlab
import normlab.functional as F

pytest.importorskip("numba")

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def _make(shape, ns_len, dtype, seed, offset, layout, affine):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g, dtype=torch.float64) * 1.7 + offset
    if layout == "transposed" and len(shape) >= 2:  # a non-contiguous view with the same values
        base = base.transpose(0, -1).contiguous().transpose(0, -1)
    elif layout == "strided":
        base = torch.stack([base, base], -1)[..., 0]
    x = base.to(dtype)
    ns = shape[len(shape) - ns_len:]
    w = torch.randn(ns, generator=g, dtype=torch.float64).to(dtype) if affine != "none" else None
    b = torch.randn(ns, generator=g, dtype=torch.float64).to(dtype) if affine == "both" else None
    dy = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    return x, w, b, dy, ns


def _run(backend, norm, x, w, b, dy, ns):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, w, b)]
    with normlab.backend(backend):
        if norm == "layer_norm":
            y = F.layer_norm(leaves[0], ns, leaves[1], leaves[2])
        else:
            y = F.rms_norm(leaves[0], ns, leaves[1], eps=1e-5)
    y.backward(dy)
    return [y] + [t.grad for t in leaves if t is not None]


def _assert_close(a, e, tol, what):
    err = (a.double() - e.double()).abs()
    scale = e.double().abs().max().item() + 1
    assert err.max().item() <= tol * scale, (
        f"{what}: max error {err.max().item():.3g} at {tuple(err.argmax().item() for _ in [0])}"
        f" (got {a.flatten()[err.argmax()].item():.6g}, want {e.flatten()[err.argmax()].item():.6g})")


@given(
    shape=st.lists(st.integers(1, 9), min_size=1, max_size=4).map(tuple),
    ns_len=st.integers(1, 2),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
    offset=st.sampled_from([0.0, -2.5, 3.0, 1e3]),
    layout=st.sampled_from(["contiguous", "transposed", "strided"]),
    affine=st.sampled_from(["none", "weight", "both"]),
    norm=st.sampled_from(["layer_norm", "rms_norm"]),
)
def test_rows_match_reference_and_torch(shape, ns_len, dtype, seed, offset, layout, affine, norm):
    ns_len = min(ns_len, len(shape))
    if norm == "rms_norm" and affine == "both":
        affine = "weight"
    x, w, b, dy, ns = _make(shape, ns_len, dtype, seed, offset, layout, affine)
    ours = _run("cpu", norm, x, w, b, dy, ns)
    for peer in ("reference", "torch"):
        if peer == "torch" and dtype in (torch.float16, torch.bfloat16) and offset == 1e3:
            continue  # torch's own low-precision error at a large offset exceeds the tolerance
        for i, (a, e) in enumerate(zip(ours, _run(peer, norm, x, w, b, dy, ns))):
            tol = TOL[dtype] * (8 if i >= 2 else 1)  # parameter grads sum over rows
            _assert_close(a, e, tol, f"{norm} vs {peer}, output {i}")
    assert ours[0].dtype == dtype and ours[0].shape == x.shape


@pytest.mark.parametrize("d", [1, 7, 1000, 4099])
def test_wide_and_odd_rows(d):
    x, w, b, dy, ns = _make((5, d), 1, torch.float32, 3, 0.5, "contiguous", "both")
    for a, e in zip(_run("cpu", "layer_norm", x, w, b, dy, ns), _run("torch", "layer_norm", x, w, b, dy, ns)):
        _assert_close(a, e, 1e-4, f"d={d}")


@pytest.mark.parametrize("offset", [1e4, 1e5])
def test_large_mean_fp32(offset):
    g = torch.Generator().manual_seed(0)
    x = offset + torch.randn(16, 1000, generator=g)
    with normlab.backend("cpu"):
        y = F.layer_norm(x, 1000)
    ref = torch.nn.functional.layer_norm(x.double(), [1000])
    assert (y.double() - ref).abs().max().item() < 1e-3


def test_deterministic():
    x, w, b, dy, ns = _make((257, 64), 1, torch.float32, 5, 1.0, "contiguous", "both")
    first, second = (_run("cpu", "layer_norm", x, w, b, dy, ns) for _ in range(2))
    for a, e in zip(first, second):
        assert torch.equal(a, e)


def test_empty_and_fallback_norms_equal_reference():
    with normlab.backend("cpu"):
        assert F.layer_norm(torch.randn(0, 4), 4).shape == (0, 4)
    x = torch.randn(4, 6, 5, 5) * 2 + 1
    for fn in (lambda: F.group_norm(x, 3), lambda: F.instance_norm(x),  # not fused yet
               lambda: F.batch_norm(x.contiguous(memory_format=torch.channels_last), None, None,
                                    training=True)):
        with normlab.backend("cpu"):
            a = fn()
        with normlab.backend("reference"):
            e = fn()
        assert torch.equal(a, e)


def test_module_and_gradcheck_on_cpu_backend():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 6, generator=g, dtype=torch.float64).requires_grad_()
    w = torch.randn(6, generator=g, dtype=torch.float64).requires_grad_()
    b = torch.randn(6, generator=g, dtype=torch.float64).requires_grad_()
    with normlab.backend("cpu"):
        assert torch.autograd.gradcheck(lambda x, w, b: F.layer_norm(x, 6, w, b), (x, w, b))
        assert torch.autograd.gradcheck(lambda x, w: F.rms_norm(x, 6, w), (x, w))
        m = normlab.nn.LayerNorm(6).double()
        torch.testing.assert_close(m(x), torch.nn.functional.layer_norm(x, [6], m.weight, m.bias))


def test_missing_dependency_makes_a_backend_unavailable(monkeypatch):
    import normlab._dispatch as D

    monkeypatch.setitem(D._KNOWN, "fake", "normlab_no_such_module:BACKEND")
    monkeypatch.setitem(D._REQUIRES, "fake", "normlab_no_such_module")
    assert "fake" not in normlab.available_backends()
    with pytest.raises(normlab.BackendUnavailableError, match="fake"):
        with normlab.backend("fake"):
            pass


@given(
    shape=st.lists(st.integers(1, 6), min_size=2, max_size=5).map(tuple),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
    offset=st.sampled_from([0.0, -2.5, 3.0, 1e4]),
    training=st.booleans(),
    affine=st.sampled_from(["none", "weight", "both"]),
    momentum=st.sampled_from([0.0, 0.1, 1.0]),
)
def test_batch_norm_matches_reference_and_torch(shape, dtype, seed, offset, training, affine,
                                                momentum):
    if training and shape[0] * torch.Size(shape[2:]).numel() == 1:
        shape = (2,) + shape[1:]
    if dtype in (torch.float16, torch.bfloat16):
        offset = min(offset, 3.0)  # a 1e4 offset is below the resolution of these dtypes
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 1.7 + offset).to(dtype)
    w = torch.randn(c, generator=g, dtype=torch.float64).to(dtype) if affine != "none" else None
    b = torch.randn(c, generator=g, dtype=torch.float64).to(dtype) if affine == "both" else None
    dy = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    rm0 = (torch.randn(c, generator=g, dtype=torch.float64) + offset).to(dtype)
    rv0 = (torch.rand(c, generator=g, dtype=torch.float64) + 0.5).to(dtype)

    def run(backend):
        leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, w, b)]
        rm, rv = rm0.clone(), rv0.clone()
        with normlab.backend(backend):
            y = F.batch_norm(leaves[0], rm, rv, leaves[1], leaves[2], training, momentum, 1e-5)
        y.backward(dy)
        return [y, rm, rv] + [t.grad for t in leaves if t is not None]

    ours = run("cpu")
    peers = ["reference"] + (["torch"] if dtype in (torch.float32, torch.float64) and offset < 1e3
                             else [])
    for peer in peers:
        for i, (a, e) in enumerate(zip(ours, run(peer))):
            _assert_close(a, e, TOL[dtype] * (8 if i >= 3 else 1), f"batch_norm vs {peer}, out {i}")


def test_batch_norm_fused_path_is_taken_and_layouts_fall_back():
    from normlab.kernels import cpu

    calls = []
    real = cpu._BatchNorm.apply
    cpu._BatchNorm.apply = lambda *a: calls.append(a[0].shape) or real(*a)
    try:
        x = torch.randn(4, 3, 5, 5) + 1
        with normlab.backend("cpu"):
            F.batch_norm(x, None, None, training=True)
            F.batch_norm(x.contiguous(memory_format=torch.channels_last), None, None, training=True)
    finally:
        cpu._BatchNorm.apply = real
    assert calls == [(4, 3, 5, 5)]  # contiguous fused, channels_last on the reference engine


def test_double_backward_is_refused_clearly():
    x = torch.randn(3, 5, requires_grad=True)
    with normlab.backend("cpu"), pytest.raises(RuntimeError, match="create_graph"):
        torch.autograd.grad(F.layer_norm(x, 5).pow(2).sum(), x, create_graph=True)
