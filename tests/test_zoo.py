"""The normalization zoo (normlab.nn.zoo) against float64 references written from the papers.

Every reference is the paper's formula, written naively in float64 and differentiated by
autograd; inputs are 3 + 2 * randn (not zero-mean), so a missing centring or a variance used in
place of a mean square shows. Closed-form equivalences (BatchRenorm with r_max=1, d_max=0 is
BatchNorm, ...) are checked against torch's own modules.
"""
from __future__ import annotations

import math
import pickle

import pytest
import torch
import torch.nn.functional as TF

from normlab._errors import ArgumentError, DTypeError, ShapeError
from normlab.nn.zoo import (
    TLU, AdaIN, BatchRenorm1d, BatchRenorm2d, DyT, FilterResponseNorm2d, GhostBatchNorm1d,
    GhostBatchNorm2d, LayerNorm2d, PartialRMSNorm, WSConv2d, adaptive_instance_norm,
)

TOL = {torch.float64: dict(atol=1e-9, rtol=1e-9), torch.float32: dict(atol=2e-4, rtol=2e-4),
       torch.bfloat16: dict(atol=6e-2, rtol=3e-2)}


def data(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return 3 + 2 * torch.randn(*shape, generator=g, dtype=torch.float64)


def randomize(m: torch.nn.Module, seed=1) -> torch.nn.Module:
    """Parameters away from their ones/zeros initialization, so a misplaced one shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_((1 if "weight" in name else 0) + 0.5 * torch.randn(p.shape, generator=g))
    return m


def close(actual, expected, dtype, what="output"):
    torch.testing.assert_close(actual.double(), expected.double(), **TOL[dtype],
                               msg=lambda m: f"{what} ({dtype}): {m}")


def compare(m, ref, inputs64, dtype, grads=True):
    """``m(*inputs)`` in ``dtype`` against ``ref(params64, *inputs64)``, and their gradients
    with respect to every input and parameter for one random upstream gradient."""
    if dtype == torch.float64:
        m = m.double()
    names = [n for n, p in m.named_parameters() if p.requires_grad]
    params = [dict(m.named_parameters())[n] for n in names]
    p64 = {n: p.detach().double().requires_grad_() for n, p in zip(names, params)}
    xs = [x.detach().to(dtype).requires_grad_() for x in inputs64]
    xs64 = [x.detach().to(dtype).double().requires_grad_() for x in inputs64]
    y, yr = m(*xs), ref(p64, *xs64)
    assert y.dtype == dtype and y.shape == yr.shape
    close(y, yr, dtype)
    if not grads:
        return y
    g = torch.randn(yr.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    got = torch.autograd.grad(y, xs + params, g.to(dtype), allow_unused=True)
    want = torch.autograd.grad(yr, xs64 + list(p64.values()), g, allow_unused=True)
    labels = [f"grad input {i}" for i in range(len(xs))] + [f"grad {n}" for n in names]
    for a, b, label in zip(got, want, labels):
        if b is None:
            assert a is None or a.abs().max() == 0, label
        else:
            close(a, b, dtype, label)
    return y


def pc(t, ndim):  # per-channel (C,) -> broadcastable against (N, C, *)
    return t.reshape((1, -1) + (1,) * (ndim - 2))


FLOATS = [torch.float32, torch.float64]

# --- references from the papers (float64, autograd)


def ref_layer_norm2d(p, x, eps=1e-6):
    mu = x.mean(1, keepdim=True)
    var = (x - mu).square().mean(1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * pc(p["weight"], x.dim()) + pc(p["bias"], x.dim())


def batch_moments(x):
    dims = [0] + list(range(2, x.dim()))
    mu = x.mean(dims, keepdim=True)
    return mu, (x - mu).square().mean(dims, keepdim=True)


def ref_renorm(p, x, rm, rv, eps, r_max, d_max):
    mu_b, var_b = batch_moments(x)
    sigma_b = torch.sqrt(var_b + eps)
    sigma = torch.sqrt(pc(rv, x.dim()) + eps)
    r = (sigma_b / sigma).clamp(1 / r_max, r_max).detach()
    d = ((mu_b - pc(rm, x.dim())) / sigma).clamp(-d_max, d_max).detach()
    y = ((x - mu_b) / sigma_b * r + d) * pc(p["weight"], x.dim())
    return y + pc(p["bias"], x.dim()) if "bias" in p else y


def running_update(rm, rv, x, momentum):
    mu_b, var_b = batch_moments(x.detach())
    n = x.numel() // x.shape[1]
    return ((1 - momentum) * rm + momentum * mu_b.flatten(),
            (1 - momentum) * rv + momentum * var_b.flatten() * n / (n - 1))


def ref_bn_train(p, x, eps=1e-5):
    mu, var = batch_moments(x)
    return (x - mu) / torch.sqrt(var + eps) * pc(p["weight"], x.dim()) + pc(p["bias"], x.dim())


def ref_frn(p, x, eps, tlu=True):
    nu2 = x.square().mean((2, 3), keepdim=True)
    e = p["eps"].abs() if "eps" in p else abs(eps)
    y = x * torch.rsqrt(nu2 + e) * pc(p["weight"], 4) + pc(p["bias"], 4)
    return torch.max(y, pc(p["tau"], 4)) if tlu else y


def ref_adain(content, style, eps, unbiased=False):
    def stats(t):
        f = t.flatten(2)
        return f.mean(2), torch.sqrt(f.var(2, unbiased=unbiased) + eps)

    (mc, sc), (ms, ss) = stats(content), stats(style)
    d = content.dim()
    return pc_ns(ss, d) * (content - pc_ns(mc, d)) / pc_ns(sc, d) + pc_ns(ms, d)


def pc_ns(t, ndim):  # (N, C) statistics -> broadcastable against (N, C, *)
    return t.reshape(t.shape + (1,) * (ndim - 2))


def ref_prms(p, x, nshape, prob, eps):
    d = math.prod(nshape)
    k = math.ceil(round(prob * d, 9))
    flat = x.reshape(x.shape[: x.dim() - len(nshape)] + (d,))
    rms = torch.sqrt(flat[..., :k].square().mean(-1, keepdim=True) + eps)
    return (flat / rms * p["weight"].reshape(d)).reshape(x.shape)


# --- 1. LayerNorm2d


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape", [(2, 5, 3, 4), (3, 7, 1, 6), (2, 4, 5), (2, 3, 2, 2, 3)])
def test_layer_norm2d_matches_reference(shape, dtype):
    m = randomize(LayerNorm2d(shape[1]))
    compare(m, ref_layer_norm2d, [data(*shape)], dtype)


def test_layer_norm2d_bf16_channels_last_and_torch_equivalence():
    m = randomize(LayerNorm2d(6))
    x = data(3, 6, 4, 5).float()
    torch_ln = torch.nn.LayerNorm(6, eps=1e-6)
    torch_ln.load_state_dict(m.state_dict())  # same keys
    want = torch_ln(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    y = m(x)
    assert y.is_contiguous()
    close(y, want, torch.float32)
    xcl = x.to(memory_format=torch.channels_last)
    ycl = m(xcl)
    assert ycl.is_contiguous(memory_format=torch.channels_last)
    close(ycl, want, torch.float32)
    p64 = {k: v.detach().double() for k, v in m.named_parameters()}
    xb = x.bfloat16()
    yb = m(xb)
    assert yb.dtype == torch.bfloat16
    close(yb, ref_layer_norm2d(p64, xb.double()), torch.bfloat16)


# --- 2. BatchRenorm


def renorm_case(cls, shape, dtype, r_max, d_max, momentum=0.01, seed=0):
    m = randomize(cls(shape[1], r_max=r_max, d_max=d_max, momentum=momentum))
    g = torch.Generator().manual_seed(seed + 3)
    with torch.no_grad():  # running statistics far enough from the batch's to clip some r, d
        m.running_mean.copy_(3 + 2 * torch.randn(shape[1], generator=g))
        m.running_var.copy_(torch.rand(shape[1], generator=g) * 8 + 0.5)
    return m


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("cls,shape", [(BatchRenorm1d, (16, 5)), (BatchRenorm1d, (4, 3, 7)),
                                       (BatchRenorm2d, (4, 6, 3, 5))])
def test_batch_renorm_training_matches_paper(cls, shape, dtype):
    r_max, d_max, eps = 1.5, 0.5, 1e-5
    m = renorm_case(cls, shape, dtype, r_max, d_max)
    rm, rv = m.running_mean.double().clone(), m.running_var.double().clone()
    x = data(*shape)
    compare(m, lambda p, x: ref_renorm(p, x, rm, rv, eps, r_max, d_max), [x], dtype)
    # the running statistics move towards the batch's, torch's way (variance unbiased)
    want_m, want_v = running_update(rm, rv, x.to(dtype).double(), 0.01)
    close(m.running_mean, want_m, dtype, "running_mean")
    close(m.running_var, want_v, dtype, "running_var")
    assert int(m.num_batches_tracked) == 1
    # clipping was active somewhere, or the test proves little
    mu_b, var_b = batch_moments(x)
    sigma = torch.sqrt(rv + eps)
    r = torch.sqrt(var_b.flatten() + eps) / sigma
    d = (mu_b.flatten() - rm) / sigma
    assert ((r > r_max) | (r < 1 / r_max)).any() or (d.abs() > d_max).any()


def test_batch_renorm_without_correction_is_batch_norm_and_eval_is_batch_norm_eval():
    x = data(6, 4, 3, 3).float()
    m = randomize(BatchRenorm2d(4, r_max=1.0, d_max=0.0, momentum=0.1))
    bn = torch.nn.BatchNorm2d(4)
    bn.load_state_dict(m.state_dict())  # BatchNorm's state_dict, strict
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = m(xa), bn(xb)
    close(ya, yb, torch.float32)
    ya.square().sum().backward()
    yb.square().sum().backward()
    close(xa.grad, xb.grad, torch.float32, "grad input")
    close(m.weight.grad, bn.weight.grad, torch.float32, "grad weight")
    close(m.running_var, bn.running_var, torch.float32, "running_var")
    m.eval(), bn.eval()
    m.r_max, m.d_max = 3.0, 5.0  # no effect in eval
    close(m(x), bn(x), torch.float32)
    # a BatchNorm checkpoint loads, and round-trips
    m2 = BatchRenorm2d(4)
    m2.load_state_dict(bn.state_dict())
    assert set(m2.state_dict()) == set(bn.state_dict())
    assert "r_max=3.0, d_max=5.0" in repr(m2)


def test_batch_renorm_without_bias():
    m = renorm_case(BatchRenorm1d, (8, 3), torch.float64, 1.5, 0.5)
    b = BatchRenorm1d(3, r_max=1.5, d_max=0.5, bias=False).double()
    b.load_state_dict({k: v for k, v in m.state_dict().items() if k != "bias"})
    assert b.bias is None
    rm, rv = b.running_mean.clone(), b.running_var.clone()
    compare(b, lambda p, x: ref_renorm(p, x, rm, rv, 1e-5, 1.5, 0.5), [data(8, 3)],
            torch.float64)


def test_batch_renorm_cumulative_momentum_and_bf16_channels_last():
    m = BatchRenorm2d(3, momentum=None, r_max=1.0, d_max=0.0)
    x1, x2 = data(4, 3, 2, 2, seed=1).float(), data(4, 3, 2, 2, seed=2).float()
    m(x1), m(x2)
    close(m.running_mean, (x1.mean((0, 2, 3)) + x2.mean((0, 2, 3))) / 2, torch.float32)
    m = renorm_case(BatchRenorm2d, (4, 3, 5, 5), torch.bfloat16, 2.0, 1.0)
    rm, rv = m.running_mean.double().clone(), m.running_var.double().clone()
    x = data(4, 3, 5, 5).bfloat16().to(memory_format=torch.channels_last)
    y = m(x)
    assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=torch.channels_last)
    p64 = {k: v.detach().double() for k, v in m.named_parameters()}
    close(y, ref_renorm(p64, x.double(), rm, rv, 1e-5, 2.0, 1.0), torch.bfloat16)


# --- 3. GhostBatchNorm


def ref_ghost(p, x, vbs, rm, rv, momentum, eps=1e-5):
    outs = []
    for chunk in x.split(vbs):
        outs.append(ref_bn_train(p, chunk, eps))
        rm, rv = running_update(rm, rv, chunk, momentum)
    return torch.cat(outs), rm, rv


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("cls,shape,vbs", [(GhostBatchNorm1d, (11, 4), 4),
                                           (GhostBatchNorm1d, (7, 3, 5), 3),
                                           (GhostBatchNorm2d, (10, 3, 2, 3), 4)])
def test_ghost_batch_norm_matches_sequential_virtual_batches(cls, shape, vbs, dtype):
    m = randomize(cls(shape[1], vbs, momentum=0.2))
    x = data(*shape)
    rm0, rv0 = torch.zeros(shape[1], dtype=torch.float64), torch.ones(shape[1], dtype=torch.float64)
    compare(m, lambda p, x: ref_ghost(p, x, vbs, rm0, rv0, 0.2)[0], [x], dtype)
    _, rm, rv = ref_ghost({"weight": m.weight.double(), "bias": m.bias.double()},
                          x.to(dtype).double(), vbs, rm0, rv0, 0.2)
    close(m.running_mean, rm, dtype, "running_mean")
    close(m.running_var, rv, dtype, "running_var")
    assert int(m.num_batches_tracked) == math.ceil(shape[0] / vbs)  # one step per virtual batch


def test_ghost_batch_norm_large_virtual_batch_is_batch_norm():
    x = data(6, 4, 3, 3).float().to(memory_format=torch.channels_last)
    m = randomize(GhostBatchNorm2d(4, virtual_batch_size=6))
    bn = torch.nn.BatchNorm2d(4)
    bn.load_state_dict(m.state_dict())
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = m(xa), bn(xb)
    assert ya.is_contiguous(memory_format=torch.channels_last)
    close(ya, yb, torch.float32)
    (ya * x).sum().backward()
    (yb * x).sum().backward()
    close(xa.grad, xb.grad, torch.float32, "grad input")
    close(m.running_var, bn.running_var, torch.float32)
    m.eval(), bn.eval()
    close(m(data(3, 4, 2, 2).float()), bn(data(3, 4, 2, 2).float()), torch.float32)
    # channels_last survives the concatenation of several virtual batches too
    m.train()
    y = GhostBatchNorm2d(4, 4)(data(10, 4, 2, 2).float().to(memory_format=torch.channels_last))
    assert y.is_contiguous(memory_format=torch.channels_last)
    # without running statistics, eval uses the virtual batches like training
    m = GhostBatchNorm1d(2, 2, affine=False, track_running_stats=False).eval()
    close(m(torch.tensor([[1., 0.], [3., 4.], [10., 0.], [20., 2.]])),
          torch.tensor([[-1., -1.], [1., 1.], [-1., -1.], [1., 1.]]), torch.bfloat16)


def test_ghost_batch_norm_bf16():
    m = randomize(GhostBatchNorm2d(3, 4))
    x = data(9, 3, 3, 3).bfloat16()
    y = m(x)
    assert y.dtype == torch.bfloat16
    p64 = {k: v.detach().double() for k, v in m.named_parameters()}
    close(y, ref_ghost(p64, x.double(), 4, torch.zeros(3), torch.ones(3), 0.1)[0], torch.bfloat16)


# --- 4. WSConv2d


def ref_ws_conv(p, x, eps=1e-6, **conv):
    w = p["weight"]
    flat = w.flatten(1)
    mu = flat.mean(1, keepdim=True)
    var = (flat - mu).square().mean(1, keepdim=True)
    w_hat = ((flat - mu) / torch.sqrt(var + eps)).reshape(w.shape)
    return TF.conv2d(x, w_hat, p.get("bias"), **conv)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("groups,bias", [(1, True), (2, False)])
def test_ws_conv2d_matches_reference(groups, bias, dtype):
    m = WSConv2d(4, 6, 3, padding=1, groups=groups, bias=bias)
    with torch.no_grad():
        m.weight.add_(0.3)  # a filter mean far from 0
    compare(m, lambda p, x: ref_ws_conv(p, x, padding=1, groups=groups), [data(2, 4, 5, 6)],
            dtype)
    w = m.standardized_weight().flatten(1).double()
    var = m.weight.detach().flatten(1).double().var(1, unbiased=False)
    close(w.mean(1), torch.zeros(6), torch.float32)
    close(w.var(1, unbiased=False), var / (var + m.eps), torch.float32)


def test_ws_conv2d_gradcheck_and_state_dict():
    m = WSConv2d(2, 3, (2, 1)).double()
    x, w = data(1, 2, 3, 2).requires_grad_(), m.weight.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x, w: torch.func.functional_call(m, {"weight": w, "bias": m.bias}, (x,)), (x, w))
    conv = torch.nn.Conv2d(2, 3, (2, 1)).double()
    conv.load_state_dict(m.state_dict())  # a Conv2d's state_dict, strict
    assert "eps=1e-06" in repr(m)


# --- 5. FilterResponseNorm2d and TLU


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("tlu,learnable,shape", [(True, False, (2, 5, 4, 3)),
                                                 (False, False, (3, 2, 1, 7)),
                                                 (True, True, (2, 3, 3, 3)),
                                                 (True, True, (4, 3, 1, 1))])
def test_filter_response_norm_matches_reference(tlu, learnable, shape, dtype):
    eps = 1e-6 if not learnable else 0.3
    m = randomize(FilterResponseNorm2d(shape[1], eps=eps, learnable_eps=learnable, tlu=tlu))
    if learnable:
        with torch.no_grad():
            m.eps.fill_(-0.3)  # |eps| is used
    compare(m, lambda p, x: ref_frn(p, x, eps, tlu), [data(*shape)], dtype)


def test_filter_response_norm_channels_last_bf16_and_tlu():
    m = randomize(FilterResponseNorm2d(4))
    x = data(2, 4, 5, 5).float()
    p64 = {k: v.detach().double() for k, v in m.named_parameters()}
    ycl = m(x.to(memory_format=torch.channels_last))
    assert ycl.is_contiguous(memory_format=torch.channels_last)
    close(ycl, ref_frn(p64, x.double(), 1e-6), torch.float32)
    yb = m(x.bfloat16())
    assert yb.dtype == torch.bfloat16
    close(yb, ref_frn(p64, x.bfloat16().double(), 1e-6), torch.bfloat16)
    # FRN then TLU as separate modules is the fused layer
    plain, tlu = FilterResponseNorm2d(4, tlu=False), TLU(4)
    plain.load_state_dict({k: v for k, v in m.state_dict().items() if k != "tau"})
    tlu.tau.data.copy_(m.tau)
    close(tlu(plain(x)), m(x), torch.float32)
    t = randomize(TLU(3))
    compare(t, lambda p, x: torch.max(x, pc(p["tau"], 3)), [data(2, 3, 4) - 3], torch.float64)


def test_filter_response_norm_gradcheck_learnable_eps():
    m = FilterResponseNorm2d(2, eps=0.1, learnable_eps=True).double()
    randomize(m)
    x = data(1, 2, 2, 2).requires_grad_()
    assert torch.autograd.gradcheck(m, (x,))
    assert "eps" in m.state_dict()


# --- 6. DyT


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("channels_last,shape", [(True, (2, 3, 8)), (False, (2, 8, 3, 2))])
def test_dyt_matches_reference(channels_last, shape, dtype):
    m = randomize(DyT(8, alpha_init=0.7, channels_last=channels_last))

    def ref(p, x):
        w, b = (p["weight"], p["bias"]) if channels_last else (pc(p["weight"], x.dim()),
                                                               pc(p["bias"], x.dim()))
        return w * torch.tanh(p["alpha"] * x) + b

    compare(m, ref, [data(*shape) / 3], dtype)
    yb = m(data(*shape).bfloat16())
    assert yb.dtype == torch.bfloat16
    assert set(m.state_dict()) == {"alpha", "weight", "bias"}  # the authors' DynamicTanh names


# --- 7. AdaIN


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("unbiased", [False, True])
@pytest.mark.parametrize("cshape,sshape", [((2, 3, 4, 5), (2, 3, 3, 3)),
                                           ((3, 4, 6), (1, 4, 5)), ((2, 3, 2, 2, 2), (2, 3, 7))])
def test_adain_matches_reference(cshape, sshape, unbiased, dtype):
    content, style = data(*cshape), 2 * data(*sshape, seed=5) - 1
    compare(AdaIN(eps=1e-3, unbiased=unbiased),
            lambda p, c, s: ref_adain(c, s, 1e-3, unbiased), [content, style], dtype)


def test_adain_identity_channels_last_bf16_and_gradcheck():
    x = data(2, 3, 4, 4).float()
    close(adaptive_instance_norm(x, x), x, torch.float32)
    close(AdaIN(unbiased=True)(x, x), x, torch.float32)
    s = data(2, 3, 5, 5, seed=3).float()
    y = adaptive_instance_norm(x.to(memory_format=torch.channels_last), s)
    assert y.is_contiguous(memory_format=torch.channels_last)
    close(y, ref_adain(x.double(), s.double(), 1e-5), torch.float32)
    yb = adaptive_instance_norm(x.bfloat16(), s.bfloat16())
    assert yb.dtype == torch.bfloat16
    close(yb, ref_adain(x.bfloat16().double(), s.bfloat16().double(), 1e-5), torch.bfloat16)
    c, st = data(1, 2, 3).requires_grad_(), data(1, 2, 4, seed=2).requires_grad_()
    assert torch.autograd.gradcheck(lambda c, s: adaptive_instance_norm(c, s, 1e-2), (c, st))


# --- 8. PartialRMSNorm


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("nshape,prob,lead", [((16,), 0.25, (3,)), ((4, 6), 0.3, (2, 2)),
                                              ((40,), 0.0625, ()), ((7,), 0.5, (2, 3))])
def test_partial_rms_norm_matches_reference(nshape, prob, lead, dtype):
    eps = 1e-6
    m = randomize(PartialRMSNorm(nshape, p=prob, eps=eps))
    compare(m, lambda p, x: ref_prms(p, x, nshape, prob, eps), [data(*lead, *nshape)], dtype)


def test_partial_rms_norm_p1_is_rms_norm_and_sizes_and_state_dict():
    x = data(3, 10).float()
    m = randomize(PartialRMSNorm(10, p=1.0))
    rms = torch.nn.RMSNorm(10)
    rms.load_state_dict(m.state_dict())  # an RMSNorm checkpoint, strict
    close(m(x), rms(x), torch.float32)
    assert PartialRMSNorm(10, p=0.3).partial_size == 3  # not 4 from 0.3 * 10 = 3.0000000000000004
    assert PartialRMSNorm(512).partial_size == 32
    assert PartialRMSNorm(3, p=0.01).partial_size == 1
    assert "p=0.3" in repr(PartialRMSNorm(10, p=0.3))
    yb = PartialRMSNorm(16, p=0.25)(x.repeat(1, 2)[:, :16].bfloat16())
    assert yb.dtype == torch.bfloat16
    m = PartialRMSNorm((2, 3), p=0.5).double()
    randomize(m)
    assert torch.autograd.gradcheck(m, (data(2, 2, 3).requires_grad_(),))


# --- every module: state_dict round trip, train == eval where stateless, errors


FACTORIES = {
    "LayerNorm2d": (lambda: LayerNorm2d(3), (2, 3, 4, 4)),
    "BatchRenorm1d": (lambda: BatchRenorm1d(3), (4, 3)),
    "BatchRenorm2d": (lambda: BatchRenorm2d(3), (4, 3, 2, 2)),
    "GhostBatchNorm1d": (lambda: GhostBatchNorm1d(3, 2), (4, 3, 5)),
    "GhostBatchNorm2d": (lambda: GhostBatchNorm2d(3, 2), (4, 3, 2, 2)),
    "WSConv2d": (lambda: WSConv2d(3, 2, 3), (2, 3, 4, 4)),
    "FilterResponseNorm2d": (lambda: FilterResponseNorm2d(3, learnable_eps=True), (2, 3, 4, 4)),
    "TLU": (lambda: TLU(3), (2, 3, 4)),
    "DyT": (lambda: DyT(3, channels_last=False), (2, 3, 4)),
    "PartialRMSNorm": (lambda: PartialRMSNorm(8, p=0.5), (2, 8)),
}


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_state_dict_round_trip(name):
    make, shape = FACTORIES[name]
    a = randomize(make())
    a(data(*shape).float())  # moves running statistics
    a.eval()
    b = make()
    b.load_state_dict(a.state_dict())  # strict
    b.eval()
    x = data(*shape, seed=4).float()
    close(b(x), a(x), torch.float32)


@pytest.mark.parametrize("name", sorted(FACTORIES) + ["AdaIN"])
def test_whole_module_pickles(name):
    """pickle finds each class by its module and name, and the copy computes what the original
    does."""
    make, shape = FACTORIES.get(name, (lambda: AdaIN(), (2, 3, 4)))
    a = randomize(make())
    inputs = (data(*shape).float(),) * (2 if name == "AdaIN" else 1)
    a(*inputs)  # moves running statistics
    a.eval()
    b = pickle.loads(pickle.dumps(a))
    assert type(b) is type(a) and b.state_dict().keys() == a.state_dict().keys()
    x = data(*shape, seed=4).float()
    xs = (x, data(*shape, seed=5).float()) if name == "AdaIN" else (x,)
    close(b(*xs), a(*xs), torch.float32)


@pytest.mark.parametrize("name", sorted(set(FACTORIES) - {"WSConv2d"}))
def test_integer_input_is_refused(name):
    make, shape = FACTORIES[name]
    with pytest.raises(DTypeError, match="floating-point"):
        make()(torch.ones(shape, dtype=torch.int64))


@pytest.mark.parametrize("make,x,match", [
    (lambda: LayerNorm2d(4), torch.ones(2, 3, 4, 4), "expected 4 channels in dim 1"),
    (lambda: LayerNorm2d(4), torch.ones(4), "2-D or more"),
    (lambda: BatchRenorm2d(3), torch.ones(2, 3, 4), "4-D input of shape \\(N, C, H, W\\)"),
    (lambda: BatchRenorm1d(3), torch.ones(1, 3), "more than 1 value per channel"),
    (lambda: GhostBatchNorm1d(3, 2), torch.ones(2, 4), "expected 3 channels"),
    (lambda: GhostBatchNorm1d(2, 4), torch.randn(9, 2), "n % 4 != 1"),
    (lambda: FilterResponseNorm2d(3), torch.ones(2, 3, 4), "\\(N, C, H, W\\)"),
    (lambda: DyT(4), torch.ones(2, 4, 3), "channels_last=False"),
    (lambda: PartialRMSNorm(4), torch.ones(2, 5), "trailing dimensions"),
])
def test_input_errors_name_the_problem(make, x, match):
    with pytest.raises((ShapeError, ArgumentError), match=match):
        make()(x)


def test_argument_errors_name_the_problem():
    with pytest.raises(ArgumentError, match="r_max must be a number >= 1"):
        BatchRenorm2d(3, r_max=0.5)
    with pytest.raises(ArgumentError, match="d_max must be a number >= 0"):
        BatchRenorm1d(3).d_max = -1
    for bad in (1, 0, -2, 2.5, "4", True):
        with pytest.raises(ArgumentError, match="virtual_batch_size must be an integer >= 2"):
            GhostBatchNorm2d(3, bad)
    for bad in (0, 1.5, -0.1, True, None):
        with pytest.raises(ArgumentError, match="p must be a fraction in \\(0, 1\\]"):
            PartialRMSNorm(8, p=bad)
    with pytest.raises(ArgumentError, match="standardizing a single value gives 0"):
        WSConv2d(4, 4, 1, groups=4)
    x = torch.ones(2, 3, 4, 4)
    with pytest.raises(ShapeError, match="expected 3 channels in dim 1 of the style"):
        adaptive_instance_norm(x, torch.ones(2, 4, 4, 4))
    with pytest.raises(ShapeError, match="batch size 2 or 1"):
        adaptive_instance_norm(x, torch.ones(3, 3, 4, 4))
    with pytest.raises(ShapeError, match="more than 1"):
        adaptive_instance_norm(x, torch.ones(2, 3, 1, 1))
    with pytest.raises(DTypeError, match="floating-point style"):
        AdaIN()(x, torch.ones(2, 3, 4, 4, dtype=torch.int32))
