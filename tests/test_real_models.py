"""normlab.patch on real model classes from torchvision, timm and transformers (randomly
initialized, nothing downloaded). Each library is optional: a test skips where it is absent
(as in CI, which tests look-alikes instead in test_patch_backend.py)."""
import pytest
import torch

import normlab
from normlab._patch import TWINS


def _outputs(model, inputs):
    """Outputs in eval and in train mode, the state restored after each (BatchNorm updates its
    running statistics in train mode)."""
    outs = []
    for mode in ("eval", "train"):
        getattr(model, mode)()
        state = {k: v.clone() for k, v in model.state_dict().items()}
        with torch.no_grad():
            out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
        outs.append(getattr(out, "last_hidden_state", out))
        model.load_state_dict(state, strict=True)
    return outs


def _runs_on_normlab(module):
    return type(module) in TWINS.values() or "_normlab_patched" in vars(type(module))


def _check(model, inputs, expect_patched):
    norms = [m for m in model.modules() if isinstance(m, tuple(TWINS))]
    params = [id(p) for p in model.parameters()]
    before = _outputs(model, inputs)
    assert normlab.patch(model) is model
    assert sum(map(_runs_on_normlab, norms)) == len(norms) >= expect_patched
    assert [id(p) for p in model.parameters()] == params
    for a, e in zip(_outputs(model, inputs), before):
        torch.testing.assert_close(a, e, atol=2e-4, rtol=2e-4)


def test_torchvision_resnet18():
    tv = pytest.importorskip("torchvision")
    model = tv.models.resnet18(weights=None)
    _check(model, torch.randn(2, 3, 64, 64), expect_patched=20)


@pytest.mark.parametrize("name", ["convnext_atto", "vit_tiny_patch16_224", "resnet18d"])
def test_timm(name):
    timm = pytest.importorskip("timm")
    model = timm.create_model(name, pretrained=False)
    _check(model, torch.randn(2, 3, 224, 224), expect_patched=1)


def test_transformers_bert():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    model = transformers.BertModel(config)
    _check(model, {"input_ids": torch.randint(0, 100, (2, 16))}, expect_patched=5)
