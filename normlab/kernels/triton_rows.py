r"""Triton kernels for row norms: LayerNorm, RMSNorm and the fused residual add + norm.

Every row of an ``(M, N)`` contiguous input is one statistics set (:math:`n = N` elements):

.. math::

    h = x + r \ \text{(optional, rounded to x's dtype)}, \qquad
    \mu = \langle h\rangle, \qquad
    \sigma^2 = \langle (h - \mu)^2\rangle, \qquad
    \hat h = (h - \mu)\,(\sigma^2 + \epsilon)^{-1/2}, \qquad
    y = \gamma\,\hat h + \beta

with :math:`\langle\cdot\rangle` the mean over the row; RMSNorm (``centered=False``) takes
:math:`\mu := 0`, so :math:`\sigma^2` is the mean square. Backward, with :math:`g = \gamma\,dy`:

.. math::

    dx = \mathrm{rstd}\,\bigl(g - \langle g\rangle - \hat x\,\langle g\,\hat x\rangle\bigr)
         \;(+\,dh), \qquad
    d\gamma = \textstyle\sum_{\text{rows}} dy\,\hat x, \qquad
    d\beta = \textstyle\sum_{\text{rows}} dy

(no :math:`\langle g\rangle` for RMSNorm; ``dh`` is a gradient arriving at the residual output).

Numerics (normlab's policy, see ``normlab/_engine.py``): statistics accumulate in float32
(float64 for float64 inputs) whatever the input dtype; the output is rounded once, in the input
dtype; ``h`` is ``(x + r)`` computed in the accumulation dtype and rounded to x's dtype, which
is bitwise torch's ``x + r`` (fp32 has more than 2p + 2 bits for fp16/bf16, so the double
rounding is innocuous). The variance never cancels on inputs with a large mean such as
1e4 + N(0, 1):

* one block per row (the row is in registers): a first sum gives the rounded mean ``s``; then
  ``d = h - s`` is (nearly) exact, ``delta = <d>`` recovers what rounding lost, and
  :math:`\sigma^2 = \langle d^2\rangle - \delta^2` (no cancellation: :math:`\delta` is a
  rounding error). Normalizing ``d - delta`` keeps y accurate to ~1e-6 even at 1e4 + N(0, 1).
* rows wider than a block: each chunk of ``BLOCK`` columns is shifted by the row's first element
  ``k`` (``h - k`` is exact for such data), its mean and centred sum of squares are computed from
  registers, and chunks are merged with Chan's formula, so the variance is robust to any shift.

Design
------
Forward, one block per row (``_fwd_tile``): grid ``cdiv(M, ROWS)``; a program normalizes a
``(ROWS, BLOCK)`` tile, ``BLOCK = next_pow2(N)``; ``ROWS > 1`` packs short rows (tiles of ~4K
elements). Bytes moved: read x (and r), write y (and h). Rows wider than the cap run
``_fwd_loop``: one program per row, a statistics pass over ``BLOCK``-column chunks (storing
``h`` on the way), then a normalize pass that re-reads the row (from L2 on a GPU).

Backward, one block per row (``_bwd_tile``): a persistent grid of ``P`` programs; program ``p``
takes row tiles ``p, p + P, ...`` (a fixed set, tiles of ~2K elements), computes dx from
registers and accumulates its ``dw``/``db`` partials in registers, stored once as row ``p`` of
a ``(P, N)`` float32 buffer. Bytes: read x, dy (and dh), write dx, plus the partials.
Wider rows: ``_bwd_row_sums`` (one program per row) loops over chunks for
:math:`\langle g\hat x\rangle` and :math:`\langle g\rangle`; then ``_bwd_cols`` runs a
``(P, C)`` grid, program ``(p, c)`` owning column chunk ``c`` of rows ``p, p + P, ...``: it
writes dx and keeps the chunk's ``dw``/``db`` partials in registers (x and dy are read twice).
Either way the ``(P, N)`` partials are summed over ``P`` by ``torch.sum`` (fixed order): no
atomics, so results are bitwise repeatable for a fixed ``P`` and differ across ``P`` only by
rounding. ``P`` is about as many programs as fit on the SMs at once on CUDA, and
``min(tiles, 4)`` in Triton's CPU interpreter.

Block caps (columns in one block, by element size, 2/4/8 bytes): forward 16384/8192/4096,
backward 8192/8192/2048 (it keeps ~5 values per element live: x, dy, weight and the two
partials). Warps: ~8 float32 values per thread, 4 to 32 warps (16 for the backward). With
these, ptxas for sm_90 reports no spills but ~12 bytes for the backward at 8192 columns.
``block=`` forces the cap (tests use it to exercise the loops).

In Triton's CPU interpreter (``TRITON_INTERPRET=1``, CPU tensors) the same kernels run in
NumPy; its float32 -> bfloat16 cast truncates, so there bfloat16 outputs are rounded to nearest
even with integer ops (``SOFT_BF16``), making interpreter results those of the GPU.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

# Columns in one block, by element size (sm_90, ptxas: no or tiny spills at these caps).
_FWD_CAP = {2: 16384, 4: 8192, 8: 4096}
_BWD_CAP = {2: 8192, 4: 8192, 8: 2048}
_FWD_TILE, _BWD_TILE = 4096, 2048  # elements per (ROWS, BLOCK) tile when rows are short
_CPU_PROGRAMS = 4  # persistent programs in the interpreter: few, so tests run fast


# --- kernels


@triton.jit
def _rne_bf16(v):
    """v rounded to bfloat16, nearest even, with integer ops: used only in Triton's CPU
    interpreter (``SOFT_BF16``), whose float32 -> bfloat16 cast truncates."""
    b = v.to(tl.float32).to(tl.uint32, bitcast=True)
    b = tl.where(v != v, 0x7FC00000, b + (0x7FFF + ((b >> 16) & 1)))
    return (b >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _fwd_tile(X, R, W, B, Y, H, Mean, Rstd, M, N, eps_hi, eps_lo,
              ROWS: tl.constexpr, BLOCK: tl.constexpr, CENTERED: tl.constexpr,
              HAS_RES: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
              SOFT_BF16: tl.constexpr):
    """Normalize a (ROWS, BLOCK) tile: rows [pid * ROWS, ...), every row whole (N <= BLOCK)."""
    acc = Rstd.dtype.element_ty
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    rmask = rows < M
    cmask = cols < N
    mask = rmask[:, None] & cmask[None, :]
    offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
    x = tl.load(X + offs, mask=mask, other=0.0)
    if HAS_RES:
        r = tl.load(R + offs, mask=mask, other=0.0)
        x = x.to(acc) + r.to(acc)
        if SOFT_BF16:
            x = _rne_bf16(x)
        x = x.to(X.dtype.element_ty)
        tl.store(H + offs, x, mask=mask)
    xf = x.to(acc)
    if CENTERED:
        shift = tl.sum(xf, axis=1) / N
        d = tl.where(mask, xf - shift[:, None], 0.0)
        delta = tl.sum(d, axis=1) / N
        var = tl.maximum(tl.sum(d * d, axis=1) / N - delta * delta, 0.0)
        mean = shift + delta
        xc = d - delta[:, None]
    else:
        var = tl.sum(xf * xf, axis=1) / N
        mean = tl.zeros_like(var)
        xc = xf
    rstd = 1.0 / tl.sqrt((var + eps_hi) + eps_lo)
    y = xc * rstd[:, None]
    if HAS_W:
        y = y * tl.load(W + cols, mask=cmask, other=0.0).to(acc)[None, :]
    if HAS_B:
        y = y + tl.load(B + cols, mask=cmask, other=0.0).to(acc)[None, :]
    if SOFT_BF16:
        y = _rne_bf16(y)
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(Mean + rows, mean, mask=rmask)
    tl.store(Rstd + rows, rstd, mask=rmask)


@triton.jit
def _fwd_loop(X, R, W, B, Y, H, Mean, Rstd, N, eps_hi, eps_lo,
              BLOCK: tl.constexpr, CENTERED: tl.constexpr,
              HAS_RES: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
              SOFT_BF16: tl.constexpr):
    """Normalize one row wider than BLOCK: a statistics pass over column chunks, then a
    normalize pass. Centered statistics are shifted by the row's first element and merged
    chunk by chunk with Chan's formula."""
    acc = Rstd.dtype.element_ty
    row = tl.program_id(0)
    base = row.to(tl.int64) * N
    cols = tl.arange(0, BLOCK)
    # The source of the normalize pass: h (stored by the first pass) or x.
    S = H if HAS_RES else X
    if CENTERED:
        k = tl.load(X + base).to(acc)
        if HAS_RES:
            k = k + tl.load(R + base).to(acc)
            if SOFT_BF16:
                k = _rne_bf16(k)
            k = k.to(X.dtype.element_ty).to(acc)
        zero = tl.zeros_like(k)
        count = zero
        mean_d = zero
        m2 = zero
    else:
        ss = tl.zeros([BLOCK], dtype=acc)
    for start in range(0, N, BLOCK):
        offs = start + cols
        mask = offs < N
        x = tl.load(X + base + offs, mask=mask, other=0.0)
        if HAS_RES:
            r = tl.load(R + base + offs, mask=mask, other=0.0)
            x = x.to(acc) + r.to(acc)
            if SOFT_BF16:
                x = _rne_bf16(x)
            x = x.to(X.dtype.element_ty)
            tl.store(H + base + offs, x, mask=mask)
        xf = x.to(acc)
        if CENTERED:
            n_b = (tl.minimum(N - start, BLOCK)).to(acc)
            d = tl.where(mask, xf - k, 0.0)
            mean_b = tl.sum(d, axis=0) / n_b
            e = tl.where(mask, d - mean_b, 0.0)
            m2_b = tl.sum(e * e, axis=0)
            n = count + n_b
            step = mean_b - mean_d
            mean_d = mean_d + step * (n_b / n)
            m2 = m2 + m2_b + step * step * (count * n_b / n)
            count = n
        else:
            ss += xf * xf
    if CENTERED:
        var = tl.maximum(m2 / N, 0.0)
        mean = k + mean_d
    else:
        var = tl.sum(ss, axis=0) / N
        mean = tl.zeros_like(var)
    rstd = 1.0 / tl.sqrt((var + eps_hi) + eps_lo)
    tl.store(Mean + row, mean)
    tl.store(Rstd + row, rstd)
    if HAS_RES:
        tl.debug_barrier()  # h written above is read back below
    for start in range(0, N, BLOCK):
        offs = start + cols
        mask = offs < N
        xf = tl.load(S + base + offs, mask=mask, other=0.0).to(acc)
        if CENTERED:
            xf = (xf - k) - mean_d
        y = xf * rstd
        if HAS_W:
            y = y * tl.load(W + offs, mask=mask, other=0.0).to(acc)
        if HAS_B:
            y = y + tl.load(B + offs, mask=mask, other=0.0).to(acc)
        if SOFT_BF16:
            y = _rne_bf16(y)
        tl.store(Y + base + offs, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _grad_partials(dw, db, dy, xhat, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr):
    """The dw, db partials plus dy * xhat, dy (each only if needed)."""
    if NEED_DW:
        dw += dy * xhat
    if NEED_DB:
        db += dy
    return dw, db


@triton.jit
def _store_dx(DX, DH, offs, mask, dx, acc: tl.constexpr, HAS_DH: tl.constexpr,
              SOFT_BF16: tl.constexpr):
    """Store dx (plus dh, when given), rounded once to DX's dtype."""
    if HAS_DH:
        dx += tl.load(DH + offs, mask=mask, other=0.0).to(acc)
    if SOFT_BF16:
        dx = _rne_bf16(dx)
    tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_tile(DY, X, W, Mean, Rstd, DH, DX, DW, DB, M, N,
              ROWS: tl.constexpr, BLOCK: tl.constexpr, CENTERED: tl.constexpr,
              HAS_W: tl.constexpr, HAS_DH: tl.constexpr, NEED_DX: tl.constexpr,
              NEED_DW: tl.constexpr, NEED_DB: tl.constexpr, SOFT_BF16: tl.constexpr):
    """Persistent backward for rows that fit one block: program p takes row tiles
    p, p + P, ...; dx from registers; dw/db partials kept in registers, stored as row p of the
    (P, N) partial buffers."""
    acc = Rstd.dtype.element_ty
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    cmask = cols < N
    if HAS_W:
        w = tl.load(W + cols, mask=cmask, other=0.0).to(acc)
    dw = tl.zeros([ROWS, BLOCK], dtype=acc)
    db = tl.zeros([ROWS, BLOCK], dtype=acc)
    for tile in range(pid, tl.cdiv(M, ROWS), tl.num_programs(0)):
        rows = tile * ROWS + tl.arange(0, ROWS)
        rmask = rows < M
        mask = rmask[:, None] & cmask[None, :]
        offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
        x = tl.load(X + offs, mask=mask, other=0.0).to(acc)
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(acc)
        rstd = tl.load(Rstd + rows, mask=rmask, other=0.0)
        if CENTERED:
            mean = tl.load(Mean + rows, mask=rmask, other=0.0)
            xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        else:
            xhat = x * rstd[:, None]
        dw, db = _grad_partials(dw, db, dy, xhat, NEED_DW, NEED_DB)
        if NEED_DX:
            if HAS_W:
                g = dy * w[None, :]
            else:
                g = dy
            c1 = tl.sum(g * xhat, axis=1) / N
            if CENTERED:
                c2 = tl.sum(g, axis=1) / N
                dx = (g - c2[:, None] - xhat * c1[:, None]) * rstd[:, None]
            else:
                dx = (g - xhat * c1[:, None]) * rstd[:, None]
            _store_dx(DX, DH, offs, mask, dx, acc, HAS_DH, SOFT_BF16)
    if NEED_DW:
        tl.store(DW + pid.to(tl.int64) * N + cols, tl.sum(dw, axis=0), mask=cmask)
    if NEED_DB:
        tl.store(DB + pid.to(tl.int64) * N + cols, tl.sum(db, axis=0), mask=cmask)


@triton.jit
def _bwd_row_sums(DY, X, W, Mean, Rstd, C1, C2, N,
                  BLOCK: tl.constexpr, CENTERED: tl.constexpr, HAS_W: tl.constexpr):
    """Wide rows, first pass: <g xhat> (into C1) and <g> (into C2) of one row."""
    acc = Rstd.dtype.element_ty
    row = tl.program_id(0)
    base = row.to(tl.int64) * N
    cols = tl.arange(0, BLOCK)
    rstd = tl.load(Rstd + row)
    if CENTERED:
        mean = tl.load(Mean + row)
    a1 = tl.zeros([BLOCK], dtype=acc)
    a2 = tl.zeros([BLOCK], dtype=acc)
    for start in range(0, N, BLOCK):
        offs = start + cols
        mask = offs < N
        x = tl.load(X + base + offs, mask=mask, other=0.0).to(acc)
        g = tl.load(DY + base + offs, mask=mask, other=0.0).to(acc)
        if HAS_W:
            g = g * tl.load(W + offs, mask=mask, other=0.0).to(acc)
        if CENTERED:
            xhat = (x - mean) * rstd
            a2 += g
        else:
            xhat = x * rstd
        a1 += g * xhat  # g is 0 where masked
    tl.store(C1 + row, tl.sum(a1, axis=0) / N)
    if CENTERED:
        tl.store(C2 + row, tl.sum(a2, axis=0) / N)


@triton.jit
def _bwd_cols(DY, X, W, Mean, Rstd, C1, C2, DH, DX, DW, DB, M, N,
              BLOCK: tl.constexpr, CENTERED: tl.constexpr, HAS_W: tl.constexpr,
              HAS_DH: tl.constexpr, NEED_DX: tl.constexpr, NEED_DW: tl.constexpr,
              NEED_DB: tl.constexpr, SOFT_BF16: tl.constexpr):
    """Wide rows, second pass: program (p, c) owns column chunk c of rows p, p + P, ...;
    writes dx and stores its dw/db partials as row p (columns of chunk c) of (P, N)."""
    acc = Rstd.dtype.element_ty
    pid = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    if HAS_W:
        w = tl.load(W + cols, mask=mask, other=0.0).to(acc)
    dw = tl.zeros([BLOCK], dtype=acc)
    db = tl.zeros([BLOCK], dtype=acc)
    for row in range(pid, M, tl.num_programs(0)):
        offs = tl.cast(row, tl.int64) * N + cols
        x = tl.load(X + offs, mask=mask, other=0.0).to(acc)
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(acc)
        rstd = tl.load(Rstd + row)
        if CENTERED:
            xhat = tl.where(mask, (x - tl.load(Mean + row)) * rstd, 0.0)
        else:
            xhat = x * rstd
        dw, db = _grad_partials(dw, db, dy, xhat, NEED_DW, NEED_DB)
        if NEED_DX:
            if HAS_W:
                g = dy * w
            else:
                g = dy
            dx = g - xhat * tl.load(C1 + row)
            if CENTERED:
                dx = dx - tl.load(C2 + row)
            dx = dx * rstd
            _store_dx(DX, DH, offs, mask, dx, acc, HAS_DH, SOFT_BF16)
    if NEED_DW:
        tl.store(DW + pid.to(tl.int64) * N + cols, dw, mask=mask)
    if NEED_DB:
        tl.store(DB + pid.to(tl.int64) * N + cols, db, mask=mask)


# --- launch planning

# Triton's CPU interpreter (TRITON_INTERPRET=1 when the module was imported) runs the kernels
# on CPU tensors; its bfloat16 rounding is emulated (see _cast).
_INTERPRETED = not isinstance(_fwd_tile, triton.runtime.JITFunction)


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _block(n: int, elsize: int, caps: dict, block: int | None) -> int:
    """Columns per block: next_pow2(N) up to the cap (``block`` forces the cap)."""
    cap = caps.get(elsize, 4096) if block is None else triton.next_power_of_2(max(1, block))
    return min(triton.next_power_of_2(n), cap)


def _rows(m: int, n: int, blk: int, tile: int) -> int:
    """Rows per tile when a row fits one block: tiles of ~``tile`` elements, at most M rows."""
    if blk < n:
        return 1
    return max(1, min(tile // blk, triton.next_power_of_2(m)))


def _warps(elements: int, acc: torch.dtype, most: int = 32) -> int:
    """Warps for a block of ``elements``: ~8 float32 (4 float64) values per thread, 4 to
    ``most`` warps. Checked with ptxas for sm_90: no spills at the caps, but for the backward
    at 8192 columns, which spills ~100 bytes at 32 warps (64 registers) and ~12 at 16."""
    per_warp = 32 * (4 if acc == torch.float64 else 8)
    return max(4, min(most, triton.next_power_of_2(triton.cdiv(elements, per_warp))))


@functools.lru_cache(maxsize=None)
def _sm_count(index: int | None) -> int:
    return torch.cuda.get_device_properties(
        torch.cuda.current_device() if index is None else index).multi_processor_count


def _programs(x: torch.Tensor, work: int, warps: int, split: int = 1) -> int:
    """Persistent backward programs over rows: on CUDA about as many as fit on the SMs at once
    (``split`` column chunks share them), ``_CPU_PROGRAMS`` in the interpreter; at most
    ``work``. More programs mean more (P, N) partials to write and sum."""
    if x.is_cuda:
        p = triton.cdiv(_sm_count(x.device.index) * max(1, min(4, 24 // warps)), split)
    else:
        p = _CPU_PROGRAMS
    return max(1, min(p, work))


def _eps(eps: float, acc: torch.dtype) -> tuple[float, float]:
    """eps as a float32 pair: Triton passes Python floats as fp32, so float64 rows rebuild the
    double eps in-kernel as hi + lo (48 significant bits)."""
    hi = float(torch.tensor(eps, dtype=torch.float32))
    lo = float(eps - hi) if acc == torch.float64 else 0.0
    return hi, lo


def _vec(p: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """A parameter as the kernels read it: contiguous; float64 for float64 x (the interpreter
    converts bf16 only to float32)."""
    if p is None:
        return x  # a dummy pointer, never read
    p = p.contiguous()
    return p.to(torch.float64) if x.dtype == torch.float64 else p


# --- public entry points


def rows_forward(x, weight, bias, eps: float, centered: bool, residual=None, *, block=None):
    """Row norm forward: LayerNorm (``centered``) or RMSNorm of ``x`` (or of ``x + residual``).

    Args:
        x: (M, N) contiguous, float32/float16/bfloat16/float64.
        weight, bias: (N,) or None.
        eps: added to the variance (mean square for RMSNorm).
        centered: LayerNorm if True, RMSNorm if False.
        residual: (M, N) in x's dtype or None; then ``h = x + residual`` (bitwise torch's sum)
            is normalized and returned.
        block: force the column block size (rounded up to a power of two).

    Returns:
        ``(y, h or None, mean, rstd)``: y (M, N) in x's dtype; mean (zeros for RMSNorm) and
        rstd (M,) in float32 (float64 for float64 x).
    """
    m, n = x.shape
    acc = _acc(x.dtype)
    x = x.contiguous()
    y = torch.empty_like(x)
    h = None if residual is None else torch.empty_like(x)
    mean = torch.empty(m, dtype=acc, device=x.device)
    rstd = torch.empty(m, dtype=acc, device=x.device)
    if m == 0 or n == 0:
        mean.zero_()
        rstd.fill_(float("nan"))  # as torch: the variance of an empty row is nan
        return y, h, mean, rstd
    res = x if residual is None else residual.contiguous()
    w, b = _vec(weight, x), _vec(bias, x)
    hi, lo = _eps(eps, acc)
    blk = _block(n, x.element_size(), _FWD_CAP, block)
    soft = _INTERPRETED and x.dtype == torch.bfloat16
    flags = dict(CENTERED=bool(centered), HAS_RES=residual is not None,
                 HAS_W=weight is not None, HAS_B=bias is not None, SOFT_BF16=soft)
    hh = y if h is None else h
    if blk >= n:
        rows = _rows(m, n, blk, _FWD_TILE)
        _fwd_tile[(triton.cdiv(m, rows),)](
            x, res, w, b, y, hh, mean, rstd, m, n, hi, lo,
            ROWS=rows, BLOCK=blk, num_warps=_warps(rows * blk, acc), **flags)
    else:
        _fwd_loop[(m,)](x, res, w, b, y, hh, mean, rstd, n, hi, lo,
                        BLOCK=blk, num_warps=_warps(blk, acc), **flags)
    return y, h, mean, rstd


def rows_backward(dy, x, weight, mean, rstd, centered: bool, dh=None, *, need_dx=True,
                  need_dw=True, need_db=True, block=None):
    """Row norm backward from the forward's ``mean`` and ``rstd``.

    Args:
        dy: (M, N) gradient of y, any float dtype (cast inside).
        x: the normalized input (``h`` for the add variant).
        weight: (N,) or None.
        mean, rstd: (M,) from :func:`rows_forward`.
        centered: LayerNorm if True, RMSNorm if False.
        dh: (M, N) or None: a gradient arriving at the residual output ``h``, added to dx.
        need_dx, need_dw, need_db: which gradients to compute (others are returned as None).
        block: force the column block size (rounded up to a power of two).

    Returns:
        ``(dx, dw, db)``: dx (M, N) in x's dtype; dw, db (N,) in float32 (float64 for float64
        x), summed over rows in a fixed order (deterministic).
    """
    m, n = x.shape
    acc = _acc(x.dtype)
    dev = x.device
    dx = torch.empty_like(x) if need_dx else None
    if m == 0 or n == 0 or not (need_dx or need_dw or need_db):
        zeros = torch.zeros(n, dtype=acc, device=dev)
        return dx, zeros if need_dw else None, zeros.clone() if need_db else None
    x = x.contiguous()
    dy = dy.contiguous()
    if x.dtype == torch.float64 and dy.dtype != torch.float64:
        dy = dy.to(torch.float64)
    if dh is not None:
        dh = dh.contiguous()
        if x.dtype == torch.float64 and dh.dtype != torch.float64:
            dh = dh.to(torch.float64)
    w = _vec(weight, x)
    mean, rstd = mean.contiguous(), rstd.contiguous()
    blk = _block(n, x.element_size(), _BWD_CAP, block)
    dummy = rstd
    soft = _INTERPRETED and x.dtype == torch.bfloat16
    flags = dict(CENTERED=bool(centered), HAS_W=weight is not None, NEED_DX=bool(need_dx),
                 NEED_DW=bool(need_dw), NEED_DB=bool(need_db), SOFT_BF16=soft)
    if blk >= n:
        rows = _rows(m, n, blk, _BWD_TILE)
        warps = _warps(rows * blk, acc, most=16)
        p = _programs(x, triton.cdiv(m, rows), warps)
        pw = torch.empty((p, n), dtype=acc, device=dev) if need_dw else dummy
        pb = torch.empty((p, n), dtype=acc, device=dev) if need_db else dummy
        _bwd_tile[(p,)](
            dy, x, w, mean, rstd, dummy if dh is None else dh, dx if need_dx else dummy,
            pw, pb, m, n, ROWS=rows, BLOCK=blk, HAS_DH=dh is not None,
            num_warps=warps, **flags)
    else:
        chunks = triton.cdiv(n, blk)
        warps = _warps(blk, acc, most=16)
        if need_dx:
            c1 = torch.empty(m, dtype=acc, device=dev)
            c2 = torch.empty(m, dtype=acc, device=dev) if centered else c1
            _bwd_row_sums[(m,)](dy, x, w, mean, rstd, c1, c2, n, BLOCK=blk,
                                CENTERED=bool(centered), HAS_W=weight is not None,
                                num_warps=warps)
        else:
            c1 = c2 = dummy
        p = _programs(x, m, warps, split=chunks)
        pw = torch.empty((p, n), dtype=acc, device=dev) if need_dw else dummy
        pb = torch.empty((p, n), dtype=acc, device=dev) if need_db else dummy
        _bwd_cols[(p, chunks)](
            dy, x, w, mean, rstd, c1, c2, dummy if dh is None else dh,
            dx if need_dx else dummy, pw, pb, m, n, BLOCK=blk, HAS_DH=dh is not None,
            num_warps=warps, **flags)
    dw = pw.sum(0) if need_dw else None
    db = pb.sum(0) if need_db else None
    return dx, dw, db
