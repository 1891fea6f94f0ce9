"""The ``torch`` backend: ATen's own kernels through ``torch.nn.functional``, kept as the peer
that normlab's backends are compared and benchmarked against."""
from __future__ import annotations

import torch.nn.functional as F


class TorchBackend:
    name = "torch"

    def batch_norm(self, x, running_mean, running_var, weight, bias, training, momentum, eps):
        return F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)

    def instance_norm(
        self, x, running_mean, running_var, weight, bias, use_input_stats, momentum, eps
    ):
        return F.instance_norm(
            x, running_mean, running_var, weight, bias, use_input_stats, momentum, eps
        )

    def group_norm(self, x, num_groups, weight, bias, eps):
        return F.group_norm(x, num_groups, weight, bias, eps)

    def layer_norm(self, x, normalized_shape, weight, bias, eps):
        return F.layer_norm(x, normalized_shape, weight, bias, eps)

    def rms_norm(self, x, normalized_shape, weight, eps):
        return F.rms_norm(x, normalized_shape, weight, eps)

    # The unfused torch composition, the peer of the fused kernels.
    def add_layer_norm(self, x, residual, normalized_shape, weight, bias, eps):
        h = x + residual
        return F.layer_norm(h, normalized_shape, weight, bias, eps), h

    def add_rms_norm(self, x, residual, normalized_shape, weight, eps):
        h = x + residual
        return F.rms_norm(h, normalized_shape, weight, eps), h


BACKEND = TorchBackend()
