"""Drop-in normalization modules: subclasses of the torch classes of the same names whose
forward runs on normlab's engine. ``isinstance``, ``state_dict`` keys, ``extra_repr``,
checkpoint loading and train/eval semantics are torch's own. ``AddLayerNorm`` and ``AddRMSNorm``
are LayerNorm and RMSNorm with a residual add fused in: ``forward(input, residual)`` returns
``(output, input + residual)``. ``MaskedBatchNorm1d`` is BatchNorm1d over the real positions of
padded sequences: ``forward(input, mask)``. ``SyncBatchNorm`` is BatchNorm over the global batch
of a ``torch.distributed`` process group (gloo on CPU, nccl on GPU). The zoo beyond torch's five (:mod:`.zoo`):
``LayerNorm2d``, ``BatchRenorm1d/2d``, ``GhostBatchNorm1d/2d``, ``WSConv2d``,
``FilterResponseNorm2d`` with ``TLU``, ``DyT``, ``AdaIN``, ``PartialRMSNorm`` and ``ScaleNorm``."""
from .batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from .instancenorm import InstanceNorm1d, InstanceNorm2d, InstanceNorm3d
from .masked import MaskedBatchNorm1d
from .normalization import AddLayerNorm, AddRMSNorm, GroupNorm, LayerNorm, RMSNorm
from .sync import SyncBatchNorm
from .zoo import (
    TLU, AdaIN, BatchRenorm1d, BatchRenorm2d, DyT, FilterResponseNorm2d, GhostBatchNorm1d,
    GhostBatchNorm2d, LayerNorm2d, PartialRMSNorm, ScaleNorm, WSConv2d, adaptive_instance_norm,
    scale_norm,
)

__all__ = [
    "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm",
    "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d",
    "GroupNorm", "LayerNorm", "RMSNorm", "AddLayerNorm", "AddRMSNorm", "MaskedBatchNorm1d",
    "LayerNorm2d", "BatchRenorm1d", "BatchRenorm2d", "GhostBatchNorm1d", "GhostBatchNorm2d",
    "WSConv2d", "FilterResponseNorm2d", "TLU", "DyT", "AdaIN", "adaptive_instance_norm",
    "PartialRMSNorm", "ScaleNorm", "scale_norm",
]
