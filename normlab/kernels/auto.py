r"""``auto`` on CPU: per call, normlab's fused kernels (the ``cpu`` backend) or ATen's
(``torch.nn.functional``'s), whichever ran faster in the benchmark figures committed with the
code for that cell of

    (norm, layout, dtype, size class, pass)

* norm: ``batch_norm`` (batch statistics) and ``batch_norm_eval`` (running ones),
  ``instance_norm`` and ``instance_norm_eval`` (``use_input_stats=False``), ``group_norm``,
  ``layer_norm``, ``rms_norm``, ``add_layer_norm``, ``add_rms_norm``;
* layout: ``rows`` (the row norms), ``nchw`` (contiguous, or any other strides: both copy
  them), ``channels_last`` (``x.movedim(1, -1)`` dense) and ``nc`` (2-D ``(N, C)`` inputs);
* dtype: float32, float64, bfloat16, float16;
* size class: ``x.numel()`` in bands of a factor 4, :data:`CLASS_EDGES`;
* pass: ``fwd`` (no gradient recorded: under ``torch.no_grad()`` or with no input requiring
  one) or ``train`` (autograd records the call; judged by forward + backward).

The figures are ``normlab bench --dispatch`` (:mod:`normlab.bench.dispatch`), which times both
backends through normlab's own functional layer, interleaved, and writes
:data:`TABLE_FILE`; a cell missing from it runs the kernels. Only calls that ATen computes as
normlab does are eligible: every given parameter, running statistic and residual has the
input's dtype (ATen rejects or casts mixed ones differently). ``normlab.backend("cpu")`` and
``normlab.backend("torch")`` still force one side everywhere.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

TABLE_FILE = Path(__file__).with_name("cpu_dispatch.json")
#: Upper bounds (exclusive) of the size classes 0..6 in elements of x; class 7 is the rest.
CLASS_EDGES = (1 << 12, 1 << 14, 1 << 16, 1 << 18, 1 << 20, 1 << 22, 1 << 24)
NORMS = ("batch_norm", "batch_norm_eval", "instance_norm", "instance_norm_eval", "group_norm",
         "layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm")
LAYOUTS = ("rows", "nchw", "channels_last", "nc")
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
          "float16": torch.float16}
PASSES = ("fwd", "train")
KERNELS, ATEN = "k", "a"  # a cell's choice, one character per size class in the table


def size_class(numel: int) -> int:
    """The size class of an input of ``numel`` elements (0: under 4096; 7: 16M and more).

    >>> [size_class(n) for n in (1, 4095, 4096, 16383, 16384, 1 << 24, 1 << 30)]
    [0, 0, 1, 1, 2, 7, 7]
    """
    k = (numel.bit_length() - 11) >> 1
    return 0 if k < 0 else (k if k < 7 else 7)


def load_table(path: str | os.PathLike = TABLE_FILE) -> dict:
    """``{(norm, layout, dtype, train): (uses ATen per size class, ...)}`` from a table file
    (``{"choices": {"norm/layout/dtype/pass": "kkaa..."}, ...}``); empty when there is none."""
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}
    table = {}
    for key, row in data.get("choices", {}).items():
        norm, layout, dtype, pass_ = key.split("/")
        if norm not in NORMS or layout not in LAYOUTS or dtype not in DTYPES \
                or pass_ not in PASSES or len(row) != len(CLASS_EDGES) + 1 \
                or set(row) - {KERNELS, ATEN}:
            raise ValueError(f"{path}: bad dispatch table entry {key!r}: {row!r}")
        table[(norm, layout, DTYPES[dtype], pass_ == "train")] = tuple(c == ATEN for c in row)
    return table


def _channel_layout(x: torch.Tensor) -> str:
    if x.is_contiguous():
        return "nc" if x.dim() == 2 else "nchw"
    d = x.dim()
    if d == 4:
        return "channels_last" if x.is_contiguous(memory_format=torch.channels_last) else "nchw"
    return "channels_last" if d >= 3 and x.movedim(1, -1).is_contiguous() else "nchw"


class Auto:
    """The backend interface on two backends, ``kernels`` (normlab's ``cpu``) and ``aten``
    (ATen's ops, called directly: the same computation as ``torch.nn.functional``'s after
    normlab's own argument checks), chosen per call by ``table`` (:func:`load_table`)."""

    name = "auto"

    def __init__(self, kernels, table: dict):
        self.kernels, self.table = kernels, table

    def _aten(self, norm: str, layout: str, x: torch.Tensor, *tensors) -> bool:
        """Whether ATen computes this call: the table says so for its cell, and every given
        tensor has x's dtype."""
        dt = x.dtype
        grad = x.requires_grad
        for t in tensors:
            if t is not None:
                if t.dtype is not dt:
                    return False
                grad = grad or t.requires_grad
        row = self.table.get((norm, layout, dt, grad and torch.is_grad_enabled()))
        return row is not None and row[size_class(x.numel())]

    def layer_norm(self, x, normalized_shape, weight, bias, eps):
        if self._aten("layer_norm", "rows", x, weight, bias):
            return torch.layer_norm(x, normalized_shape, weight, bias, eps)
        return self.kernels.layer_norm(x, normalized_shape, weight, bias, eps)

    def rms_norm(self, x, normalized_shape, weight, eps):
        if self._aten("rms_norm", "rows", x, weight):
            return torch.rms_norm(x, normalized_shape, weight, eps)
        return self.kernels.rms_norm(x, normalized_shape, weight, eps)

    def group_norm(self, x, num_groups, weight, bias, eps):
        if self._aten("group_norm", _channel_layout(x), x, weight, bias):
            return torch.group_norm(x, num_groups, weight, bias, eps)
        return self.kernels.group_norm(x, num_groups, weight, bias, eps)

    def batch_norm(self, x, running_mean, running_var, weight, bias, training, momentum, eps):
        norm = "batch_norm" if training else "batch_norm_eval"
        if self._aten(norm, _channel_layout(x), x, weight, bias, running_mean, running_var):
            return torch.batch_norm(x, weight, bias, running_mean, running_var, training,
                                    momentum, eps, True)
        return self.kernels.batch_norm(x, running_mean, running_var, weight, bias, training,
                                       momentum, eps)

    def instance_norm(self, x, running_mean, running_var, weight, bias, use_input_stats,
                      momentum, eps):
        norm = "instance_norm" if use_input_stats else "instance_norm_eval"
        if self._aten(norm, _channel_layout(x), x, weight, bias, running_mean, running_var):
            return torch.instance_norm(x, weight, bias, running_mean, running_var,
                                       use_input_stats, momentum, eps, True)
        return self.kernels.instance_norm(x, running_mean, running_var, weight, bias,
                                          use_input_stats, momentum, eps)

    def add_layer_norm(self, x, residual, normalized_shape, weight, bias, eps):
        if self._aten("add_layer_norm", "rows", x, residual, weight, bias):
            h = x + residual
            return torch.layer_norm(h, normalized_shape, weight, bias, eps), h
        return self.kernels.add_layer_norm(x, residual, normalized_shape, weight, bias, eps)

    def add_rms_norm(self, x, residual, normalized_shape, weight, eps):
        if self._aten("add_rms_norm", "rows", x, residual, weight):
            h = x + residual
            return torch.rms_norm(h, normalized_shape, weight, eps), h
        return self.kernels.add_rms_norm(x, residual, normalized_shape, weight, eps)
