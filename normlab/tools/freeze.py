"""freeze_batchnorm / unfreeze_batchnorm: BatchNorm in eval mode that learns nothing."""
from __future__ import annotations

import functools
import warnings

import torch  # noqa: F401  (the examples below use it)
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .. import _classes
from ._common import _show


class _FrozenBatchNorm:
    """Mixin of the frozen BatchNorm classes: ``train(mode)`` always means eval."""

    def train(self, mode: bool = True):
        return super().train(False)

    # picklable, deep-copyable: rebuilt from the class it was made from (normlab._classes)
    __reduce_ex__ = _classes.reduce_ex


@functools.cache
def _frozen_class(base: type) -> type:
    return type(f"Frozen{base.__name__}", (_FrozenBatchNorm, base), {
        "__module__": __name__, "_normlab_unfrozen": base, "_normlab_made": ("frozen", base),
        "__doc__": f"A frozen {base.__name__}: see :func:`normlab.tools.freeze_batchnorm`.",
    })


_classes.register("frozen", _frozen_class)


def _frozen_instance(base: type) -> nn.Module:  # (what pickles of normlab <= 0.x hold)
    return object.__new__(_frozen_class(base))


def freeze_batchnorm(model: nn.Module) -> nn.Module:
    r"""Freeze every BatchNorm inside ``model`` (``model`` itself included), in place, and
    return ``model``.

    A frozen BatchNorm stays in eval mode whatever ``model.train()`` says, so it normalizes
    with its running statistics and never updates them,

    .. math::

        y = \frac{x - \mathrm{running\_mean}}{\sqrt{\mathrm{running\_var} + \epsilon}}
            \cdot \gamma + \beta,

    and its :math:`\gamma, \beta` get ``requires_grad=False`` (and their ``.grad`` is cleared).
    Gradients still flow through it to earlier layers. This is torchvision's
    ``FrozenBatchNorm2d`` (fine-tuning detection backbones with small batches) without its
    drawbacks: the module keeps its identity, is still an instance of its class (its class is
    switched to a ``Frozen<Name>`` subclass), keeps ``num_batches_tracked`` and its
    parameters, so the ``state_dict`` has the same keys and a checkpoint loads into the frozen
    and the unfrozen model alike; any BatchNorm (1d/2d/3d, ``SyncBatchNorm``, normlab's) can be
    frozen. A BatchNorm with ``track_running_stats=False`` has no statistics to freeze: its
    parameters are frozen and it keeps normalizing with batch statistics (with a warning).
    :func:`unfreeze_batchnorm` undoes it.

    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    >>> model = freeze_batchnorm(model)
    >>> model.train()[1].training, model[1].weight.requires_grad, type(model[1]).__name__
    (False, False, 'FrozenBatchNorm1d')
    """
    batch_stats = []
    for name, m in model.named_modules():
        if not isinstance(m, _BatchNorm) or isinstance(m, _FrozenBatchNorm):
            continue
        m._normlab_requires_grad = {k: p.requires_grad
                                    for k, p in m.named_parameters(recurse=False)}
        m.__class__ = _frozen_class(type(m))
        for p in m.parameters(recurse=False):
            p.requires_grad_(False)
            p.grad = None
        m.train(False)
        if m.running_mean is None:
            batch_stats.append(name)
    if batch_stats:
        warnings.warn(
            "freeze_batchnorm: " + ", ".join(map(_show, batch_stats)) + " track no running "
            "statistics (track_running_stats=False): only their parameters are frozen, they "
            "keep normalizing with batch statistics", stacklevel=2)
    return model


def unfreeze_batchnorm(model: nn.Module) -> nn.Module:
    """Undo :func:`freeze_batchnorm` in place and return ``model``: each frozen BatchNorm gets
    its class and its parameters' ``requires_grad`` back, and the train/eval mode of ``model``.

    >>> model = unfreeze_batchnorm(freeze_batchnorm(torch.nn.BatchNorm2d(3)))
    >>> type(model).__name__, model.training, model.weight.requires_grad
    ('BatchNorm2d', False, True)
    """
    for m in list(model.modules()):
        base = vars(type(m)).get("_normlab_unfrozen")
        if base is None:
            continue
        m.__class__ = base
        flags = m.__dict__.pop("_normlab_requires_grad", {})
        for k, p in m.named_parameters(recurse=False):
            p.requires_grad_(flags.get(k, True))
        m.training = model.training
    return model
