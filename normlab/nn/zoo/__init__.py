r"""The normalization zoo: layers from the literature beyond torch's five, on normlab's engine.

=======================  ===============================================  =====================
layer                    statistics                                       computed with
=======================  ===============================================  =====================
LayerNorm2d              per (n, *spatial) position, over C               ``layer_norm``
BatchRenorm1d/2d         per channel, over (N, *); corrected by r, d      ``batch_norm``
GhostBatchNorm1d/2d      per channel, over each virtual batch             ``batch_norm``
WSConv2d                 per output channel of the *weight*               ``layer_norm``
FilterResponseNorm2d     mean square per (n, c), over (H, W)              ``rms_norm``
TLU, DyT                 none (element-wise)                              torch
AdaIN                    per (n, c) of content and of style               ``instance_norm``
PartialRMSNorm           mean square of the first ceil(p d) elements      ``rms_norm`` / engine
ScaleNorm                L2 norm per row, over the trailing axes          the registry (engine)
=======================  ===============================================  =====================

Every module checks its input and says what to do about a mistake; statistics follow the
numerics policy of :mod:`normlab._engine` (at least float32, two-pass variance); outputs have the
input's dtype and, for channel-first layers, its memory format.

One module per family, the helpers they share in ``_common``; import the layers from here
(``normlab.nn.zoo``) or from :mod:`normlab.nn`:

=============================  ==============================================
module                         holds
=============================  ==============================================
``layer_norm2d``               LayerNorm2d
``batch_renorm``               BatchRenorm1d, BatchRenorm2d
``ghost_batch_norm``           GhostBatchNorm1d, GhostBatchNorm2d
``weight_standardization``     WSConv2d
``filter_response_norm``       FilterResponseNorm2d, TLU
``dynamic_tanh``               DyT
``adain``                      adaptive_instance_norm, AdaIN
``partial_rms_norm``           PartialRMSNorm
``scale_norm``                 ScaleNorm, scale_norm (a :mod:`normlab.registry` norm)
=============================  ==============================================
"""
from .adain import AdaIN, adaptive_instance_norm
from .batch_renorm import BatchRenorm1d, BatchRenorm2d
from .dynamic_tanh import DyT
from .filter_response_norm import TLU, FilterResponseNorm2d
from .ghost_batch_norm import GhostBatchNorm1d, GhostBatchNorm2d
from .layer_norm2d import LayerNorm2d
from .partial_rms_norm import PartialRMSNorm
from .scale_norm import ScaleNorm, scale_norm
from .weight_standardization import WSConv2d

__all__ = [
    "LayerNorm2d", "BatchRenorm1d", "BatchRenorm2d", "GhostBatchNorm1d", "GhostBatchNorm2d",
    "WSConv2d", "FilterResponseNorm2d", "TLU", "DyT", "AdaIN", "adaptive_instance_norm",
    "PartialRMSNorm", "ScaleNorm", "scale_norm",
]
