"""Drop-in normalization modules: subclasses of the torch classes of the same names whose
forward runs on normlab's engine. ``isinstance``, ``state_dict`` keys, ``extra_repr``,
checkpoint loading and train/eval semantics are torch's own. ``AddLayerNorm`` and ``AddRMSNorm``
are LayerNorm and RMSNorm with a residual add fused in: ``forward(input, residual)`` returns
``(output, input + residual)``. ``MaskedBatchNorm1d`` is BatchNorm1d over the real positions of
padded sequences: ``forward(input, mask)``."""
from .batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from .instancenorm import InstanceNorm1d, InstanceNorm2d, InstanceNorm3d
from .masked import MaskedBatchNorm1d
from .normalization import AddLayerNorm, AddRMSNorm, GroupNorm, LayerNorm, RMSNorm

__all__ = [
    "BatchNorm1d", "BatchNorm2d", "BatchNorm3d",
    "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d",
    "GroupNorm", "LayerNorm", "RMSNorm", "AddLayerNorm", "AddRMSNorm", "MaskedBatchNorm1d",
]
