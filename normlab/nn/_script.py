"""``torch.jit.script`` of normlab's modules.

The drop-ins for torch's classes (``BatchNorm1d/2d/3d``, ``InstanceNorm1d/2d/3d``,
``GroupNorm``, ``LayerNorm``, ``RMSNorm``, and a patched model's modules that kept their
class's forward) script: their forward holds a ``torch.jit.is_scripting()`` branch calling
``torch.nn.functional``'s norm, which is what TorchScript compiles (it skips the other branch),
so the scripted module computes what torch's does. Other normlab modules (the zoo, the add
variants, SyncBatchNorm, a frozen BatchNorm, a patched subclass with its own forward) cannot be
compiled by TorchScript: scripting one raises a TypeError that says so and names
``torch.export``, which exports them.
"""
from __future__ import annotations

import torch


DROPINS: set = set()  # the drop-ins of torch's classes (normlab._norms registers them)
_METHODS = ("forward", "_apply_instance_norm")  # what the drop-ins compute with


class Scriptable:
    """Mixin of normlab's modules (the nine drop-ins, the zoo, SyncBatchNorm) and of patched
    classes: ``__prepare_scriptable__`` (called by ``torch.jit.script`` on each module) lets a
    module script only where its computing methods are a drop-in's, else raises."""

    def __prepare_scriptable__(self):
        cls = type(self)
        allowed = {None} | {getattr(d, m, None) for d in DROPINS for m in _METHODS}
        frozen = any("_normlab_unfrozen" in vars(c) for c in cls.__mro__)
        own = [m for m in _METHODS if getattr(cls, m, None) not in allowed]
        if frozen or own:
            why = ("a frozen BatchNorm (freeze_batchnorm) would unfreeze in a ScriptModule's "
                   "train()" if frozen else f"its {own[0]} runs normlab's Python code")
            raise TypeError(
                f"torch.jit.script cannot compile {cls.__qualname__} ({why}). Export the model "
                "with torch.export.export(model, args), which runs normlab's modules, or trace "
                "it with torch.jit.trace (which records ATen's operators).")
        return self
