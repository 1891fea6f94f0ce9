"""The five norms on CUDA tensors against torch's CUDA kernels, forward and backward.
Skipped where no GPU is present (CI); run on a lent GPU (see benchmarks/ and the issue notes)."""
import pytest
import torch
import torch.nn.functional as TF

import normlab
import normlab.functional as F

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

TOL = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (3e-2, 3e-2), torch.float16: (4e-3, 4e-3)}


def _run(fn, inputs, dy, dtype=None):
    """Output and input gradients of ``fn``, inputs cast to ``dtype`` (the float64 oracle)."""
    leaves = [t.detach().clone().to(dtype or t.dtype).requires_grad_() for t in inputs]
    y = fn(*leaves)
    y.backward(dy.to(y.dtype))
    return [y.detach()] + [t.grad for t in leaves]


def _compare(fn_ours, fn_torch, inputs, dy, dtype):
    """fp32: normlab matches torch. fp16/bf16: normlab is at most as far from a float64
    computation on the same rounded inputs as torch is (plus a dtype-sized slack)."""
    ours = _run(fn_ours, inputs, dy)
    if dtype == torch.float32:
        theirs = _run(fn_torch, inputs, dy)
        for a, e in zip(ours, theirs):
            torch.testing.assert_close(a, e, atol=2e-4, rtol=2e-4)
        return
    oracle = _run(fn_torch, inputs, dy, torch.float64)
    theirs = _run(fn_torch, [t if t.dtype == dtype else t.to(dtype) for t in inputs], dy)
    slack = TOL[dtype][0]
    for i, (a, t, o) in enumerate(zip(ours, theirs, oracle)):
        err_ours = (a.double() - o).abs().max().item()
        err_torch = (t.double() - o).abs().max().item()
        scale = o.abs().max().item() + 1
        assert err_ours <= 1.01 * err_torch + slack * scale, (i, err_ours, err_torch)


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("norm", ["batch_norm", "batch_norm_eval", "instance_norm", "group_norm"])
def test_channel_norms_cuda(norm, layout, dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = (torch.randn(8, 32, 14, 14, device="cuda", generator=g) * 2 + 1).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(32, device="cuda", generator=g).to(dtype)
    b = torch.randn(32, device="cuda", generator=g).to(dtype)
    dy = torch.randn(x.shape, device="cuda", generator=g).to(dtype)
    rm = torch.randn(32, device="cuda", generator=g)
    rv = torch.rand(32, device="cuda", generator=g) + 0.5

    def make(F_):
        def fn(x, w, b):
            r = (rm.clone().to(x.dtype), rv.clone().to(x.dtype))
            if norm == "batch_norm":
                return F_.batch_norm(x, *r, w, b, True, 0.1, 1e-5)
            if norm == "batch_norm_eval":
                return F_.batch_norm(x, *r, w, b, False, 0.1, 1e-5)
            if norm == "instance_norm":
                return F_.instance_norm(x, None, None, w, b)
            return F_.group_norm(x, 4, w, b)
        return fn

    _compare(make(F), make(TF), [x, w, b], dy, dtype)
    y = make(F)(x, w, b)
    assert y.dtype == dtype and y.device.type == "cuda"


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("width", [1024, 4096, 65536])
@pytest.mark.parametrize("norm", ["layer_norm", "rms_norm"])
def test_row_norms_cuda(norm, width, dtype):
    g = torch.Generator(device="cuda").manual_seed(1)
    x = (torch.randn(64, width, device="cuda", generator=g) * 3 + 0.5).to(dtype)
    w = torch.randn(width, device="cuda", generator=g).to(dtype)
    b = torch.randn(width, device="cuda", generator=g).to(dtype)
    dy = torch.randn(x.shape, device="cuda", generator=g).to(dtype)

    def make(F_):
        if norm == "layer_norm":
            return lambda x, w, b: F_.layer_norm(x, [width], w, b)
        return lambda x, w: F_.rms_norm(x, [width], w)

    _compare(make(F), make(TF), [x, w, b] if norm == "layer_norm" else [x, w], dy, dtype)


@pytest.mark.parametrize("norm", ["batch_norm", "instance_norm"])
def test_running_stats_cuda(norm):
    g = torch.Generator(device="cuda").manual_seed(2)
    x = torch.randn(8, 16, 10, 10, device="cuda", generator=g) * 2 + 3
    buffers = []
    for F_ in (F, TF):
        rm, rv = torch.zeros(16, device="cuda"), torch.ones(16, device="cuda")
        for step in range(3):
            getattr(F_, norm)(x + step, rm, rv, None, None, True, 0.3, 1e-5)
        buffers.append((rm, rv))
    for a, e in zip(*buffers):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-5)


def test_patch_keeps_device_cuda():
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3), torch.nn.BatchNorm2d(16), torch.nn.GroupNorm(4, 16)
    ).cuda()
    x = torch.randn(4, 3, 16, 16, device="cuda")
    expected = model(x)
    normlab.patch(model)
    assert isinstance(model[1], normlab.nn.BatchNorm2d)
    assert model[1].running_mean.device.type == "cuda"
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
