"""The models of ``normlab bench --models``, all randomly initialized (nothing is downloaded),
each with a full configuration and a tiny one for ``quick`` runs.

* ``resnet18``, ``resnet50``: torchvision's ResNet-18 (BasicBlock, [2, 2, 2, 2]) and ResNet-50
  (Bottleneck, [3, 4, 6, 3]) written out here (torchvision is not needed): the same module
  names (``conv1, bn1, relu, maxpool, layer1..4, avgpool, fc``, blocks ``convK/bnK/downsample``),
  so the same ``state_dict`` keys and shapes, ``torch.nn.BatchNorm2d``, torchvision's
  initialization; 1000 classes, input ``(N, 3, 224, 224)``. Tiny: one block per stage, widths
  8-64 (ResNet-18) / 8-256 (ResNet-50), 10 classes, ``(N, 3, 32, 32)``.
* ``unet``: a diffusion U-Net block stack (:class:`UNetBlocks`) on ``(N, 4, 32, 32)`` latents
  (a 256x256 image in Stable Diffusion's VAE space): ResBlocks of GroupNorm(32, C) + SiLU +
  Conv3x3, twice, plus the skip; C=128 at 32x32, C=256 at 16x16, 11 GroupNorms. Tiny: C=32/64,
  GroupNorm(8, C), ``(N, 4, 8, 8)``.
* ``bert``, ``gpt2``, ``llama`` (where ``transformers`` imports; ``HF_HUB_OFFLINE=1``): BERT-base
  (``BertConfig()``: 12 layers, width 768, 25 LayerNorms), GPT-2 small (``GPT2Config()``: 12
  layers, width 768, 25 LayerNorms) and a Llama-style decoder (:data:`LLAMA`: TinyLlama-1.1B's
  width - 2048, MLP 5632, 32 heads, 4 key/value heads, vocabulary 32000 - with 4 of its 22
  layers, 9 LlamaRMSNorms), float32, SDPA attention, no KV cache. Inference runs the bare model
  (``AutoModel.from_config``: ``last_hidden_state``), training the model with its head and loss
  (BERT: masked-LM loss on 15% of the positions; GPT-2, Llama: causal-LM loss). Tiny: width 32,
  2 layers, 2 heads, vocabulary 128, 16 tokens.

Cases (:data:`MODELS`): inference at batch 1 and at the realistic batch (CNNs 16 images,
transformers 8 sequences of 128 tokens; quick: 2), and a training step at the realistic batch.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

# --- ResNet (torchvision's) -------------------------------------------------------------


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """torchvision's ResNet-18/34 block: two 3x3 convs, each followed by BatchNorm2d."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """torchvision's ResNet-50 block (v1.5: the stride on the 3x3 conv): 1x1, 3x3, 1x1 convs,
    each followed by BatchNorm2d, 4x expansion."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """torchvision's ResNet: module names, shapes and initialization (Kaiming-normal convs,
    BatchNorm weight 1 and bias 0, the default Linear) as ``torchvision.models.ResNet``.
    ``width`` scales the stem and stage widths (64: torchvision's)."""

    def __init__(self, block: type, layers: list[int], num_classes: int = 1000, width: int = 64):
        super().__init__()
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, width, layers[0])
        self.layer2 = self._make_layer(block, width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(block, width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(block, width * 8, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(width * 8 * block.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, block: type, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(conv1x1(self.inplanes, planes * block.expansion, stride),
                                       nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(num_classes: int = 1000, width: int = 64, layers=(2, 2, 2, 2)) -> ResNet:
    """torchvision's ``resnet18(weights=None)`` (11,689,512 parameters at the defaults)."""
    return ResNet(BasicBlock, list(layers), num_classes, width)


def resnet50(num_classes: int = 1000, width: int = 64, layers=(3, 4, 6, 3)) -> ResNet:
    """torchvision's ``resnet50(weights=None)`` (25,557,032 parameters at the defaults)."""
    return ResNet(Bottleneck, list(layers), num_classes, width)


# --- diffusion U-Net block stack ---------------------------------------------------------

class ResBlock(nn.Module):
    """A diffusion U-Net ResBlock without the time embedding (diffusers' ``ResnetBlock2D``):
    ``skip(x) + conv2(silu(norm2(conv1(silu(norm1(x))))))`` with GroupNorm(groups, C), 3x3
    convs, and a 1x1 conv as the skip where the channel count changes."""

    def __init__(self, cin: int, cout: int, groups: int = 32, eps: float = 1e-6):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=eps)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, cout, eps=eps)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class UNetBlocks(nn.Module):
    """A small diffusion U-Net: ``conv_in`` (4 -> C1); two ResBlocks at C1 (kept as the skip);
    a stride-2 conv; ResBlocks C1 -> C2 and C2 at half the resolution; nearest 2x upsampling
    and a 3x3 conv; a ResBlock on the concatenation with the skip (C2 + C1 -> C1); then
    GroupNorm, SiLU and ``conv_out`` (C1 -> 4): 11 GroupNorms. The default is C1=128 at 32x32,
    C2=256 at 16x16 (Stable Diffusion's first two U-Net widths, on a 256x256 image's latents)."""

    def __init__(self, channels=(128, 256), groups: int = 32, in_channels: int = 4):
        super().__init__()
        c1, c2 = channels
        self.conv_in = nn.Conv2d(in_channels, c1, 3, padding=1)
        self.down = nn.Sequential(ResBlock(c1, c1, groups), ResBlock(c1, c1, groups))
        self.downsample = nn.Conv2d(c1, c1, 3, stride=2, padding=1)
        self.mid = nn.Sequential(ResBlock(c1, c2, groups), ResBlock(c2, c2, groups))
        self.upsample = nn.Conv2d(c2, c2, 3, padding=1)
        self.up = ResBlock(c2 + c1, c1, groups)
        self.norm_out = nn.GroupNorm(groups, c1, eps=1e-6)
        self.conv_out = nn.Conv2d(c1, in_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = self.down(self.conv_in(x))
        h = self.mid(self.downsample(skip))
        h = self.upsample(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        h = self.up(torch.cat([h, skip], dim=1))
        return self.conv_out(F.silu(self.norm_out(h)))


# --- transformers ------------------------------------------------------------------------

#: The Llama-style decoder: TinyLlama-1.1B's width with 4 of its 22 layers (307M parameters,
#: 131M of them in the embedding and the head).
LLAMA = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=4,
             num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
             rms_norm_eps=1e-5)
_TINY = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=2, max_position_embeddings=64)


def transformers_status():
    """``(module, "transformers VERSION")`` where ``transformers`` imports (with
    ``HF_HUB_OFFLINE=1``), else ``(None, reason)``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        tf = importlib.import_module("transformers")
        for name in ("AutoModel", "BertConfig", "GPT2Config", "LlamaConfig"):
            getattr(tf, name)
    except Exception as e:  # noqa: BLE001 - any failure means: not available
        text = f"{type(e).__name__}: {e}".splitlines()[0][:160]
        return None, f"transformers is not importable ({text}); pip install transformers"
    return tf, f"transformers {tf.__version__}"


def _transformers():
    tf, why = transformers_status()
    if tf is None:
        raise ModelUnavailable(why)
    return tf


def _hf_config(name: str, quick: bool):
    tf = _transformers()
    if name == "bert":
        return tf.BertConfig(**_TINY) if quick else tf.BertConfig()
    if name == "gpt2":
        if quick:
            return tf.GPT2Config(vocab_size=128, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                                 bos_token_id=0, eos_token_id=0, use_cache=False)
        return tf.GPT2Config(use_cache=False)
    tiny = dict(_TINY, num_key_value_heads=1)
    return tf.LlamaConfig(**(tiny if quick else LLAMA), use_cache=False)


_HEADS = {"bert": "AutoModelForMaskedLM", "gpt2": "AutoModelForCausalLM",
          "llama": "AutoModelForCausalLM"}


def _hf_model(name: str, quick: bool, train: bool) -> nn.Module:
    tf = _transformers()
    auto = getattr(tf, _HEADS[name] if train else "AutoModel")
    model = auto.from_config(_hf_config(name, quick), attn_implementation="sdpa")
    if train and _HEADS[name] == "AutoModelForCausalLM":
        model.loss_type = "ForCausalLM"  # what transformers falls back to, without its warning
    return model


class ModelUnavailable(RuntimeError):
    """A model cannot be built here (``transformers`` missing); the message is the reason."""


# --- the registry -----------------------------------------------------------------------

@dataclass(frozen=True)
class ModelSpec:
    """One benchmarked model: how to build it and its inputs, and what a step computes.

    ``build(quick, train)`` returns the randomly initialized model (its mode is set by the
    harness); ``inputs(quick, batch, train, generator)`` a dict of tensors; ``forward(model,
    inputs, train)`` the inference output or the training loss. ``batch`` is the realistic
    batch (full, quick); ``layouts`` the memory formats it runs in."""

    name: str
    family: str  # "cnn" (BatchNorm), "unet" (GroupNorm), "transformer"
    summary: str  # the full configuration, in words
    quick_summary: str
    build: Callable[[bool, bool], nn.Module]
    inputs: Callable[..., dict]
    forward: Callable[[nn.Module, dict, bool], torch.Tensor]
    input_shape: Callable[[bool, int], tuple[int, ...]]
    batch: tuple[int, int]
    layouts: tuple[str, ...] = ("nchw",)
    requires: str | None = None  # an optional library it needs

    def available(self) -> str | None:
        """None where the model can be built, else why not."""
        if self.requires == "transformers":
            tf, why = transformers_status()
            return why if tf is None else None
        return None


def _image_inputs(channels: int, full: int, quick: int, classes: tuple[int, int] | None):
    def make(quick_: bool, batch: int, train: bool, g: torch.Generator) -> dict:
        size = quick if quick_ else full
        x = torch.randn(batch, channels, size, size, generator=g)
        out = {"x": x}
        if train:
            out["target"] = (torch.randint(0, classes[quick_], (batch,), generator=g)
                             if classes else torch.randn(x.shape, generator=g))
        return out
    return make


def _image_shape(channels: int, full: int, quick: int):
    return lambda quick_, batch: (batch, channels, quick if quick_ else full,
                                  quick if quick_ else full)


def _classify(model: nn.Module, inputs: dict, train: bool) -> torch.Tensor:
    out = model(inputs["x"])
    return F.cross_entropy(out, inputs["target"]) if train else out


def _denoise(model: nn.Module, inputs: dict, train: bool) -> torch.Tensor:
    out = model(inputs["x"])
    return F.mse_loss(out, inputs["target"]) if train else out


SEQ, QUICK_SEQ = 128, 16


def _token_inputs(name: str):
    def make(quick: bool, batch: int, train: bool, g: torch.Generator) -> dict:
        vocab = 128 if quick else {"bert": 30522, "gpt2": 50257, "llama": LLAMA["vocab_size"]}[name]
        ids = torch.randint(0, vocab, (batch, QUICK_SEQ if quick else SEQ), generator=g)
        out = {"input_ids": ids}
        if train:
            labels = ids.clone()
            if name == "bert":  # masked LM: predict 15% of the positions
                labels[torch.rand(ids.shape, generator=g) >= 0.15] = -100
            out["labels"] = labels
        return out
    return make


def _lm(model: nn.Module, inputs: dict, train: bool) -> torch.Tensor:
    if train:
        return model(input_ids=inputs["input_ids"], labels=inputs["labels"]).loss
    return model(input_ids=inputs["input_ids"]).last_hidden_state


def _tokens_shape(quick: bool, batch: int) -> tuple[int, int]:
    return (batch, QUICK_SEQ if quick else SEQ)


def _hf_spec(name: str, summary: str) -> ModelSpec:
    return ModelSpec(
        name, "transformer", summary,
        "width 32, 2 layers, 2 heads, vocabulary 128, 16 tokens",
        lambda quick, train: _hf_model(name, quick, train), _token_inputs(name), _lm,
        _tokens_shape, (8, 2), ("tokens",), requires="transformers")


def _resnet_spec(name: str, make: Callable[..., ResNet], summary: str,
                 quick_summary: str) -> ModelSpec:
    """A ResNet on 3x224x224 images and 1000 classes; quick: one block per stage, width 8,
    3x32x32 and 10 classes."""
    return ModelSpec(
        name, "cnn", summary, quick_summary,
        lambda quick, train: make(10, 8, (1, 1, 1, 1)) if quick else make(),
        _image_inputs(3, 224, 32, (1000, 10)), _classify, _image_shape(3, 224, 32), (16, 2),
        ("nchw", "channels_last"))


MODELS: dict[str, ModelSpec] = {
    "resnet18": _resnet_spec(
        "resnet18", resnet18, "torchvision ResNet-18 (BasicBlock [2, 2, 2, 2], 20 BatchNorm2d),"
        " 1000 classes, 3x224x224 images",
        "one BasicBlock per stage, widths 8-64, 10 classes, 3x32x32"),
    "resnet50": _resnet_spec(
        "resnet50", resnet50, "torchvision ResNet-50 (Bottleneck [3, 4, 6, 3], 53 BatchNorm2d),"
        " 1000 classes, 3x224x224 images",
        "one Bottleneck per stage, widths 8-256, 10 classes, 3x32x32"),
    "unet": ModelSpec(
        "unet", "unet", "diffusion U-Net block stack (ResBlocks of GroupNorm(32, C) + SiLU +"
        " Conv3x3, C=128 at 32x32 and C=256 at 16x16, 11 GroupNorms) on 4x32x32 latents;"
        " training: MSE to a random target",
        "C=32 at 8x8 and 64 at 4x4, GroupNorm(8, C), 4x8x8",
        lambda quick, train: UNetBlocks((32, 64), 8) if quick else UNetBlocks(),
        _image_inputs(4, 32, 8, None), _denoise, _image_shape(4, 32, 8), (16, 2),
        ("nchw", "channels_last")),
    "bert": _hf_spec("bert", "BERT-base (BertConfig(): 12 layers, width 768, 12 heads, 25"
                             " LayerNorms), 128 tokens; training: BertForMaskedLM, masked-LM"
                             " loss on 15% of the positions"),
    "gpt2": _hf_spec("gpt2", "GPT-2 small (GPT2Config(): 12 layers, width 768, 12 heads, 25"
                             " LayerNorms), 128 tokens; training: GPT2LMHeadModel, causal-LM"
                             " loss"),
    "llama": _hf_spec("llama", "Llama-style decoder (LlamaConfig: width 2048, MLP 5632, 32"
                               " heads, 4 KV heads, vocabulary 32000, 4 layers, 9 LlamaRMSNorms),"
                               " 128 tokens; training: LlamaForCausalLM, causal-LM loss"),
}
MODEL_NAMES = tuple(MODELS)
