r"""ScaleNorm (Nguyen & Salazar, 2019, *Transformers without Tears*): each row scaled to one
learned length,

.. math::

    y = g\,\frac{x}{\max(\lVert x\rVert_2, \epsilon)}

with the L2 norm over the trailing ``normalized_shape`` axes and one scalar :math:`g`,
initialized to :math:`\sqrt{d}` (``d`` the number of normalized elements), so that at
initialization the output has RMS 1 like RMSNorm's. It is declared once, through
:mod:`normlab.registry`: the function, the module, every backend (the engine computes it), the
axes figure, ``normlab explain scalenorm`` and the conformance tests follow from the
declaration.

>>> scale_norm(torch.tensor([[3., 4.]]), (2,))  # g = 1: the row at unit length
tensor([[0.6000, 0.8000]])
"""
from __future__ import annotations

import math

import torch

from ... import _engine as E
from ... import registry

__all__ = ["ScaleNorm", "scale_norm"]


def scale_reduction(shape: tuple[int, ...], normalized_ndim: int) -> E.Reduction:
    """ScaleNorm: one L2 norm per leading index, over the trailing ``normalized_ndim`` axes,
    clamped below at eps; one scalar scale."""
    lead = len(shape) - normalized_ndim
    return E.Reduction(tuple(shape), tuple(range(lead, len(shape))), (1,) * len(shape),
                       centered=False, averaged=False, clamp_eps=True)


def _oracle(x, normalized_shape, weight, bias, eps):
    dims = tuple(range(x.dim() - len(normalized_shape), x.dim()))
    y = x / torch.linalg.vector_norm(x, dim=dims, keepdim=True).clamp_min(eps)
    return y if weight is None else y * weight


SPEC = registry.declare(
    "scale_norm", "ScaleNorm", scale_reduction,
    lambda shape, normalized_shape: {"normalized_ndim": len(normalized_shape)},
    input="rows", params="scalar", bias=False, eps=1e-5, oracle=_oracle, aliases=("SN",),
    weight_init=lambda normalized_shape: math.sqrt(math.prod(normalized_shape)),
    summary="one L2 norm per leading index over the trailing axes, one scalar scale",
    where=__name__,
    fn_doc=r"""ScaleNorm of ``input`` over its trailing ``normalized_shape`` axes:
    ``weight * input / max(||input||_2, eps)``, ``weight`` a one-element tensor (or None).""",
    module_doc=r"""ScaleNorm (Nguyen & Salazar, 2019): ``g * x / max(||x||_2, eps)`` over the
    trailing ``normalized_shape`` axes, with one learned scalar ``g`` (``weight``, shape (1,),
    initialized to sqrt(d)); ``elementwise_affine=False`` drops it.

    >>> ScaleNorm(4)(torch.tensor([[1., 1., 1., 1.]])).detach()
    tensor([[1., 1., 1., 1.]])
    """)
scale_norm = SPEC.fn
ScaleNorm = SPEC.classes[0]
