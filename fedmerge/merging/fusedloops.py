"""The numba loops behind :mod:`fedmerge.merging.fused`: one pass over a block per call.

Each loop reads the reference ``base`` ``(m,)`` and the experts (a typed list
of K arrays ``(m,)``) in their stored dtype, forms τ_k = float32(θ_k) −
float32(θ_ref) element by element and does all of a pass's work on it in
registers, instead of the ~10 full-memory passes the torch kernels take.
bfloat16 travels as its uint16 bit patterns (numpy has no bfloat16): widened
by a 16-bit shift, narrowed by round-to-nearest-even exactly as torch's
``.to(torch.bfloat16)`` does (NaN → 0x7FC0). Every operation is one IEEE
float32 operation in the torch kernels' order (no fastmath, no FMA), so the
results are bit-identical to theirs.

Compiled on first use and cached on disk (``cache=True``): numba writes the
cache next to this file, or, where that is not writable, under the user's cache
directory (its ``_UserWideCacheLocator``); ``NUMBA_CACHE_DIR`` overrides both.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

_TILE = 512  # elements per tile: K float32 rows of it stay in L1


@intrinsic
def _bits(typingctx, x):
    """float32 -> its uint32 bit pattern."""
    if x != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(types.float32), codegen


@intrinsic
def _from_bits(typingctx, x):
    """uint32 bit pattern -> float32."""
    if x != types.uint32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.uint32), codegen


def get(a, i):
    """Element i of ``a`` as float32 (uint16: bfloat16 bits)."""


@overload(get, inline="always")
def _get(a, i):
    if a.dtype == types.uint16:
        return lambda a, i: _from_bits(np.uint32(np.uint32(a[i]) << np.uint32(16)))
    if a.dtype == types.float32:
        return lambda a, i: a[i]
    return None


def put(a, i, v):
    """Store float32 ``v`` as element i of ``a`` (uint16: bfloat16, nearest-even); returns
    False when the stored value is not finite."""


@njit(inline="always")
def _bf16(v):
    """float32 -> bfloat16 bits, round to nearest even (torch's ``round_to_nearest_even``)."""
    if v != v:
        return np.uint16(0x7FC0)
    b = np.uint32(_bits(v))
    return np.uint16((b + ((b >> np.uint32(16)) & np.uint32(1)) + np.uint32(0x7FFF)) >> 16)


@overload(put, inline="always")
def _put(a, i, v):
    if a.dtype == types.uint16:

        def store_bf16(a, i, v):
            h = _bf16(v)
            a[i] = h
            return (h & np.uint16(0x7F80)) != np.uint16(0x7F80)

        return store_bf16
    if a.dtype == types.float32:

        def store_f32(a, i, v):
            a[i] = v
            return abs(v) < np.float32(np.inf)

        return store_f32
    return None


@njit(cache=True, nogil=True)
def radix_count(base, experts, prefix, level, hist):
    """Histogram one digit of the float32 bit patterns of |τ_k| into ``hist`` ``(K, 2^16)``.

    ``level`` 0: the top 16 bits of every |τ_k|; 1: the low 16 bits of those
    whose top 16 bits equal ``prefix[k]``. (Non-negative floats order like their
    bit patterns, so two levels find the exact k-th smallest.)
    """
    m = base.shape[0]
    b = np.empty(_TILE, np.float32)
    for s in range(0, m, _TILE):
        n = min(_TILE, m - s)
        for i in range(n):
            b[i] = get(base, s + i)
        for k in range(len(experts)):
            x, h = experts[k], hist[k]
            if level == 0:
                for i in range(n):
                    h[_bits(abs(get(x, s + i) - b[i])) >> np.uint32(16)] += 1
            else:
                p = np.uint32(prefix[k])
                for i in range(n):
                    u = _bits(abs(get(x, s + i) - b[i]))
                    if (u >> np.uint32(16)) == p:
                        h[u & np.uint32(0xFFFF)] += 1


@njit(inline="always")
def _trim_weigh(base, experts, s, n, b, thr, w, wt):
    """τ_k of elements s..s+n into ``wt`` ``(K, tile)``: trimmed below ``thr[k]`` (±0, as
    copysign(threshold(|τ|), τ) gives) and times w_k; False if some τ is not finite."""
    finite = True
    for i in range(n):
        b[i] = get(base, s + i)
    for k in range(len(experts)):
        x, row, t_k, w_k = experts[k], wt[k], thr[k], w[k]
        for i in range(n):
            t = get(x, s + i) - b[i]
            a = abs(t)
            finite &= a <= np.float32(3.4028234663852886e38)
            row[i] = (t if a >= t_k else np.copysign(np.float32(0), t)) * w_k
    return finite


@njit(cache=True, nogil=True)
def ties_block(base, experts, thr, w, normalize, low, lam, out):
    """TIES on one block: trim at ``thr`` ``(K,)``, weigh by ``w`` ``(K,)``, elect the sign of
    the in-order sum, disjoint sum (÷ the agreeing weights when ``normalize``; ``low`` =
    min(w)), θ_ref + λ·merged into ``out``. The operations of
    :func:`~fedmerge.merging.sparsify.elect_and_combine`, per element. Returns False if an
    input or output value is not finite."""
    K, m = len(experts), base.shape[0]
    b = np.empty(_TILE, np.float32)
    wt = np.empty((K, _TILE), np.float32)
    ok = True
    zero, one = np.float32(0), np.float32(1)
    for s in range(0, m, _TILE):
        n = min(_TILE, m - s)
        ok &= _trim_weigh(base, experts, s, n, b, thr, w, wt)
        for i in range(n):
            total = wt[0, i] + zero if K == 1 else wt[0, i]
            for k in range(1, K):
                total += wt[k, i]
            elected = np.copysign(one, total)
            merged = zero
            divisor = zero
            for k in range(K):
                a = wt[k, i] * elected
                if a < zero:  # clamp(min=0) keeps −0.0
                    a = zero
                merged = merged + a if k > 0 or K == 1 else a
                d = w[k] * (one if a > zero else zero)
                divisor = divisor + d if k > 0 or K == 1 else d
            if normalize:
                if low > zero:
                    if divisor < low:
                        divisor = low
                elif divisor == zero:
                    divisor = one
                merged = merged / divisor
            ok &= put(out, s + i, merged * elected * lam + b[i])
    return ok


@njit(cache=True, nogil=True)
def mix_block(base, experts, w, total, lam, out):
    """θ_ref + λ·(Σ_k w_k τ_k [÷ ``total`` when nonzero]) into ``out``: the in-order sum of
    :func:`~fedmerge.merging.methods._mix`. Returns False if a value is not finite."""
    K, m = len(experts), base.shape[0]
    b = np.empty(_TILE, np.float32)
    acc = np.empty(_TILE, np.float32)
    ok = True
    zero = np.float32(0)
    big = np.float32(3.4028234663852886e38)
    for s in range(0, m, _TILE):
        n = min(_TILE, m - s)
        for i in range(n):
            b[i] = get(base, s + i)
        for k in range(K):
            x, w_k = experts[k], w[k]
            for i in range(n):
                t = get(x, s + i) - b[i]
                ok &= abs(t) <= big
                p = t * w_k
                acc[i] = (p + zero if K == 1 else p) if k == 0 else acc[i] + p
        for i in range(n):
            merged = acc[i] / total if total != zero else acc[i]
            ok &= put(out, s + i, merged * lam + b[i])
    return ok
