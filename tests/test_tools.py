"""normlab.tools: swap_norms, fold_batchnorm, freeze_batchnorm / unfreeze_batchnorm."""
import copy
import io
import warnings

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import normlab
from normlab import ArgumentError, ShapeError
from normlab.tools import fold_batchnorm, freeze_batchnorm, swap_norms, unfreeze_batchnorm


def randomize(model, seed=0):
    """Non-trivial affine parameters and running statistics in every BatchNorm."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _BatchNorm):
                c = m.num_features
                if m.weight is not None:
                    m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(c, generator=g))
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.randn(c, generator=g))
                    m.running_var.copy_(torch.rand(c, generator=g) * 2 + 0.1)
                    m.num_batches_tracked.fill_(7)
    return model


def close(actual, expected, rtol=1e-5):
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * expected.abs().max().item())


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [type(m) for m in model.modules()]


def same(model, snap):
    state, types = snap
    assert [type(m) for m in model.modules()] == types
    now = model.state_dict()
    assert now.keys() == state.keys()
    for k in state:
        assert torch.equal(now[k], state[k]), k


class Block(nn.Module):
    """A BatchNorm held as an attribute, called from a custom forward."""

    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Sequential(nn.Conv2d(32, 32, 1), normlab.nn.BatchNorm2d(32)),
        )
        self.block = Block(32)
        self.blocks = nn.ModuleList([Block(32), Block(32)])
        self.heads = nn.ModuleDict({"a": nn.Sequential(nn.Conv2d(32, 8, 1), nn.BatchNorm2d(8))})

    def forward(self, x):
        x = self.block(self.stem(x))
        for b in self.blocks:
            x = b(x)
        return self.heads["a"](x)


def bns(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, _BatchNorm)}


X = torch.randn(2, 3, 6, 6) + 0.5


# --------------------------------------------------------------------------------------------
# swap_norms
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("to", [normlab.nn.GroupNorm, nn.GroupNorm])
def test_swap_to_group_norm_everywhere(to):
    model = randomize(Net()).eval()
    old = bns(model)
    old["blocks.1.bn"].weight.requires_grad_(False)
    old["block.bn"].eps = 1e-3
    assert swap_norms(model, to, num_groups=4) is model
    assert not bns(model)
    for name, bn in old.items():
        new = model.get_submodule(name)
        assert type(new) is to and new.num_groups == 4 and new.num_channels == bn.num_features
        assert torch.equal(new.weight, bn.weight) and torch.equal(new.bias, bn.bias)
        assert new.eps == bn.eps and not new.training
        assert new.weight.requires_grad is bn.weight.requires_grad
    assert model(X).shape == (2, 8, 6, 6)
    ref = nn.functional.group_norm(model.stem[0](X), 4, old["stem.1"].weight, old["stem.1"].bias)
    close(model.stem[1](model.stem[0](X)), ref)


def test_swap_group_count_error_names_layer_and_leaves_model_unchanged():
    model = randomize(Net())
    snap = snapshot(model)
    with pytest.raises(ShapeError, match=r"'heads\.a\.1' \(BatchNorm2d\) has C=8 channels.*"
                                         r"num_groups=32.*\[1, 2, 4, 8\]"):
        swap_norms(model, normlab.nn.GroupNorm, num_groups=32)
    same(model, snap)
    with pytest.raises(ArgumentError, match="needs num_groups"):
        swap_norms(model, nn.GroupNorm)
    with pytest.raises(ShapeError, match="C=32 channels, not divisible by num_groups=3"):
        swap_norms(model, nn.GroupNorm, num_groups=3)
    same(model, snap)


def test_swap_to_instance_norm_keeps_affine():
    model = randomize(Net())
    old = bns(model)
    swap_norms(model, normlab.nn.InstanceNorm2d)
    for name, bn in old.items():
        new = model.get_submodule(name)
        assert type(new) is normlab.nn.InstanceNorm2d and new.affine and new.training
        assert torch.equal(new.weight, bn.weight) and torch.equal(new.bias, bn.bias)
    y = model.stem[0](X)
    close(model.stem[1](y), nn.functional.instance_norm(y, weight=old["stem.1"].weight,
                                                        bias=old["stem.1"].bias))
    with pytest.raises(ArgumentError, match=r"'1' \(BatchNorm2d\) takes \(N, C, H, W\) input "
                                            r"but InstanceNorm1d takes \(N, C\) or \(N, C, L\)"):
        swap_norms(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)), nn.InstanceNorm1d)


def test_instance_norm_for_batchnorm1d_refuses_2d_input():
    model = swap_norms(nn.Sequential(nn.BatchNorm1d(4)), nn.InstanceNorm1d)
    assert model(torch.randn(3, 4, 5)).shape == (3, 4, 5)  # (N, C, L) is fine
    with pytest.raises(ShapeError, match=r"'0' .*BatchNorm1d.*2-D input.*unbatched"):
        model(torch.randn(3, 4))


def test_swap_to_layer_norm():
    model = randomize(nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4)))
    bn = model[1]
    swap_norms(model, normlab.nn.LayerNorm)
    x = torch.randn(3, 5) + 1
    h = model[0](x)
    close(model(x), nn.functional.layer_norm(h, (4,), bn.weight, bn.bias))
    with pytest.raises(ShapeError, match="LayerNorm.*3-D input"):
        model[1](torch.randn(3, 4, 4))
    with pytest.raises(ArgumentError, match=r"'1' \(BatchNorm2d\).*GroupNorm with num_groups=1"):
        swap_norms(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)), nn.LayerNorm)


def test_swap_to_sync_batchnorm_keeps_running_stats():
    model = randomize(Net()).eval()
    ref = model(X)
    old = bns(model)
    old["block.bn"].momentum = None
    swap_norms(model, nn.SyncBatchNorm)
    for name, bn in old.items():
        new = model.get_submodule(name)
        assert type(new) is nn.SyncBatchNorm
        for key in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            assert torch.equal(getattr(new, key), getattr(bn, key)), (name, key)
        assert new.momentum == bn.momentum and not new.training
    torch.testing.assert_close(model(X), ref)


def test_swap_callable_source_device_dtype_and_sharing():
    shared = nn.BatchNorm1d(4)
    model = nn.Sequential(nn.Linear(3, 4), shared, nn.Sequential(shared)).double()
    swap_norms(model, lambda old: nn.GroupNorm(2, old.num_features))
    assert model[1] is model[2][0] and isinstance(model[1], nn.GroupNorm)
    assert model[1].weight.dtype == torch.float64
    # the model itself a BatchNorm: the replacement is returned
    assert isinstance(swap_norms(nn.BatchNorm2d(4), nn.GroupNorm, num_groups=2), nn.GroupNorm)
    with pytest.raises(ArgumentError, match="no rule to build a Dropout.*callable"):
        swap_norms(nn.BatchNorm2d(4), nn.Dropout)
    with pytest.raises(TypeError, match="returned int"):
        swap_norms(nn.BatchNorm2d(4), lambda old: 3)


def test_swap_layer_norm_to_rms_norm_with_source():
    ln = nn.LayerNorm(6, eps=1e-4)
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5)
    model = nn.Sequential(nn.Linear(6, 6), ln, nn.BatchNorm1d(6))
    swap_norms(model, normlab.nn.RMSNorm, source=nn.LayerNorm)  # zero bias: nothing lost
    assert type(model[1]) is normlab.nn.RMSNorm and model[1].eps == 1e-4
    assert torch.equal(model[1].weight, ln.weight) and type(model[2]) is nn.BatchNorm1d
    ln2 = nn.LayerNorm(6)
    with torch.no_grad():
        ln2.bias.fill_(1.0)
    with pytest.warns(UserWarning, match="no bias; the non-zero bias of '0' was dropped"):
        swap_norms(nn.Sequential(ln2), nn.RMSNorm, source=nn.LayerNorm)


def test_swap_refuses_modules_whose_forward_takes_more_than_the_input():
    model = nn.Sequential(normlab.nn.MaskedBatchNorm1d(4))
    with pytest.raises(ArgumentError, match=r"'0' \(MaskedBatchNorm1d\)'s forward takes more"):
        swap_norms(model, nn.GroupNorm, num_groups=2)


# --------------------------------------------------------------------------------------------
# fold_batchnorm
# --------------------------------------------------------------------------------------------

FOLD_CASES = {
    "conv1d": (lambda: nn.Sequential(nn.Conv1d(4, 6, 3), nn.BatchNorm1d(6)), (3, 4, 9)),
    "conv2d-grouped-nobias-dilated": (
        lambda: nn.Sequential(nn.Conv2d(4, 6, 3, stride=2, dilation=2, groups=2, bias=False),
                              nn.BatchNorm2d(6)), (2, 4, 9, 9)),
    "conv3d-normlab-bn": (lambda: nn.Sequential(nn.Conv3d(2, 4, 2), normlab.nn.BatchNorm3d(4)),
                          (2, 2, 4, 4, 4)),
    "linear-bn1d": (lambda: nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7)), (6, 5)),
    "convtranspose2d-grouped": (lambda: nn.Sequential(nn.ConvTranspose2d(4, 6, 3, groups=2),
                                                      nn.BatchNorm2d(6)), (2, 4, 5, 5)),
    "bn-without-affine": (
        lambda: nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, affine=False)), (2, 3, 4, 4)),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", FOLD_CASES)
def test_fold_conv_bn(case, dtype):
    make, shape = FOLD_CASES[case]
    torch.manual_seed(0)
    model = randomize(make()).to(dtype).train()
    snap = snapshot(model)
    folded, unfolded = fold_batchnorm(model, report=True)
    same(model, snap)
    assert model.training and not folded.training and unfolded == {}
    assert isinstance(folded[1], nn.Identity)
    assert folded[0].weight.dtype == dtype and folded[0].bias.dtype == dtype
    x = torch.randn(shape, dtype=dtype) * 2 + 1
    close(folded(x), model.eval()(x))


def test_fold_channels_last():
    model = randomize(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))).eval()
    model = model.to(memory_format=torch.channels_last)
    folded = fold_batchnorm(model)
    assert folded[0].weight.is_contiguous(memory_format=torch.channels_last)
    x = (torch.randn(2, 3, 7, 7) + 1).to(memory_format=torch.channels_last)
    close(folded(x), model(x))


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 1)
        self.bn2 = nn.BatchNorm2d(4)
        self.act = nn.ReLU()
        self.bn3 = nn.BatchNorm2d(4)
        self.bn4 = nn.BatchNorm2d(4, track_running_stats=False)

    def forward(self, x):
        y = self.conv(x)
        y = self.bn(y) + y  # the conv output feeds the BN and the add: not foldable
        y = self.bn2(self.conv2(y))  # foldable
        return self.bn4(self.bn3(self.act(y)))  # after a ReLU; without running stats


def test_fold_follows_dataflow_and_reports():
    model = randomize(Residual()).eval()
    x = torch.randn(3, 4, 5, 5) + 1
    folded, unfolded = fold_batchnorm(model, report=True)
    assert isinstance(folded.bn2, nn.Identity)
    assert set(unfolded) == {"bn", "bn3", "bn4"}
    assert "also used elsewhere" in unfolded["bn"]
    assert "not the output of a Conv" in unfolded["bn3"]
    assert "track_running_stats=False" in unfolded["bn4"]
    close(folded(x), model(x))
    with pytest.warns(UserWarning, match=r"left 3 BatchNorm\(s\) unfolded: 'bn': "):
        fold_batchnorm(model)


class Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                                      nn.Conv2d(4, 4, 1), nn.ReLU(), nn.BatchNorm2d(4))
        self.block = Block(4)  # traces on its own
        self.conv = nn.Conv2d(4, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        x = self.block(self.features(x))
        if x.sum() > 0:
            x = x * 2
        return self.bn(self.conv(x))


def test_fold_untraceable_model_through_sequential_adjacency():
    model = randomize(Untraceable()).eval()
    with pytest.raises(Exception):
        torch.fx.symbolic_trace(model)
    folded, unfolded = fold_batchnorm(model, report=True)
    assert isinstance(folded.features[1], nn.Identity) and isinstance(folded.block.bn, nn.Identity)
    assert set(unfolded) == {"features.5", "bn"}
    assert "does not trace" in unfolded["bn"]
    for x in (torch.randn(2, 3, 6, 6) + 1, torch.randn(2, 3, 6, 6) - 3):
        close(folded(x), model(x))


def test_fold_keeps_shared_and_called_twice_modules():
    conv, bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = conv, bn

        def forward(self, x):
            return self.bn(self.conv(x)) + self.conv(x)

    model = randomize(Twice()).eval()
    folded, unfolded = fold_batchnorm(model, report=True)
    assert "called more than once" in unfolded["bn"]
    x = torch.randn(2, 3, 4, 4)
    close(folded(x), model(x))


# --------------------------------------------------------------------------------------------
# freeze_batchnorm
# --------------------------------------------------------------------------------------------

def frozen_pair():
    torch.manual_seed(0)
    model = randomize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                                    nn.Conv2d(4, 4, 1), normlab.nn.BatchNorm2d(4)))
    return model, freeze_batchnorm(copy.deepcopy(model))


def test_freeze_ignores_train_and_keeps_statistics():
    model, frozen = frozen_pair()
    stats = {k: v.clone() for k, v in frozen.state_dict().items()
             if "running" in k or "batches" in k}
    frozen.train()
    assert frozen.training and frozen[0].training and not frozen[1].training
    x = torch.randn(2, 3, 6, 6) + 1
    out = [frozen(x), frozen(x)]
    for k, v in stats.items():
        assert torch.equal(frozen.state_dict()[k], v), k
    ref = model.eval()(x)
    torch.testing.assert_close(out[0], ref)
    torch.testing.assert_close(out[1], ref)
    assert isinstance(frozen[1], nn.BatchNorm2d) and isinstance(frozen[4], normlab.nn.BatchNorm2d)


def test_freeze_grads_flow_to_earlier_layers_only():
    _, frozen = frozen_pair()
    frozen.train()
    opt = torch.optim.SGD(frozen.parameters(), lr=0.1)
    before = {k: v.clone() for k, v in frozen.state_dict().items()}
    frozen(torch.randn(2, 3, 6, 6) + 1).square().mean().backward()
    for bn in (frozen[1], frozen[4]):
        assert bn.weight.grad is None and bn.bias.grad is None and not bn.weight.requires_grad
    assert frozen[0].weight.grad is not None and frozen[0].weight.grad.abs().sum() > 0
    opt.step()
    after = frozen.state_dict()
    assert not torch.equal(after["0.weight"], before["0.weight"])
    for k in ("1.weight", "1.bias", "1.running_mean", "4.running_var", "4.num_batches_tracked"):
        assert torch.equal(after[k], before[k]), k


def test_freeze_state_dict_pickle_and_unfreeze():
    model, frozen = frozen_pair()
    assert list(frozen.state_dict()) == list(model.state_dict())
    frozen.load_state_dict(model.state_dict())
    model.load_state_dict(frozen.state_dict())
    buf = io.BytesIO()
    torch.save(frozen, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    for m in (loaded, copy.deepcopy(frozen)):
        assert type(m[1]) is type(frozen[1]) and not m.train()[1].training
        assert torch.equal(m[1].running_var, frozen[1].running_var)
    frozen[1].weight.requires_grad_(True)  # freeze again is a no-op for an already frozen BN
    freeze_batchnorm(frozen)
    assert frozen[1].weight.requires_grad
    model[4].bias.requires_grad_(False)
    refrozen = unfreeze_batchnorm(freeze_batchnorm(model.train()))
    assert type(refrozen[1]) is nn.BatchNorm2d and type(refrozen[4]) is normlab.nn.BatchNorm2d
    assert refrozen[1].training and refrozen[1].weight.requires_grad
    assert not refrozen[4].bias.requires_grad


def test_freeze_without_running_stats_warns():
    with pytest.warns(UserWarning, match=r"'1' track no running statistics"):
        model = freeze_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 1),
                                               nn.BatchNorm2d(4, track_running_stats=False)))
    assert not model[1].weight.requires_grad


def test_frozen_batchnorm_folds():
    model, frozen = frozen_pair()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        folded = fold_batchnorm(frozen)
    x = torch.randn(2, 3, 6, 6) + 1
    close(folded(x), model.eval()(x))
