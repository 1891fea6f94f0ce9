"""The ``triton`` backend behind normlab's public API: every norm through ``normlab.functional``
and ``normlab.nn`` under ``normlab.backend("triton")``, against the reference engine, forward and
backward, in each layout and dtype; the registered operators (opcheck, torch.compile); running
statistics; second derivatives; the automatic choice. Without a GPU the kernels run on CPU
tensors in Triton's interpreter (``TRITON_INTERPRET=1``, set by conftest), so shapes are small.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

import normlab  # noqa: E402
import normlab.functional as NF  # noqa: E402
from normlab import _dispatch  # noqa: E402
from normlab.kernels import triton_backend as TB  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
if DEV == "cpu" and not TB.INTERPRET:
    pytest.skip("no GPU and TRITON_INTERPRET is not set", allow_module_level=True)

TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.float64: dict(atol=1e-10, rtol=1e-10),
       torch.bfloat16: dict(atol=3e-2, rtol=3e-2), torch.float16: dict(atol=4e-3, rtol=4e-3)}


def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "channels_last":
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        return x.contiguous(memory_format=fmt)
    if layout == "strided":  # neither contiguous nor channels-last: a slice of a wider tensor
        return torch.cat([x, x], dim=-1)[..., ::2]
    return x.contiguous()


def _call(backend: str, fn, x, params, dy):
    """fn(x, *params) on ``backend``: (y, dx, dparams) with fresh leaves."""
    x = x.detach().clone().requires_grad_()
    ps = [p.detach().clone().requires_grad_() for p in params]
    with normlab.backend(backend):
        y = fn(x, *ps)
    y.backward(dy)
    return y.detach(), x.grad, [p.grad for p in ps]


def _check(fn, x, params, dtype, tag):
    x = x.to(DEV, dtype)
    params = [p.to(DEV, dtype) for p in params]
    dy = torch.randn(x.shape, device=DEV, dtype=dtype)
    y, dx, dps = _call("triton", fn, x, params, dy)
    y64, dx64, dps64 = _call("reference", fn, x.double(), [p.double() for p in params],
                             dy.double())
    tol = TOL[dtype]
    assert y.dtype == dtype and y.shape == x.shape, tag
    assert y.stride() == y64.stride(), f"{tag}: output layout"  # torch's (E.output_like)
    torch.testing.assert_close(y.double(), y64, **tol, msg=f"{tag}: y")
    torch.testing.assert_close(dx.double(), dx64, **tol, msg=f"{tag}: dx")
    for g, g64 in zip(dps, dps64):
        scale = max(1.0, g64.abs().max().item())
        torch.testing.assert_close(g.double() / scale, g64 / scale, **tol, msg=f"{tag}: dparam")


def _rand(*shape):
    return torch.randn(*shape, dtype=torch.float64) * 2 + 0.5


CASES = {
    "layer_norm": (lambda x, w, b: NF.layer_norm(x, x.shape[-1:], w, b, 1e-5),
                   lambda s: [_rand(s[-1]), _rand(s[-1])]),
    "rms_norm": (lambda x, w: NF.rms_norm(x, x.shape[-1:], w, 1e-6),
                 lambda s: [_rand(s[-1])]),
    "group_norm": (lambda x, w, b: NF.group_norm(x, 2, w, b, 1e-5),
                   lambda s: [_rand(s[1]), _rand(s[1])]),
    "instance_norm": (lambda x, w, b: NF.instance_norm(x, weight=w, bias=b),
                      lambda s: [_rand(s[1]), _rand(s[1])]),
    "batch_norm": (lambda x, w, b: NF.batch_norm(x, None, None, w, b, training=True),
                   lambda s: [_rand(s[1]), _rand(s[1])]),
}


@pytest.mark.parametrize("norm", sorted(CASES))
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norms_match_reference(norm, layout, dtype):
    torch.manual_seed(hash((norm, layout, str(dtype))) % 2**31)
    fn, params = CASES[norm]
    shape = (3, 4, 5, 3)
    x = _layout(_rand(*shape), layout)
    _check(fn, x, params(shape), dtype, f"{norm} {layout} {dtype}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
@pytest.mark.parametrize("norm", ["layer_norm", "group_norm", "batch_norm"])
def test_other_dtypes(norm, dtype):
    torch.manual_seed(1)
    fn, params = CASES[norm]
    shape = (2, 4, 7)
    _check(fn, _rand(*shape), params(shape), dtype, f"{norm} {dtype}")


def test_rows_of_several_axes_and_no_affine():
    torch.manual_seed(2)
    x = _rand(3, 5, 6)
    _check(lambda x: NF.layer_norm(x, (5, 6)), x, [], torch.float32, "layer_norm (5, 6)")
    _check(lambda x: NF.rms_norm(x, (5, 6)), x, [], torch.float32, "rms_norm (5, 6)")
    _check(lambda x: NF.group_norm(x, 5), x, [], torch.float32, "group_norm no affine")


@pytest.mark.parametrize("module", ["BatchNorm2d", "InstanceNorm2d"])
def test_running_statistics_and_eval(module):
    torch.manual_seed(3)
    kw = {"track_running_stats": True, "affine": True} if module == "InstanceNorm2d" else {}
    ours = getattr(normlab.nn, module)(4, momentum=0.3, **kw).to(DEV)
    ref = getattr(normlab.nn, module)(4, momentum=0.3, **kw).to(DEV)
    for layout in ("contiguous", "channels_last"):
        x = _layout(_rand(3, 4, 5, 2).float().to(DEV), layout)
        with normlab.backend("triton"):
            y = ours.train()(x)
        with normlab.backend("reference"):
            y_ref = ref.train()(x)
        torch.testing.assert_close(y, y_ref, atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(ours.running_mean, ref.running_mean, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(ours.running_var, ref.running_var, atol=1e-6, rtol=1e-5)
        with normlab.backend("triton"):
            y = ours.eval()(x)
        with normlab.backend("reference"):
            y_ref = ref.eval()(x)
        torch.testing.assert_close(y, y_ref, atol=2e-5, rtol=2e-5)
    assert ours.num_batches_tracked.item() == ref.num_batches_tracked.item()


@pytest.mark.parametrize("which", ["rms", "layer"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_norm(which, dtype):
    torch.manual_seed(4)
    x, r = _rand(4, 9).to(DEV, dtype), _rand(4, 9).to(DEV, dtype)
    w, b = _rand(9).to(DEV, dtype), _rand(9).to(DEV, dtype)

    def run(backend):
        xs, rs, ws = (t.clone().requires_grad_() for t in (x, r, w))
        with normlab.backend(backend):
            if which == "rms":
                y, h = NF.add_rms_norm(xs, rs, (9,), ws)
            else:
                y, h = NF.add_layer_norm(xs, rs, (9,), ws, b)
        (y.float().square().sum() + (h.float() * 3).sum()).backward()
        return y, h, xs.grad, rs.grad, ws.grad

    got, want = run("triton"), run("reference")
    assert torch.equal(got[1], x + r), "h is torch's x + residual, bitwise"
    for a, e in zip(got, want):
        torch.testing.assert_close(a.float(), e.float(), **TOL[dtype])


def test_second_derivatives():
    torch.manual_seed(5)
    x = _rand(2, 4, 3).to(DEV).requires_grad_()
    w = _rand(4).to(DEV).requires_grad_()

    def f(x, w):
        return NF.group_norm(x, 2, w).square().sum()

    with normlab.backend("triton"):
        gx, = torch.autograd.grad(f(x, w), x, create_graph=True)
        gg, = torch.autograd.grad(gx.sin().sum(), w)
    with normlab.backend("reference"):
        gx_ref, = torch.autograd.grad(f(x, w), x, create_graph=True)
        gg_ref, = torch.autograd.grad(gx_ref.sin().sum(), w)
    torch.testing.assert_close(gx, gx_ref)
    torch.testing.assert_close(gg, gg_ref)


def test_deterministic():
    torch.manual_seed(6)
    x = _rand(6, 4, 5).float().to(DEV).requires_grad_()
    w = _rand(4).float().to(DEV).requires_grad_()
    outs = []
    for _ in range(2):
        with normlab.backend("triton"):
            y = NF.batch_norm(x, None, None, w, None, training=True)
        gx, gw = torch.autograd.grad(y, (x, w), torch.ones_like(y) + x.detach())
        outs.append((y, gx, gw))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def _op_samples():
    x4 = _rand(2, 4, 3, 2).float().to(DEV)
    x2 = _rand(3, 8).float().to(DEV)
    w4, b4 = _rand(4).float().to(DEV), _rand(4).float().to(DEV)
    w8 = _rand(8).float().to(DEV)
    return [
        (x2, w8, None, None, None, 1, 0, False, 1e-6),  # rms
        (x2, w8, w8.flip(0), None, None, 1, 0, True, 1e-5),  # layer
        (x4, w4, b4, None, None, 0, 2, True, 1e-5),  # group
        (x4.contiguous(memory_format=torch.channels_last), w4, b4, None, None, 0, 0, True,
         1e-5),  # batch
        (x4, w4, b4, b4.abs(), w4.abs() + 0.5, 0, 0, True, 1e-5),  # batch, given statistics
    ]


@pytest.mark.parametrize("i", range(5))
def test_opcheck(i):
    x, *rest = _op_samples()[i]
    x = x.clone().requires_grad_()
    weight = rest[0].clone().requires_grad_()
    torch.library.opcheck(torch.ops.normlab.triton_norm.default, (x, weight, *rest[1:]),
                          test_utils=("test_schema", "test_faketensor",
                                      "test_autograd_registration"))


def test_compile_fullgraph_traces_the_operators():
    torch.manual_seed(7)
    x = _rand(2, 4, 3, 2).float().to(DEV)
    w = _rand(4).float().to(DEV)

    def f(x, w):
        y = NF.group_norm(x, 2, w)
        return NF.rms_norm(y, (2,), None, 1e-6) + NF.batch_norm(x, None, None, w, training=True)

    with normlab.backend("triton"):
        compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
        got = compiled(x, w)
    with normlab.backend("reference"):
        want = f(x, w)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


def test_auto_picks_triton_for_cuda_only():
    assert _dispatch._auto_for("cuda") == "triton"
    assert _dispatch._auto_for("cpu") in ("cpu", "reference")
    assert _dispatch._auto_for("meta") == "reference"


def test_unsupported_inputs_fall_back_to_reference():
    x = torch.randn(0, 4, device=DEV)
    with normlab.backend("triton"):
        assert NF.layer_norm(x, (4,)).shape == (0, 4)
    assert not TB._runs(torch.zeros(3, dtype=torch.int64))
