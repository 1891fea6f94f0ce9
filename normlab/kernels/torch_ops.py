"""The ``torch`` backend: ATen's own kernels, kept as the peer that normlab's backends are
compared and benchmarked against, and the side of ``auto`` that ATen computes.

The calls go to the ATen operators themselves (``torch.layer_norm``, ...), as
``torch.nn.functional`` does once its checks pass: normlab's functions have made the same
checks (and named the mistake) before a backend is called. GroupNorm keeps
``torch.nn.functional.group_norm`` for its one check normlab does not make (it refuses groups
of one value, as torch does)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .reference import BACKEND as _REFERENCE


class TorchBackend:
    name = "torch"

    def batch_norm(self, x, running_mean, running_var, weight, bias, training, momentum, eps):
        return torch.batch_norm(x, weight, bias, running_mean, running_var, training, momentum,
                                eps, True)

    def instance_norm(
        self, x, running_mean, running_var, weight, bias, use_input_stats, momentum, eps
    ):
        return torch.instance_norm(x, weight, bias, running_mean, running_var, use_input_stats,
                                   momentum, eps, True)

    def group_norm(self, x, num_groups, weight, bias, eps):
        return F.group_norm(x, num_groups, weight, bias, eps)

    def layer_norm(self, x, normalized_shape, weight, bias, eps):
        return torch.layer_norm(x, normalized_shape, weight, bias, eps, True)

    def rms_norm(self, x, normalized_shape, weight, eps):
        return torch.rms_norm(x, normalized_shape, weight, eps)

    # The unfused torch composition, the peer of the fused kernels.
    def add_layer_norm(self, x, residual, normalized_shape, weight, bias, eps):
        h = x + residual
        return torch.layer_norm(h, normalized_shape, weight, bias, eps, True), h

    def add_rms_norm(self, x, residual, normalized_shape, weight, eps):
        h = x + residual
        return torch.rms_norm(h, normalized_shape, weight, eps), h

    def normalize(self, x, red, weight, bias, eps):
        """A norm torch does not have (:mod:`normlab.registry`): the reference engine."""
        return _REFERENCE.normalize(x, red, weight, bias, eps)


BACKEND = TorchBackend()
