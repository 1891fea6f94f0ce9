"""Model tools: swap a model's norms for another, fold BatchNorm into the preceding
Conv/Linear for inference, or freeze it for fine-tuning.

* :func:`swap_norms` - replace every BatchNorm (or any ``source`` class) by another norm, in
  place, keeping the parameters that map.
* :func:`fold_batchnorm` - an eval-mode copy with each BatchNorm that directly follows a
  Conv/ConvTranspose/Linear folded into its weights.
* :func:`freeze_batchnorm` / :func:`unfreeze_batchnorm` - BatchNorms that normalize with their
  running statistics and learn nothing, even after ``model.train()``.
"""
from .fold import fold_batchnorm
from .freeze import _frozen_instance, freeze_batchnorm, unfreeze_batchnorm  # noqa: F401  (old pickles)
from .swap import swap_norms

__all__ = ["swap_norms", "fold_batchnorm", "freeze_batchnorm", "unfreeze_batchnorm"]
