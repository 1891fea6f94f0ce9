"""The reference backend: normlab's statistics engine written with plain torch tensor ops.

Readable first: every norm is a :class:`~normlab._engine.Reduction` handed to
:func:`~normlab._engine.normalize`. It runs on any device and dtype torch supports, and it is
the oracle the fast backends are tested against.
"""
from __future__ import annotations

from .. import _engine as E


class ReferenceBackend:
    name = "reference"

    def batch_norm(self, x, running_mean, running_var, weight, bias, training, momentum, eps):
        red = E.batch_reduction(x.shape)
        if not training:
            return normalize_given(x, red, weight, bias, eps, running_mean, running_var)
        y, mean, var = E.normalize(x, red, weight, bias, eps=eps)
        E.update_running_stats(running_mean, running_var, mean, var, red.count, momentum)
        return y

    def instance_norm(
        self, x, running_mean, running_var, weight, bias, use_input_stats, momentum, eps
    ):
        red = E.instance_reduction(x.shape)
        if not use_input_stats:
            return normalize_given(x, red, weight, bias, eps, running_mean, running_var)
        y, mean, var = E.normalize(x, red, weight, bias, eps=eps)
        if x.shape[0] > 0:
            # torch's convention: the running statistics move towards the batch average of the
            # per-instance statistics (the variance unbiased per instance).
            E.update_running_stats(
                running_mean, running_var, mean.mean(0), var.mean(0), red.count, momentum
            )
        return y

    def group_norm(self, x, num_groups, weight, bias, eps):
        return E.normalize(x, E.group_reduction(x.shape, num_groups), weight, bias, eps=eps)[0]

    def layer_norm(self, x, normalized_shape, weight, bias, eps):
        red = E.row_reduction(x.shape, len(normalized_shape))
        return E.normalize(x, red, weight, bias, eps=eps)[0]

    def rms_norm(self, x, normalized_shape, weight, eps):
        red = E.row_reduction(x.shape, len(normalized_shape), centered=False)
        return E.normalize(x, red, weight, None, eps=eps)[0]

    # The residual add, then the engine on the rounded sum: y and h are consistent, and autograd
    # carries the gradients of both outputs back through the add.
    def add_layer_norm(self, x, residual, normalized_shape, weight, bias, eps):
        h = x + residual
        return self.layer_norm(h, normalized_shape, weight, bias, eps), h

    def add_rms_norm(self, x, residual, normalized_shape, weight, eps):
        h = x + residual
        return self.rms_norm(h, normalized_shape, weight, eps), h

    def normalize(self, x, red, weight, bias, eps):
        """Any other registered norm (:mod:`normlab.registry`): the engine on its reduction."""
        return E.normalize(x, red, weight, bias, eps=eps)[0]


def normalize_given(x, red, weight, bias, eps, running_mean, running_var):
    """x normalized by given per-channel statistics (BatchNorm and InstanceNorm in eval)."""
    per = E.per_channel(x.shape)
    return E.normalize(x, red, weight, bias, eps=eps, mean=running_mean.reshape(per),
                       var=running_var.reshape(per))[0]


BACKEND = ReferenceBackend()
