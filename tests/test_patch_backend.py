"""``normlab.patch`` on look-alikes of real models, and the ``normlab.backend`` context manager.

The models are small inline imitations of torchvision's ResNet, timm's ConvNeXt / ViT blocks and
a Hugging Face decoder (torchvision/timm/transformers are deliberately not dependencies).
"""
from __future__ import annotations

import copy
import threading

import pytest
import torch
import torch.nn as tnn
import torch.nn.functional as TF
from torch.testing import assert_close

import normlab
import normlab.functional as NF
import normlab.nn as nlnn

TOL = dict(atol=1e-5, rtol=1e-5)
EXACT_TORCH_NORMS = (tnn.BatchNorm1d, tnn.BatchNorm2d, tnn.BatchNorm3d, tnn.LayerNorm, tnn.GroupNorm,
                     tnn.InstanceNorm1d, tnn.InstanceNorm2d, tnn.InstanceNorm3d, tnn.RMSNorm)


def twin(torch_cls: type) -> type:
    return getattr(nlnn, torch_cls.__name__)


# --------------------------------------------------------------------------------------------
# Look-alike models
# --------------------------------------------------------------------------------------------
class BasicBlock(tnn.Module):
    """torchvision.models.resnet.BasicBlock: norms as attributes, downsample a Sequential."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = tnn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = tnn.BatchNorm2d(cout)
        self.relu = tnn.ReLU(inplace=True)
        self.conv2 = tnn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = tnn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = tnn.Sequential(tnn.Conv2d(cin, cout, 1, stride, bias=False), tnn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class TinyResNet(tnn.Module):
    def __init__(self):
        super().__init__()
        self.stem = tnn.Sequential(tnn.Conv2d(3, 8, 3, padding=1, bias=False), tnn.BatchNorm2d(8), tnn.ReLU(inplace=True))
        self.layer1 = tnn.Sequential(BasicBlock(8, 8), BasicBlock(8, 16, stride=2))
        self.pool = tnn.AdaptiveAvgPool2d(1)
        self.fc = tnn.Linear(16, 6)
        self.head_bn = tnn.BatchNorm1d(6, momentum=None)

    def forward(self, x):
        x = self.layer1(self.stem(x))
        return self.head_bn(self.fc(torch.flatten(self.pool(x), 1)))


class LayerNorm2d(tnn.LayerNorm):
    """timm.layers.LayerNorm2d: a user subclass with its own (channels-first) forward."""

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = TF.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class ConvNeXtBlock(tnn.Module):
    def __init__(self, dim):
        super().__init__()
        self.conv_dw = tnn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = tnn.LayerNorm(dim, eps=1e-6)
        self.mlp = tnn.Sequential(tnn.Linear(dim, 2 * dim), tnn.GELU(), tnn.Linear(2 * dim, dim))
        self.gamma = tnn.Parameter(0.5 * torch.ones(dim))

    def forward(self, x):
        shortcut = x
        x = self.conv_dw(x).permute(0, 2, 3, 1)
        x = self.mlp(self.norm(x)) * self.gamma
        return shortcut + x.permute(0, 3, 1, 2)


class ViTBlock(tnn.Module):
    def __init__(self, dim):
        super().__init__()
        self.norm1 = tnn.LayerNorm(dim, eps=1e-6)
        self.attn = tnn.MultiheadAttention(dim, 2, batch_first=True)
        self.norm2 = tnn.LayerNorm(dim, eps=1e-6, bias=False)
        self.mlp = tnn.Sequential(tnn.Linear(dim, 2 * dim), tnn.GELU(), tnn.Linear(2 * dim, dim))

    def forward(self, x):
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class TinyConvNeXtViT(tnn.Module):
    def __init__(self):
        super().__init__()
        self.stem = tnn.Sequential(tnn.Conv2d(3, 8, 2, stride=2), LayerNorm2d(8, eps=1e-6))
        self.stages = tnn.Sequential(ConvNeXtBlock(8), ConvNeXtBlock(8))
        self.downsample = tnn.Sequential(LayerNorm2d(8), tnn.Conv2d(8, 16, 2, stride=2))
        self.gn = tnn.GroupNorm(4, 16)
        self.blocks = tnn.ModuleDict({"vit0": ViTBlock(16), "vit1": ViTBlock(16)})
        self.norm = tnn.LayerNorm(16)
        self.head = tnn.Linear(16, 5)

    def forward(self, x):
        x = self.gn(self.downsample(self.stages(self.stem(x))))
        x = x.flatten(2).transpose(1, 2)  # (N, tokens, C)
        for blk in self.blocks.values():
            x = blk(x)
        return self.head(self.norm(x).mean(1))


class LlamaRMSNorm(tnn.RMSNorm):
    """A Hugging Face-style RMSNorm subclass that upcasts to float32 itself: left alone by patch."""

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        return (self.weight * h).to(x.dtype)


class DecoderLayer(tnn.Module):
    def __init__(self, dim):
        super().__init__()
        self.input_layernorm = tnn.RMSNorm(dim, eps=1e-6)
        self.q_proj, self.k_proj = tnn.Linear(dim, dim), tnn.Linear(dim, dim)
        self.v_proj, self.o_proj = tnn.Linear(dim, dim), tnn.Linear(dim, dim)
        self.post_attention_layernorm = tnn.LayerNorm(dim)
        self.mlp = tnn.Sequential(tnn.Linear(dim, 2 * dim), tnn.SiLU(), tnn.Linear(2 * dim, dim))

    def forward(self, x):
        h = self.input_layernorm(x)
        att = torch.softmax(self.q_proj(h) @ self.k_proj(h).transpose(1, 2) / h.shape[-1] ** 0.5, -1)
        x = x + self.o_proj(att @ self.v_proj(h))
        return x + self.mlp(self.post_attention_layernorm(x))


class TinyDecoder(tnn.Module):
    def __init__(self, vocab=20, dim=8):
        super().__init__()
        self.embed_tokens = tnn.Embedding(vocab, dim)
        self.feature_norm = tnn.InstanceNorm1d(dim, affine=True, track_running_stats=True)
        self.layers = tnn.ModuleList([DecoderLayer(dim) for _ in range(2)])
        self.norm = tnn.RMSNorm(dim)
        self.extra_norm = LlamaRMSNorm(dim)
        self.lm_head = tnn.Linear(dim, vocab, bias=False)

    def forward(self, ids):
        x = self.embed_tokens(ids)
        x = self.feature_norm(x.transpose(1, 2)).transpose(1, 2)  # normalize over the sequence
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.extra_norm(self.norm(x)))


class Mixed3d(tnn.Module):
    """The remaining classes: BatchNorm3d, InstanceNorm2d/3d, and a shared (tied) norm."""

    def __init__(self):
        super().__init__()
        self.conv = tnn.Conv3d(2, 4, 1)
        self.bn3 = tnn.BatchNorm3d(4)
        self.in3 = tnn.InstanceNorm3d(4, affine=True)
        self.in2 = tnn.InstanceNorm2d(4, track_running_stats=True)
        self.fc = tnn.Linear(4 * 3 * 3, 4)
        shared = tnn.BatchNorm1d(4)
        self.shared_a = shared
        self.shared_b = shared

    def forward(self, x):
        x = self.in3(self.bn3(self.conv(x)))
        x = self.in2(x.mean(2))
        v = self.fc(x.flatten(1))  # varies across the batch (a mean of x would be nearly constant)
        return self.shared_b(self.shared_a(v) * 2)


def _set_some_eval(model):
    """Put some submodules in eval before patching: the flags must survive."""
    mods = [m for m in model.modules() if isinstance(m, EXACT_TORCH_NORMS)]
    for m in mods[::2]:
        m.eval()
    return model


def resnet():
    m = TinyResNet()
    m.layer1[0].eval()  # a whole block in eval
    return m


MODELS = {
    "resnet": (resnet, lambda g: torch.randn(4, 3, 8, 8, generator=g) * 1.5 + 0.5),
    "convnext_vit": (lambda: _set_some_eval(TinyConvNeXtViT()), lambda g: torch.randn(2, 3, 8, 8, generator=g) + 1.0),
    "hf_decoder": (lambda: _set_some_eval(TinyDecoder()), lambda g: torch.randint(0, 20, (3, 5), generator=g)),
    "mixed3d": (lambda: _set_some_eval(Mixed3d()), lambda g: torch.randn(5, 2, 3, 3, 3, generator=g) * 2 + 1),
}
model_param = pytest.mark.parametrize("name", list(MODELS))


def _randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, EXACT_TORCH_NORMS) or isinstance(m, (LayerNorm2d, LlamaRMSNorm)):
                for pname, p in m.named_parameters(recurse=False):
                    p.copy_(torch.rand(p.shape, generator=g) + 0.5 if pname == "weight" else torch.randn(p.shape, generator=g) * 0.3)
                for bname, b in m.named_buffers(recurse=False):
                    if bname == "running_mean":
                        b.copy_(torch.randn(b.shape, generator=g) * 0.3)
                    elif bname == "running_var":
                        b.copy_(torch.rand(b.shape, generator=g) + 0.5)
                    elif bname == "num_batches_tracked":
                        b.fill_(3)
    return model


def build(name, seed=0):
    torch.manual_seed(seed)
    make, inp = MODELS[name]
    model = _randomize(make(), seed)
    return model, inp


def snapshot(model):
    return {
        "modules": [(n, m, type(m), m.training) for n, m in model.named_modules(remove_duplicate=False)],
        "params": [(n, p) for n, p in model.named_parameters(remove_duplicate=False)],
        "buffers": [(n, b, b.clone()) for n, b in model.named_buffers(remove_duplicate=False)],
    }


# --------------------------------------------------------------------------------------------
# patch
# --------------------------------------------------------------------------------------------
@model_param
def test_patch_replaces_exactly_the_torch_norms(name):
    model, _ = build(name)
    before = snapshot(model)
    n_norms = sum(type(m) in EXACT_TORCH_NORMS for _, m, _, _ in before["modules"])
    assert n_norms >= 3
    assert normlab.patch(model) is model
    after = snapshot(model)
    assert [n for n, *_ in after["modules"]] == [n for n, *_ in before["modules"]]
    for (n, m0, t0, tr0), (_, m1, t1, tr1) in zip(before["modules"], after["modules"]):
        if t0 in EXACT_TORCH_NORMS:
            assert t1 is twin(t0), f"{n}: {t0.__name__} not patched (now {t1})"
            assert isinstance(m1, t0)
        elif t0 is LayerNorm2d:  # a subclass whose own forward calls torch.nn.functional
            assert t1 is not t0 and issubclass(t1, t0) and "_normlab_patched" in vars(t1), n
            assert m1 is m0
        else:
            assert t1 is t0, f"{n}: {t0.__name__} must be left alone, became {t1}"
            assert m1 is m0, f"{n}: non-norm module replaced"
        assert tr1 == tr0, f"{n}: training flag changed"


@model_param
def test_patch_keeps_parameters_buffers_and_state_dict(name):
    model, _ = build(name)
    before = snapshot(model)
    sd_keys = list(model.state_dict().keys())
    param_list = list(model.parameters())
    normlab.patch(model)
    after = snapshot(model)
    assert [n for n, _ in after["params"]] == [n for n, _ in before["params"]]
    for (n, p0), (_, p1) in zip(before["params"], after["params"]):
        assert p1 is p0, f"{n}: parameter object replaced"
    assert all(a is b for a, b in zip(model.parameters(), param_list))
    assert [n for n, *_ in after["buffers"]] == [n for n, *_ in before["buffers"]]
    for (n, _, v0), (_, b1, _) in zip(before["buffers"], after["buffers"]):
        assert b1.dtype == v0.dtype and b1.device == v0.device, n
        assert torch.equal(b1, v0), f"{n}: buffer value changed"
    assert list(model.state_dict().keys()) == sd_keys
    # the patched model's checkpoint loads into an unpatched one, strictly
    fresh, _ = build(name, seed=1)
    fresh.load_state_dict(model.state_dict(), strict=True)


@model_param
def test_patch_outputs_match_before_in_train_and_eval(name):
    model, inp = build(name)
    ref = copy.deepcopy(model)
    normlab.patch(model)
    g = torch.Generator().manual_seed(5)
    for phase in ("mixed", "train", "eval"):
        if phase == "train":
            model.train()
            ref.train()
        elif phase == "eval":
            model.eval()
            ref.eval()
        x = inp(g)
        y_ref, y = ref(x), model(x)
        assert_close(y, y_ref, **TOL, msg=lambda m: f"{phase}: {m}")
        up = torch.randn(y.shape, generator=g)
        y_ref.backward(up)
        y.backward(up)
        for (n, p_ref), (_, p) in zip(ref.named_parameters(), model.named_parameters()):
            assert (p.grad is None) == (p_ref.grad is None), n
            if p.grad is not None:
                assert_close(p.grad, p_ref.grad, atol=1e-4, rtol=1e-4, msg=lambda m, n=n: f"{phase} {n}.grad: {m}")
        ref.zero_grad(set_to_none=True)
        model.zero_grad(set_to_none=True)
        for (n, b_ref), (_, b) in zip(ref.named_buffers(), model.named_buffers()):
            assert_close(b, b_ref, **TOL, msg=lambda m, n=n: f"{phase} buffer {n}: {m}")


@model_param
def test_optimizer_built_before_patching_still_trains_the_model(name):
    model, inp = build(name)
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    normlab.patch(model)
    norm_weights0 = {n: p.detach().clone() for n, p in model.named_parameters() if "norm" in n or "bn" in n
                     or n.startswith(("gn", "in", "shared"))}
    assert norm_weights0
    g = torch.Generator().manual_seed(6)
    model.train()
    ref.train()
    for _ in range(3):
        x = inp(g)
        target = torch.randn(ref(x).shape, generator=g)
        for m, o in ((ref, opt_ref), (model, opt)):
            o.zero_grad()
            loss = (m(x) - target).square().mean()
            loss.backward()
            o.step()
    for (n, p_ref), (_, p) in zip(ref.named_parameters(), model.named_parameters()):
        assert_close(p, p_ref, atol=1e-4, rtol=1e-4, msg=lambda m, n=n: f"{n}: {m}")
    changed = [n for n, p in model.named_parameters() if n in norm_weights0 and not torch.equal(p, norm_weights0[n])]
    assert changed, "the optimizer did not update the patched norm parameters"


@model_param
def test_second_patch_is_a_no_op(name):
    model, inp = build(name)
    normlab.patch(model)
    first = snapshot(model)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    assert normlab.patch(model) is model
    second = snapshot(model)
    for (n, m0, t0, tr0), (_, m1, t1, tr1) in zip(first["modules"], second["modules"]):
        assert m1 is m0 and t1 is t0 and tr1 == tr0, n
    for (n, p0), (_, p1) in zip(first["params"], second["params"]):
        assert p1 is p0, n
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_user_subclasses_run_on_normlab_or_are_left_alone_with_a_warning():
    model, inp = build("convnext_vit")
    hf, _ = build("hf_decoder")
    normlab.patch(model)
    with pytest.warns(UserWarning, match="LlamaRMSNorm"):
        normlab.patch(hf)
    # LayerNorm2d keeps its own forward (channels-first), its F.layer_norm now normlab's
    for m in (model.stem[1], model.downsample[0]):
        assert isinstance(m, LayerNorm2d) and type(m) is not LayerNorm2d
    # LlamaRMSNorm computes by hand: nothing to route, so it is left as it is
    assert type(hf.extra_norm) is LlamaRMSNorm
    x = torch.randn(2, 8, 3, 3) + 2
    expect = TF.layer_norm(x.permute(0, 2, 3, 1), (8,), model.stem[1].weight, model.stem[1].bias, 1e-6)
    calls = []
    real = normlab.functional.layer_norm

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    import normlab._patch as P
    P._SHIM.layer_norm = spy
    try:
        y = model.stem[1](x)
    finally:
        P._SHIM.layer_norm = real
    assert calls == [(2, 3, 3, 8)], "LayerNorm2d's forward did not reach normlab"
    assert_close(y, expect.permute(0, 3, 1, 2), **TOL)


def test_subclass_overriding_forward_is_not_touched_even_when_named_like_torch():
    class BatchNorm2d(tnn.BatchNorm2d):  # same name as torch's, different behaviour
        def forward(self, x):
            return x * 0 + 42.0

    model = tnn.Sequential(tnn.Conv2d(3, 3, 1), BatchNorm2d(3), tnn.BatchNorm2d(3))
    normlab.patch(model)
    assert type(model[1]) is BatchNorm2d
    assert type(model[2]) is nlnn.BatchNorm2d
    assert torch.equal(model[1](torch.randn(2, 3, 2, 2)), torch.full((2, 3, 2, 2), 42.0))


def test_patch_keeps_hooks():
    model, inp = build("mixed3d")
    model.train()
    calls = []
    h1 = model.bn3.register_forward_hook(lambda m, i, o: calls.append(("fwd", type(m).__name__)) or o * 2)
    model.in3.register_forward_pre_hook(lambda m, args: (args[0] + 1,))
    model.bn3.register_full_backward_hook(lambda m, gi, go: calls.append(("bwd", 0)))
    ref = copy.deepcopy(model)
    normlab.patch(model)
    assert type(model.bn3) is nlnn.BatchNorm3d and type(model.in3) is nlnn.InstanceNorm3d
    x = inp(torch.Generator().manual_seed(7))
    calls.clear()
    y_ref = ref(x)
    assert calls == [("fwd", "BatchNorm3d")]
    y = model(x)
    assert calls == [("fwd", "BatchNorm3d")] * 2
    assert_close(y, y_ref, **TOL)  # the pre-hook (+1) and the hook (*2) both applied
    y.sum().backward()
    assert ("bwd", 0) in calls
    h1.remove()
    calls.clear()
    model(x)
    assert not any(c[0] == "fwd" for c in calls)


def test_patch_keeps_device_and_dtype():
    model = tnn.Sequential(tnn.Linear(4, 4), tnn.LayerNorm(4), tnn.BatchNorm1d(4)).to(torch.float64)
    normlab.patch(model)
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert model[2].running_mean.dtype == torch.float64
    x = torch.randn(5, 4, dtype=torch.float64) + 1
    assert model(x).dtype == torch.float64
    meta = tnn.Sequential(tnn.BatchNorm2d(3, device="meta"), tnn.GroupNorm(1, 3, device="meta"))
    params = list(meta.parameters())
    normlab.patch(meta)
    assert type(meta[0]) is nlnn.BatchNorm2d and type(meta[1]) is nlnn.GroupNorm
    assert all(p.device.type == "meta" for p in meta.parameters())
    assert all(a is b for a, b in zip(meta.parameters(), params))


def test_shared_norm_module_stays_shared():
    model, inp = build("mixed3d")
    assert model.shared_a is model.shared_b
    normlab.patch(model)
    assert model.shared_a is model.shared_b
    assert type(model.shared_a) is nlnn.BatchNorm1d


NORM_MODULES = [
    (tnn.BatchNorm1d, (3,), (4, 3)), (tnn.BatchNorm2d, (3,), (2, 3, 2, 2)), (tnn.BatchNorm3d, (3,), (2, 3, 2, 2, 2)),
    (tnn.LayerNorm, ((2, 3),), (4, 2, 3)), (tnn.GroupNorm, (3, 6), (2, 6, 4)),
    (tnn.InstanceNorm1d, (3,), (2, 3, 5)), (tnn.InstanceNorm2d, (3,), (2, 3, 2, 3)),
    (tnn.InstanceNorm3d, (3,), (2, 3, 2, 2, 2)), (tnn.RMSNorm, (4,), (3, 4)),
]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("cls,args,shape", NORM_MODULES, ids=[c.__name__ for c, *_ in NORM_MODULES])
def test_patch_a_model_that_is_a_norm_module(cls, args, shape, training):
    kwargs = {"affine": True, "track_running_stats": True} if "Instance" in cls.__name__ else {}
    m = _randomize(cls(*args, **kwargs)).train(training)
    ref = copy.deepcopy(m)
    params = dict(m.named_parameters())
    buffers = {k: v.clone() for k, v in m.named_buffers()}
    fired = []
    m.register_forward_hook(lambda mod, i, o: fired.append(1))
    out = normlab.patch(m)
    assert type(out) is twin(cls)
    assert isinstance(out, cls)
    assert out.training == training
    for k, p in out.named_parameters():
        assert p is params[k], k
    for k, b in out.named_buffers():
        assert torch.equal(b, buffers[k]), k
    x = torch.randn(shape, generator=torch.Generator().manual_seed(8)) * 2 + 1
    assert_close(out(x), ref(x), **TOL)
    assert fired == [1]
    for (k, b_ref), (_, b) in zip(ref.named_buffers(), out.named_buffers()):
        assert_close(b, b_ref, **TOL, msg=lambda msg, k=k: f"{k}: {msg}")
    assert normlab.patch(out) is out and type(out) is twin(cls)


def test_patch_model_already_using_normlab_modules():
    model = tnn.Sequential(nlnn.BatchNorm1d(3), tnn.BatchNorm1d(3))
    first = model[0]
    normlab.patch(model)
    assert model[0] is first and type(model[0]) is nlnn.BatchNorm1d
    assert type(model[1]) is nlnn.BatchNorm1d


# --------------------------------------------------------------------------------------------
# backend
# --------------------------------------------------------------------------------------------
FUNCS = ("batch_norm", "instance_norm", "group_norm", "layer_norm", "rms_norm")


@pytest.fixture
def spy(monkeypatch):
    """Record which backend object runs each call (wraps the five methods of both backends)."""
    from normlab import _dispatch

    calls = []
    for bname in normlab.available_backends():
        obj = _dispatch._load(bname)
        for fn in FUNCS:
            orig = getattr(obj, fn)

            def wrapper(*a, _orig=orig, _b=bname, _fn=fn, **k):
                calls.append((_b, _fn))
                return _orig(*a, **k)

            monkeypatch.setattr(obj, fn, wrapper)

    def which():
        x = torch.randn(16, 1024)  # 16K elements: a cell auto gives the kernels (RMSNorm
        NF.rms_norm(x, (1024,))      # from 4K up); the first unforced call warms it up
        calls.clear()
        NF.rms_norm(x, (1024,))
        assert len(calls) == 1, calls
        return calls[0][0]

    return which


# what an unforced call on a CPU tensor runs: the fused kernels when numba is installed
DEFAULT = "cpu" if "cpu" in normlab.available_backends() else "reference"


def test_default_backend_is_auto(spy):
    assert normlab.current_backend() == "auto"
    assert spy() == DEFAULT
    x = torch.randn(16, 64, 8) * 2 + 1  # (a kernels cell, as above)
    with normlab.backend(DEFAULT):
        inside = NF.rms_norm(x, (8,))
    assert torch.equal(NF.rms_norm(x, (8,)), inside)


def _functional_calls():
    g = torch.Generator().manual_seed(9)
    x4 = torch.randn(4, 6, 3, 5, generator=g) * 2 + 1
    w6, b6 = torch.rand(6, generator=g) + 0.5, torch.randn(6, generator=g)
    w5, b5 = torch.rand(3, 5, generator=g) + 0.5, torch.randn(3, 5, generator=g)
    rm, rv = torch.randn(6, generator=g), torch.rand(6, generator=g) + 0.5
    return {
        "batch_norm-train": (lambda F, x, w, b, s: F.batch_norm(x, s[0], s[1], w, b, True, 0.3, 1e-5), x4, w6, b6, (rm, rv)),
        "batch_norm-eval": (lambda F, x, w, b, s: F.batch_norm(x, s[0], s[1], w, b, False), x4, w6, b6, (rm, rv)),
        "instance_norm": (lambda F, x, w, b, s: F.instance_norm(x, s[0], s[1], w, b, True, 0.2), x4, w6, b6, (rm, rv)),
        "group_norm": (lambda F, x, w, b, s: F.group_norm(x, 3, w, b, 1e-3), x4, w6, b6, ()),
        "layer_norm": (lambda F, x, w, b, s: F.layer_norm(x, (3, 5), w, b), x4, w5, b5, ()),
        "rms_norm": (lambda F, x, w, b, s: F.rms_norm(x, (3, 5), w), x4, w5, None, ()),
        "rms_norm-eps": (lambda F, x, w, b, s: F.rms_norm(x, [5], None, 1e-6), x4, None, None, ()),
    }


@pytest.mark.parametrize("case", list(_functional_calls()))
def test_torch_backend_is_bitwise_torch(case, spy):
    call, x, w, b, stats = _functional_calls()[case]

    def run(F):
        xs = x.clone().requires_grad_()
        ws = None if w is None else w.clone().requires_grad_()
        bs = None if b is None else b.clone().requires_grad_()
        st = tuple(s.clone() for s in stats) or (None, None)
        y = call(F, xs, ws, bs, st)
        y.backward(torch.linspace(-1, 2, y.numel()).reshape(y.shape))
        return y, xs.grad, None if ws is None else ws.grad, None if bs is None else bs.grad, st

    want = run(TF)
    with normlab.backend("torch"):
        assert spy() == "torch"
        got = run(NF)
    for a, e in zip(got[:4], want[:4]):
        assert (a is None) == (e is None)
        if a is not None:
            assert torch.equal(a, e)
    for a, e in zip(got[4], want[4]):
        if e is not None:
            assert torch.equal(a, e)


@pytest.mark.parametrize("cls,args,shape", NORM_MODULES, ids=[c.__name__ for c, *_ in NORM_MODULES])
def test_torch_backend_modules_bitwise(cls, args, shape):
    kwargs = {"affine": True, "track_running_stats": True} if "Instance" in cls.__name__ else {}
    t = _randomize(cls(*args, **kwargs))
    n = twin(cls)(*args, **kwargs)
    n.load_state_dict(t.state_dict())
    g = torch.Generator().manual_seed(10)
    for training in (True, True, False):
        t.train(training)
        n.train(training)
        x = torch.randn(shape, generator=g) * 2 + 1
        with normlab.backend("torch"):
            y = n(x)
        assert torch.equal(y, t(x))
        for (k, a), (_, e) in zip(n.state_dict().items(), t.state_dict().items()):
            assert torch.equal(a, e), k


def test_backend_is_read_at_call_time(spy):
    m = nlnn.LayerNorm(3)  # built outside any context
    with normlab.backend("torch"):
        x = torch.randn(2, 3) + 1
        assert torch.equal(m(x), TF.layer_norm(x, (3,), m.weight, m.bias))
        assert spy() == "torch"
    assert spy() == DEFAULT


def test_nested_backends_restore(spy):
    assert spy() == DEFAULT
    with normlab.backend("torch"):
        assert spy() == "torch"
        with normlab.backend("reference"):
            assert spy() == "reference"
            with normlab.backend("torch"):
                assert spy() == "torch"
            assert spy() == "reference"
        assert spy() == "torch"
        assert normlab.current_backend() == "torch"
    assert spy() == DEFAULT
    assert normlab.current_backend() == "auto"


def test_exception_inside_backend_restores(spy):
    with pytest.raises(KeyError):
        with normlab.backend("torch"):
            assert spy() == "torch"
            raise KeyError("boom")
    assert spy() == DEFAULT
    with normlab.backend("torch"):
        with pytest.raises(ZeroDivisionError):
            with normlab.backend("reference"):
                1 / 0
        assert spy() == "torch"
        with pytest.raises(ValueError):  # a normlab error inside the block
            with normlab.backend("reference"):
                NF.layer_norm(torch.randn(2, 3), (4,))
        assert spy() == "torch"
    assert spy() == DEFAULT


@pytest.mark.parametrize("bad", ["cuda", "Torch", "", "numba", "references"])
def test_unknown_backend_names_known_ones(bad, spy):
    with pytest.raises(ValueError) as ei:
        with normlab.backend(bad):
            pytest.fail("entered an unknown backend")
    msg = str(ei.value)
    for known in ("reference", "torch", "cpu", "triton"):
        assert known in msg, f"{known!r} missing from: {msg}"
    assert repr(bad) in msg or bad in msg
    assert not isinstance(ei.value, normlab.BackendUnavailableError)
    assert spy() == DEFAULT


@pytest.mark.parametrize("name", ["cpu", "triton"])
def test_unavailable_backends(name, spy):
    avail = normlab.available_backends()
    if name in avail:
        with normlab.backend(name):
            x = torch.randn(3, 4) + 1
            assert_close(NF.layer_norm(x, (4,)), TF.layer_norm(x, (4,)), **TOL)
    else:
        with pytest.raises(normlab.BackendUnavailableError, match=name) as ei:
            with normlab.backend(name):
                pytest.fail("entered an unavailable backend")
        assert isinstance(ei.value, RuntimeError)
        assert spy() == DEFAULT
        with normlab.backend("torch"):  # a failed entry inside another context keeps it
            with pytest.raises(normlab.BackendUnavailableError):
                with normlab.backend(name):
                    pass
            assert spy() == "torch"


def test_available_backends():
    avail = normlab.available_backends()
    assert all(isinstance(a, str) for a in avail)
    assert "reference" in avail and "torch" in avail
    assert len(set(avail)) == len(avail)
    x = torch.randn(3, 2, 4) * 3 + 1
    for name in avail:
        with normlab.backend(name):
            assert_close(NF.layer_norm(x, (4,)), TF.layer_norm(x, (4,)), **TOL)
            assert_close(NF.batch_norm(x, None, None, training=True), TF.batch_norm(x, None, None, training=True), **TOL)
    assert "bogus" not in avail


def test_backend_is_per_thread(spy):
    seen = []

    def worker():
        seen.append(normlab.current_backend())

    with normlab.backend("torch"):
        t = threading.Thread(target=worker)
        t.start()
        t.join()
        assert spy() == "torch"
    assert seen == ["auto"]
