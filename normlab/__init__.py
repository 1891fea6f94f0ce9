"""normlab: deep-learning normalization that is correct, fast and understandable.

* :mod:`normlab.functional` - ``batch_norm``, ``instance_norm``, ``group_norm``, ``layer_norm``,
  ``rms_norm`` with the signatures and semantics of ``torch.nn.functional``, and
  ``add_layer_norm``, ``add_rms_norm``: a residual add fused with the norm.
* :mod:`normlab.nn` - drop-in subclasses of the torch modules of the same names, and
  ``AddLayerNorm``, ``AddRMSNorm``.
* :func:`patch` - switch every torch normalization in a model to normlab, in place.
* :func:`swap_norms`, :func:`fold_batchnorm`, :func:`freeze_batchnorm` (:mod:`normlab.tools`) -
  change a model's normalization: another norm, BatchNorm folded into the convolution before
  it, or BatchNorm frozen for fine-tuning.
* :func:`backend` - force a backend (``"reference"``, ``"torch"``) inside a ``with`` block.
* :func:`background_warmup`, :func:`wait_for_kernels` - whether ``auto`` prepares the cpu
  kernels in a background thread (ATen computing meanwhile), and waiting for them.
* :mod:`normlab.registry` - the one list of norms that everything above iterates over.
"""
from . import functional, nn
from . import _norms  # noqa: F401  (registers torch's five norms: normlab.registry)
from . import registry
from ._dispatch import (available_backends, background_warmup, backend, current_backend,
                        wait_for_kernels)
from ._errors import ArgumentError, BackendUnavailableError, DTypeError, ShapeError
from ._patch import patch
from .tools import fold_batchnorm, freeze_batchnorm, swap_norms, unfreeze_batchnorm

__version__ = "0.1.0"

__all__ = [
    "functional", "nn", "registry", "patch", "swap_norms", "fold_batchnorm", "freeze_batchnorm",
    "unfreeze_batchnorm", "backend", "available_backends", "current_backend",
    "background_warmup", "wait_for_kernels",
    "ArgumentError", "ShapeError", "DTypeError", "BackendUnavailableError", "__version__",
]
