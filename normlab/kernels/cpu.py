r"""The ``cpu`` backend: fused Numba kernels, forward and backward.

Implemented so far: LayerNorm and RMSNorm over rows (the input viewed as ``(M, D)``, ``D`` the
product of ``normalized_shape``). BatchNorm, InstanceNorm and GroupNorm fall back to the
reference engine until their kernels land.

Each row is read from memory once per pass while it sits in cache: the corrected two-pass
statistics (shift = first element, residual mean, centered sum of squares) and the normalize
step run on the same cache-resident row. Backward recomputes :math:`\hat x` from the saved
``mean``/``rstd`` and writes weight/bias gradients as one partial sum per thread block, then
reduces them in a fixed order: no atomics, results are deterministic for a thread count.

Kernels compile on first use (``cache=True`` keeps them on disk); importing normlab compiles
nothing. Numba's threads follow ``torch.get_num_threads()`` at each call.
"""
from __future__ import annotations

import math

import numba
import numpy as np
import torch
from numba import njit, prange

from .. import _engine as E
from .reference import BACKEND as _REFERENCE

# Reassociation lets the row reductions vectorize; no 'nnan'/'ninf', so NaN and inf propagate.
_FAST = {"reassoc", "contract", "nsz", "arcp"}


@njit(parallel=True, cache=True, fastmath=_FAST)
def _rows_forward(x, w, b, eps, centered, y, mean, rstd):  # pragma: no cover - compiled
    m, d = x.shape
    for i in prange(m):
        row = x[i]
        shift = row[0] if centered else row[0] * 0  # x - shift is exact near the mean
        delta = 0.0
        if centered:
            for j in range(d):
                delta += row[j] - shift
            delta /= d
        ss = 0.0
        for j in range(d):
            c = (row[j] - shift) - delta
            ss += c * c
        r = 1.0 / math.sqrt(ss / d + eps)
        mean[i] = shift + delta
        rstd[i] = r
        out = y[i]
        for j in range(d):
            out[j] = ((row[j] - shift) - delta) * r * w[j] + b[j]


@njit(parallel=True, cache=True, fastmath=_FAST)
def _rows_backward(x, w, dy, mean, rstd, centered, blocks, dx, dw_part, db_part):  # pragma: no cover
    m, d = x.shape
    per = (m + blocks - 1) // blocks
    for t in prange(blocks):
        dwt = dw_part[t]
        dbt = db_part[t]
        for i in range(t * per, min(m, (t + 1) * per)):
            row, g_row = x[i], dy[i]
            mu, r = mean[i], rstd[i]
            c1 = 0.0  # mean of (dy * w) * xhat
            c2 = 0.0  # mean of dy * w
            for j in range(d):
                xh = (row[j] - mu) * r
                g = g_row[j]
                dwt[j] += g * xh
                dbt[j] += g
                gw = g * w[j]
                c1 += gw * xh
                c2 += gw
            c1 /= d
            c2 = c2 / d if centered else 0.0
            out = dx[i]
            for j in range(d):
                xh = (row[j] - mu) * r
                out[j] = r * (g_row[j] * w[j] - c2 - xh * c1)


def _np(t: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
    return t.detach().to(dtype).contiguous().numpy()


def _param(p: torch.Tensor | None, d: int, fill: float, dtype: torch.dtype) -> np.ndarray:
    return np.full(d, fill, dtype=np.float64 if dtype == torch.float64 else np.float32) if (
        p is None) else _np(p.reshape(d), dtype)


class _RowNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, d, eps, centered):
        acc = E.compute_dtype(x.dtype)
        numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))
        xs = _np(x.reshape(-1, d), acc)
        m = xs.shape[0]
        y = np.empty_like(xs)
        mean = np.empty(m, dtype=xs.dtype)
        rstd = np.empty(m, dtype=xs.dtype)
        _rows_forward(xs, _param(weight, d, 1.0, acc), _param(bias, d, 0.0, acc), eps, centered,
                      y, mean, rstd)
        ctx.save_for_backward(x, weight, torch.from_numpy(mean), torch.from_numpy(rstd))
        ctx.d, ctx.centered = d, centered
        ctx.bias_meta = None if bias is None else (bias.shape, bias.dtype)
        return torch.from_numpy(y).to(x.dtype).reshape(x.shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, weight, mean, rstd = ctx.saved_tensors
        d, acc = ctx.d, E.compute_dtype(x.dtype)
        xs, g = _np(x.reshape(-1, d), acc), _np(dy.reshape(-1, d), acc)
        blocks = max(1, min(numba.get_num_threads(), xs.shape[0]))
        dx = np.empty_like(xs)
        dw = np.zeros((blocks, d), dtype=xs.dtype)
        db = np.zeros((blocks, d), dtype=xs.dtype)
        _rows_backward(xs, _param(weight, d, 1.0, acc), g, mean.numpy(), rstd.numpy(),
                       ctx.centered, blocks, dx, dw, db)
        gx = torch.from_numpy(dx).to(x.dtype).reshape(x.shape) if ctx.needs_input_grad[0] else None
        gw = gb = None
        if ctx.needs_input_grad[1]:
            gw = torch.from_numpy(dw.sum(0)).reshape(weight.shape).to(weight.dtype)
        if ctx.needs_input_grad[2]:
            shape, dtype = ctx.bias_meta
            gb = torch.from_numpy(db.sum(0)).reshape(shape).to(dtype)
        return gx, gw, gb, None, None, None


class CpuBackend:
    name = "cpu"

    def _rows(self, x, normalized_shape, weight, bias, eps, centered):
        if x.device.type != "cpu":
            raise RuntimeError(f"the cpu backend got a tensor on {x.device}; use it for CPU tensors")
        d = math.prod(normalized_shape)
        if x.numel() == 0 or d == 0:
            red = E.row_reduction(x.shape, len(normalized_shape), centered)
            return E.normalize(x, red, weight, bias, eps=eps)[0]
        return _RowNorm.apply(x, weight, bias, d, float(eps), centered)

    def layer_norm(self, x, normalized_shape, weight, bias, eps):
        return self._rows(x, normalized_shape, weight, bias, eps, True)

    def rms_norm(self, x, normalized_shape, weight, eps):
        return self._rows(x, normalized_shape, weight, None, eps, False)

    # Not fused yet: the reference engine.
    batch_norm = staticmethod(_REFERENCE.batch_norm)
    instance_norm = staticmethod(_REFERENCE.instance_norm)
    group_norm = staticmethod(_REFERENCE.group_norm)


BACKEND = CpuBackend()
