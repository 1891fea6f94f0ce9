"""bfloat16 and float16 as their bit patterns: bfloat16 as uint16, float16 as int16 (the
array's dtype picks the format at compile time, each a separate specialization), computed in
float32. Numba has no float16 on the CPU (``NotImplementedError: float16``): the conversions are
LLVM instructions emitted by two ``@intrinsic``s, exact and vectorized. The 16-bit kernels
widen each contiguous slice into a float32 scratch that stays in L1, run the float32 routines on
it and round the outputs back: no full-size float32 copy of x, dy, y or dx is made.
"""
from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from .jit import guard_caches, jit

# pragma: no cover throughout: compiled code is not seen by coverage.


def _half(t):
    """'bf16' (uint16 bits), 'f16' (int16 bits) or None: the 16-bit format of a Numba type."""
    return {types.uint16: "bf16", types.int16: "f16"}.get(t)


@intrinsic
def h2f(typingctx, h):  # pragma: no cover
    """16-bit bits -> float32, exact. bfloat16 (uint16): the bits shifted into the high half;
    float16 (int16): LLVM's ``fpext half`` (F16C ``vcvtph2ps``)."""
    kind = _half(h)
    if kind is None:
        return None

    def codegen(context, builder, sig, args):
        if kind == "f16":
            return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())
        u = builder.zext(args[0], ir.IntType(32))
        return builder.bitcast(builder.shl(u, ir.Constant(ir.IntType(32), 16)), ir.FloatType())
    return types.float32(h), codegen


@intrinsic
def f2h(typingctx, f, dt):  # pragma: no cover
    """float32 -> 16-bit bits of the format of dtype ``dt``, round to nearest even. bfloat16:
    integer ops on the bits, ``(b + 0x7FFF + lsb) >> 16``, NaN -> 0x7FC0 (as c10::BFloat16),
    inf and overflow as torch; float16: LLVM's ``fptrunc`` to ``half`` (F16C ``vcvtps2ph``:
    subnormals, inf, NaN)."""
    kind = _half(getattr(dt, "dtype", None))
    if kind is None or f != types.float32:
        return None

    def codegen(context, builder, sig, args):
        if kind == "f16":
            return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))
        i32 = ir.IntType(32)

        def k(v):
            return ir.Constant(i32, v)
        v = builder.bitcast(args[0], i32)
        lsb = builder.and_(builder.lshr(v, k(16)), k(1))
        r = builder.lshr(builder.add(builder.add(v, k(0x7FFF)), lsb), k(16))
        nan = builder.icmp_unsigned(">", builder.and_(v, k(0x7FFFFFFF)), k(0x7F800000))
        return builder.trunc(builder.select(nan, k(0x7FC0), r), ir.IntType(16))
    return dt.dtype(f, dt), codegen


@jit
def widen(src, dst):  # pragma: no cover
    """16-bit bit patterns src -> float32 dst, exact; vectorizes (vpmovzxwd + vpslld, or
    vcvtph2ps)."""
    for j in range(src.shape[0]):
        dst[j] = h2f(src[j])


@jit
def narrow(src, dst):  # pragma: no cover
    """float32 src -> 16-bit bit patterns dst, as torch's ``.bfloat16()`` / ``.half()``: round
    to nearest even, NaN stays NaN. Vectorizes (the bfloat16 NaN select is a vpblendvb;
    vcvtps2ph)."""
    for j in range(dst.shape[0]):
        dst[j] = f2h(src[j], dst.dtype)


guard_caches(globals())
