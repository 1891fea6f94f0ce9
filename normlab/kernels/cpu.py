r"""The ``cpu`` backend: fused Numba kernels, forward and backward.

Implemented so far: LayerNorm and RMSNorm over rows (the input viewed as ``(M, D)``, ``D`` the
product of ``normalized_shape``), and BatchNorm on contiguous (NCHW-ordered) inputs viewed as
``(N, C, L)``. Other layouts and InstanceNorm/GroupNorm fall back to the reference engine until
their kernels land.

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

# No fastmath: reassociation would let LLVM rewrite (x - shift) - delta as x - (shift + delta)
# and sum(x - shift) as sum(x) - n * shift, the very cancellations the shifted statistics avoid
# (measured: 4e-3 error at 1e5 + N(0, 1) in fp32 with it, 1e-7 without).


@njit(cache=True, inline="always")
def _sum_shifted(row, shift, delta, square):  # pragma: no cover - compiled
    """sum of ((row - shift) - delta) (or of its square) in float64, in 8 independent
    accumulators: the order is fixed by this code, so it vectorizes without reassociation."""
    d = row.shape[0]
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = 0.0
    j = 0
    while j + 8 <= d:
        v0 = (row[j] - shift) - delta
        v1 = (row[j + 1] - shift) - delta
        v2 = (row[j + 2] - shift) - delta
        v3 = (row[j + 3] - shift) - delta
        v4 = (row[j + 4] - shift) - delta
        v5 = (row[j + 5] - shift) - delta
        v6 = (row[j + 6] - shift) - delta
        v7 = (row[j + 7] - shift) - delta
        if square:
            v0, v1, v2, v3 = v0 * v0, v1 * v1, v2 * v2, v3 * v3
            v4, v5, v6, v7 = v4 * v4, v5 * v5, v6 * v6, v7 * v7
        a0 += v0
        a1 += v1
        a2 += v2
        a3 += v3
        a4 += v4
        a5 += v5
        a6 += v6
        a7 += v7
        j += 8
    tail = 0.0
    while j < d:
        v = (row[j] - shift) - delta
        tail += v * v if square else v
        j += 1
    return ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7)) + tail


@njit(parallel=True, cache=True)
def _rows_forward(x, w, b, eps, centered, y, mean, rstd):  # pragma: no cover - compiled
    m, d = x.shape
    for i in prange(m):
        row = x[i]
        shift = row[0] if centered else row[0] * 0  # x - shift is exact near the mean
        delta = _sum_shifted(row, shift, 0.0, False) / d if centered else 0.0
        ss = _sum_shifted(row, shift, delta, True)
        r = 1.0 / math.sqrt(ss / d + eps)
        mean[i] = shift + delta
        rstd[i] = r
        out = y[i]
        for j in range(d):
            out[j] = ((row[j] - shift) - delta) * r * w[j] + b[j]


@njit(parallel=True, cache=True)
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


@njit(parallel=True, cache=True)
def _channel_stats(x, shift, delta, var):  # pragma: no cover - compiled
    """Per-channel statistics of x (N, C, L) in one read: the mean is shift + delta, where
    shift = x[0, c, 0] (a sample of the channel: x - shift is exact and small) and delta the
    mean of x - shift, summed in float64 with the squares for the biased variance."""
    n, c, l = x.shape
    count = n * l
    for ch in prange(c):
        x0 = x[0, ch, 0]
        s1 = 0.0
        s2 = 0.0
        for i in range(n):
            for j in range(l):
                v = x[i, ch, j] - x0
                s1 += v
                s2 += v * v
        m1 = s1 / count
        shift[ch] = x[0, ch, 0]
        delta[ch] = m1
        var[ch] = max(s2 / count - m1 * m1, 0.0)


@njit(parallel=True, cache=True)
def _channel_affine(x, shift, delta, scale, bias, y):  # pragma: no cover - compiled
    """y = ((x - shift[c]) - delta[c]) * scale[c] + bias[c] over x (N, C, L). Not folded into
    x * a + b: for inputs with a large mean the two terms of that sum cancel in fp32."""
    n, c, l = x.shape
    for k in prange(n * c):
        i, ch = k // c, k % c
        s0, d0, a, b = shift[ch], delta[ch], scale[ch], bias[ch]
        for j in range(l):
            y[i, ch, j] = ((x[i, ch, j] - s0) - d0) * a + b


@njit(parallel=True, cache=True)
def _channel_grad_sums(x, dy, mean, rstd, sum_dy, sum_dy_xhat):  # pragma: no cover - compiled
    n, c, l = x.shape
    for ch in prange(c):
        mu, r = mean[ch], rstd[ch]
        s1 = 0.0
        s2 = 0.0
        for i in range(n):
            for j in range(l):
                g = dy[i, ch, j]
                s1 += g
                s2 += g * (x[i, ch, j] - mu)
        sum_dy[ch] = s1
        sum_dy_xhat[ch] = s2 * r


@njit(parallel=True, cache=True)
def _channel_dx(x, dy, mean, rstd, w, sum_dy, sum_dy_xhat, input_stats, dx):  # pragma: no cover
    """dx = w rstd (dy - sum(dy)/m - xhat sum(dy xhat)/m), or w rstd dy for given statistics."""
    n, c, l = x.shape
    count = n * l
    for k in prange(n * c):
        i, ch = k // c, k % c
        mu, r = mean[ch], rstd[ch]
        a = w[ch] * r
        c2 = sum_dy[ch] / count if input_stats else 0.0
        c1 = sum_dy_xhat[ch] / count if input_stats else 0.0
        for j in range(l):
            xh = (x[i, ch, j] - mu) * r
            dx[i, ch, j] = a * (dy[i, ch, j] - c2 - xh * c1)


class _BatchNorm(torch.autograd.Function):
    """BatchNorm over a contiguous (N, C, *) input with statistics from x (training) or given
    running statistics (eval)."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, running_mean, running_var, input_stats):
        acc = E.compute_dtype(x.dtype)
        _threads()
        c = x.shape[1]
        xs = _np(x.reshape(x.shape[0], c, -1), acc)
        if input_stats:
            shift, delta, var = (np.empty(c, xs.dtype) for _ in range(3))
            _channel_stats(xs, shift, delta, var)
        else:
            shift, var = _np(running_mean, acc), _np(running_var, acc)
            delta = np.zeros_like(shift)
        rstd = (1.0 / np.sqrt(var + eps)).astype(xs.dtype)
        scale = (rstd * _param(weight, c, 1.0, acc)).astype(xs.dtype)
        y = np.empty_like(xs)
        _channel_affine(xs, shift, delta, scale, _param(bias, c, 0.0, acc), y)
        mean = shift + delta
        mean_t = torch.from_numpy(mean.astype(xs.dtype))
        var_t = torch.from_numpy(var.astype(xs.dtype))
        ctx.save_for_backward(x, weight, mean_t, torch.from_numpy(rstd))
        ctx.input_stats = input_stats
        ctx.bias_meta = None if bias is None else (bias.shape, bias.dtype)
        ctx.mark_non_differentiable(mean_t, var_t)
        return torch.from_numpy(y).to(x.dtype).reshape(x.shape), mean_t, var_t

    @staticmethod
    def backward(ctx, dy, _dmean, _dvar):
        _no_double_backward()
        x, weight, mean, rstd = ctx.saved_tensors
        acc, c = E.compute_dtype(x.dtype), x.shape[1]
        xs = _np(x.reshape(x.shape[0], c, -1), acc)
        g = _np(dy.reshape(x.shape[0], c, -1), acc)
        sum_dy, sum_dy_xhat = np.empty(c, xs.dtype), np.empty(c, xs.dtype)
        _channel_grad_sums(xs, g, mean.numpy(), rstd.numpy(), sum_dy, sum_dy_xhat)
        gx = None
        if ctx.needs_input_grad[0]:
            dx = np.empty_like(xs)
            _channel_dx(xs, g, mean.numpy(), rstd.numpy(), _param(weight, c, 1.0, acc), sum_dy,
                        sum_dy_xhat, ctx.input_stats, dx)
            gx = torch.from_numpy(dx).to(x.dtype).reshape(x.shape)
        gw, gb = _param_grads(ctx, weight, sum_dy_xhat, sum_dy)
        return gx, gw, gb, None, None, None, None


def _no_double_backward() -> None:
    # Grad mode is on inside backward exactly when create_graph=True was asked for.
    if torch.is_grad_enabled():
        raise RuntimeError(
            "normlab's cpu kernels are differentiable once; for create_graph=True (double "
            "backward, gradient penalties) use normlab.backend('reference')"
        )


def _threads() -> None:
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))


def _np(t: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
    return t.detach().to(dtype).contiguous().numpy()


def _param(p: torch.Tensor | None, d: int, fill: float, dtype: torch.dtype) -> np.ndarray:
    """A parameter as a length-d array in the compute dtype; ``fill`` when it is None."""
    if p is None:
        return np.full(d, fill, dtype=np.float64 if dtype == torch.float64 else np.float32)
    return _np(p.reshape(d), dtype)


def _param_grads(ctx, weight, dw: np.ndarray, db: np.ndarray):
    """The weight and bias gradients (or None where not needed) from their summed arrays."""
    gw = gb = None
    if ctx.needs_input_grad[1]:
        gw = torch.from_numpy(dw).reshape(weight.shape).to(weight.dtype)
    if ctx.needs_input_grad[2]:
        shape, dtype = ctx.bias_meta
        gb = torch.from_numpy(db).reshape(shape).to(dtype)
    return gw, gb


class _RowNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, d, eps, centered):
        acc = E.compute_dtype(x.dtype)
        _threads()
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
    def backward(ctx, dy):
        _no_double_backward()
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
        gw, gb = _param_grads(ctx, weight, dw.sum(0), db.sum(0))
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

    def batch_norm(self, x, running_mean, running_var, weight, bias, training, momentum, eps):
        if x.device.type != "cpu" or x.numel() == 0 or not x.is_contiguous():
            # channels_last and strided inputs: not fused yet
            return _REFERENCE.batch_norm(
                x, running_mean, running_var, weight, bias, training, momentum, eps
            )
        y, mean, var = _BatchNorm.apply(x, weight, bias, eps, running_mean, running_var, training)
        if training:
            count = x.numel() // x.shape[1]
            E.update_running_stats(running_mean, running_var, mean, var, count, momentum)
        return y

    # Not fused yet: the reference engine.
    instance_norm = staticmethod(_REFERENCE.instance_norm)
    group_norm = staticmethod(_REFERENCE.group_norm)


BACKEND = CpuBackend()
