"""``normlab.patch``: swap torch's normalization modules in a model for normlab's twins."""
from __future__ import annotations

import torch

from . import nn as _nn

# Exact torch classes only: a user subclass may override forward, and is left alone.
TWINS: dict[type, type] = {
    torch.nn.BatchNorm1d: _nn.BatchNorm1d,
    torch.nn.BatchNorm2d: _nn.BatchNorm2d,
    torch.nn.BatchNorm3d: _nn.BatchNorm3d,
    torch.nn.InstanceNorm1d: _nn.InstanceNorm1d,
    torch.nn.InstanceNorm2d: _nn.InstanceNorm2d,
    torch.nn.InstanceNorm3d: _nn.InstanceNorm3d,
    torch.nn.GroupNorm: _nn.GroupNorm,
    torch.nn.LayerNorm: _nn.LayerNorm,
    torch.nn.RMSNorm: _nn.RMSNorm,
}


def patch(model: torch.nn.Module) -> torch.nn.Module:
    """Make every torch normalization module inside ``model`` (``model`` itself included) run
    on normlab, in place, and return ``model``.

    Each module's class is switched to its normlab twin, a subclass that adds no state, so the
    module keeps its identity, parameters (an optimizer built before still works), buffers,
    hooks, train/eval mode and device. Works on any model: torchvision-, timm- or
    Hugging Face-style. Subclasses of the torch norms (which may override ``forward``) are left
    as they are. Patching twice changes nothing.

    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
    >>> type(patch(model)[1]).__module__
    'normlab.nn.batchnorm'
    """
    for module in model.modules():
        twin = TWINS.get(type(module))
        if twin is not None:
            module.__class__ = twin
    return model
