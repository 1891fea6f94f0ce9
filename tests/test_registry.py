"""The norm registry (normlab.registry): the conformance checks every registered norm gets, and
the walkthrough of adding a norm through it.

For each registered norm, on every backend that runs here, in float32/float64/bfloat16/float16
and in the layouts the norm takes (contiguous, channels_last, non-contiguous): the output and
the gradients of the input and the parameters against the float64 oracle (torch's function for
torch's five, the norm's own formula for the others), and the module against the function.
"""
from __future__ import annotations

import math
import pickle

import pytest
import torch

import normlab
from normlab import _engine as E
from normlab import registry
from normlab.lab import axes, explain

F32, F64, BF16, F16 = torch.float32, torch.float64, torch.bfloat16, torch.float16
DTYPES = [F32, F64, BF16, F16]
TOL = {F32: 2e-5, F64: 1e-10, BF16: 3e-2, F16: 4e-3}  # relative to the output's scale
LAYOUTS = ["contiguous", "channels_last", "strided"]


def _backends():
    names = [b for b in ("reference", "torch", "cpu") if b in normlab.available_backends()]
    return names + ["auto"]


def _input(spec, layout, dtype, seed):
    """A random input (mean 0.5, not zeros) of the norm's kind in ``layout``, its argument."""
    g = torch.Generator().manual_seed(seed)
    shape = (3, 6, 4, 5) if spec.input == "channels" else (3, 4, 12)
    if layout == "strided":  # every other element of the last axis: no dense layout
        x = torch.randn(*shape[:-1], 2 * shape[-1], generator=g, dtype=F64)[..., ::2]
    else:
        x = torch.randn(shape, generator=g, dtype=F64)
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
    x = (x + 0.5).to(dtype)
    arg = (12,) if spec.input == "rows" else spec.example_arg(shape, 3)
    return x, arg


def _params(spec, x, arg, dtype, seed):
    g = torch.Generator().manual_seed(seed + 1)
    shape = spec.param_shape(tuple(x.shape), arg)
    w = (torch.rand(shape, generator=g, dtype=F64) + 0.5).to(dtype)
    b = (torch.randn(shape, generator=g, dtype=F64) * 0.3).to(dtype) if spec.bias else None
    return w, b


def _oracle(spec, x, arg, w, b, eps):
    """The float64 reference: torch's function, else the norm's own formula."""
    if spec.torch_fn is not None:
        return spec.call(spec.torch_fn, x, arg, w, b, eps)
    return spec.oracle(x, arg, w, b, eps)


def check_norm(spec, backend: str, dtype: torch.dtype, layout: str, seed: int = 0) -> None:
    """The conformance check of one registered norm: forward and backward against the float64
    oracle, the output's dtype, shape and layout as torch's rule says."""
    if layout == "channels_last" and spec.input != "channels":
        layout = "strided"
    x, arg = _input(spec, layout, dtype, seed)
    w, b = _params(spec, x, arg, dtype, seed)
    eps = spec.eps if spec.eps is not None else 1e-6
    leaves = [t.detach().requires_grad_() for t in (x, w, b) if t is not None]
    xr, wr = leaves[0], leaves[1]
    br = leaves[2] if b is not None else None
    force = normlab.backend(backend) if backend != "auto" else _nothing()
    with force:
        y = spec.call(spec.fn, xr, arg, wr, br, eps)
    assert y.dtype == dtype and y.shape == x.shape
    red = spec.reduction(tuple(x.shape), arg)
    assert y.stride() == E.output_like(x, red.keeps_channels_last).stride()
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed + 2),
                     dtype=F64).to(dtype)
    grads = torch.autograd.grad(y, leaves, dy)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    rb = ref_leaves[2] if b is not None else None
    ref = _oracle(spec, ref_leaves[0], arg, ref_leaves[1], rb, eps)
    ref_grads = torch.autograd.grad(ref, ref_leaves, dy.double())
    what = f"{spec.name} {backend} {dtype} {layout}"
    for name, got, want in [("output", y, ref)] + list(zip(("dx", "dweight", "dbias"), grads,
                                                          ref_grads)):
        scale = want.abs().max().item() or 1.0
        err = (got.double() - want).abs().max().item() / scale
        assert err < TOL[dtype] * (4 if name != "output" else 1), f"{what} {name}: {err:.2e}"


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


CASES = [(n, b, d, lay) for n in registry.names() for b in _backends() for d in DTYPES
         for lay in LAYOUTS
         if not (lay == "channels_last" and registry.get(n).input == "rows")]


@pytest.mark.parametrize("name, backend, dtype, layout", CASES,
                         ids=[f"{n}-{b}-{str(d)[6:]}-{lay}" for n, b, d, lay in CASES])
def test_every_registered_norm_conforms(name, backend, dtype, layout):
    check_norm(registry.get(name), backend, dtype, layout, seed=len(name) + len(layout))


@pytest.mark.parametrize("name", registry.names())
def test_module_computes_the_function_and_has_torchs_keys(name):
    spec = registry.get(name)
    x, arg = _input(spec, "contiguous", F32, 3)
    for theirs, ours in spec.modules:
        if spec.input == "rows":
            m = ours(arg)
        elif spec.arg == "num_groups":
            m = ours(arg, x.shape[1])
        else:
            m = ours(x.shape[1])
        x_ = x if ours.__name__[-2:] != "1d" else x.flatten(2)
        x_ = x_ if ours.__name__[-2:] != "3d" else x[..., None]
        with torch.no_grad():
            for p in m.parameters():
                p.copy_(torch.rand_like(p) + 0.5)
        m.train()
        y = m(x_)
        want = spec.call(spec.fn, x_, arg, m.weight, getattr(m, "bias", None),
                         m.eps if m.eps is not None else spec.eps)
        torch.testing.assert_close(y, want)
        if theirs is not None:
            assert list(m.state_dict()) == list(theirs(*(m.normalized_shape,) if spec.input == "rows"
                                                     else (x.shape[1],) if spec.arg is None
                                                     else (arg, x.shape[1])).state_dict())
        assert type(pickle.loads(pickle.dumps(m))) is ours


def test_every_spelling_finds_the_norm_and_unknown_names_are_refused():
    assert registry.get("LN") is registry.get("layer_norm") is registry.get("LayerNorm")
    assert registry.get("group-norm") is registry.get("GN")
    with pytest.raises(ValueError, match="unknown norm 'no_norm'; known: batch_norm"):
        registry.get("no_norm")
    with pytest.raises(ValueError, match="taken"):
        registry.register(registry.get("layer_norm"))


def test_patch_and_swap_norms_read_the_registry():
    from normlab._patch import TWINS
    from normlab.tools._common import spec_of

    pairs = {t: o for s in registry.norms() for t, o in s.modules if t is not None}
    assert TWINS == pairs and len(pairs) == 9
    assert spec_of(torch.nn.SyncBatchNorm).name == "batch_norm"
    assert spec_of(normlab.nn.LayerNorm2d).name == "layer_norm"
    assert spec_of(torch.nn.Linear) is None


# --- the walkthrough: a new norm through the registry, in one declaration
#
# PixelNorm (Karras et al., 2018, "Progressive Growing of GANs"): each pixel's feature vector
# divided by its root mean square over the channels, y = g x / sqrt(mean_c x^2 + eps), here
# with a per-channel g. The statistic is a reduction over axis 1 of (N, C, *): the engine's
# Reduction says so, and everything else follows.


def pixel_reduction(shape: tuple[int, ...]) -> E.Reduction:
    """PixelNorm: one mean square per (sample, position), over the channels."""
    return E.Reduction(tuple(shape), (1,), E.per_channel(shape), centered=False)


def pixel_oracle(x, arg, weight, bias, eps):
    y = x * torch.rsqrt(x.square().mean(1, keepdim=True) + eps)
    return y if weight is None else y * weight.reshape(E.per_channel(x.shape))


def test_a_new_norm_through_the_registry(tmp_path):
    spec = registry.declare("pixel_norm", "PixelNorm", pixel_reduction, lambda shape, arg: {},
                            input="channels", params="channel", bias=False, eps=1e-8,
                            oracle=pixel_oracle, aliases=("PN",), where=__name__)
    try:
        pixel_norm, PixelNorm = spec.fn, spec.classes[0]
        # the function, on every backend (the fused ones fall back to the engine), every
        # dtype and layout: the conformance check every registered norm gets
        for backend in _backends():
            for dtype in DTYPES:
                for layout in LAYOUTS:
                    check_norm(spec, backend, dtype, layout)
        assert ("pixel_norm", "conforms") and "pixel_norm" in registry.names()
        # the module: parameters, state_dict, train/eval alike, bad input named
        m = PixelNorm(6)
        assert list(m.state_dict()) == ["weight"] and m.weight.shape == (6,)
        x = torch.randn(2, 6, 3, 3)
        torch.testing.assert_close(m(x), pixel_oracle(x, None, m.weight, None, 1e-8))
        with pytest.raises(normlab.ShapeError, match="pixel_norm"):
            m(torch.randn(2, 5, 3, 3))
        with pytest.raises(normlab.DTypeError, match="pixel_norm"):
            pixel_norm(torch.ones(2, 6, dtype=torch.int64))
        # torch.func sees the oracle (plain torch ops): vmap and forward AD work
        xs = torch.randn(4, 2, 6, 3)
        torch.testing.assert_close(torch.func.vmap(pixel_norm)(xs),
                                   pixel_oracle(xs.flatten(0, 1), None, None, None, 1e-8)
                                   .reshape(xs.shape))
        # the axes figure and `normlab explain` read the registry
        d = axes.describe("PN")
        assert d.words() == "one statistic per (N, H, W), over C"
        assert d.statistics == 4 * 2 * 3
        text = explain.explain("pixel_norm", tmp_path)
        assert "pixel_reduction((4, 6, 2, 3))" in text and "MISMATCH" not in text
        pytest.importorskip("matplotlib")
        assert axes.draw(tmp_path / "pixel.png", names=("pixelnorm",)).stat().st_size > 0
        # swap_norms builds it in place of a BatchNorm
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 1), torch.nn.BatchNorm2d(6))
        normlab.swap_norms(model, PixelNorm)
        assert type(model[1]) is PixelNorm and model[1].weight.shape == (6,)
    finally:
        registry.unregister("pixel_norm")
    assert "pixel_norm" not in registry.names()


def test_the_engine_clamped_and_summed_statistics_have_the_exact_gradient():
    """``averaged=False`` (an L2 norm) and ``clamp_eps`` (max(norm, eps)): ScaleNorm's
    statistic; gradcheck in float64, including sets below eps."""
    red = E.Reduction((3, 5), (1,), (1, 1), centered=False, averaged=False, clamp_eps=True)
    x = torch.randn(3, 5, dtype=F64)
    x[1] *= 1e-3  # norm below eps = 0.1: rstd is the constant 1 / eps there
    w = torch.tensor([1.7], dtype=F64)
    fn = lambda x, w: E.normalize(x, red, w, eps=0.1)[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x.requires_grad_(), w.requires_grad_()))
    assert torch.autograd.gradgradcheck(fn, (x, w))
    y = fn(x, w).detach()
    norms = x.detach().norm(dim=1, keepdim=True)
    torch.testing.assert_close(y, 1.7 * x.detach() / norms.clamp_min(0.1))
    assert math.isclose(y[1].norm().item(), 1.7 * norms[1].item() / 0.1, rel_tol=1e-12)
