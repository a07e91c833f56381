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

DARE's keep masks (:func:`keep_entry`, :func:`keep_mask_np`) live here too, so
that numba is imported only by a merge that runs one of these loops.

Compiled on first use and cached on disk (``cache=True``): numba writes the
cache next to this file, or, where that is not writable, under the user's cache
directory (its ``_UserWideCacheLocator``); ``NUMBA_CACHE_DIR`` overrides both.
"""

from __future__ import annotations

import importlib.util

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

from fedmerge.merging.dropmask import _GAMMA, _MIX1, _MIX2, _S11, _S27, _S30, _S31


def _defer_scipy() -> None:
    """Spare numba's first dispatch the import of ``scipy.linalg`` (~0.2 s of CPU).

    The dispatch imports ``numba.np.arraymath``, which calls ``ensure_blas()`` (that
    is, imports ``scipy.linalg``) only to learn whether its ``np.dot`` family can use
    BLAS; none of these loops does. Import it with that question answered by whether
    scipy is installed: the same answer, and numba's BLAS functions still import scipy
    (their own ``ensure_blas()``) when one is compiled.
    """
    import numba.np.linalg as linalg

    check = getattr(linalg, "ensure_blas", None)
    if check is None:  # another numba: leave it alone
        return
    linalg.ensure_blas = lambda: None if importlib.util.find_spec("scipy") else check()
    try:
        import numba.np.arraymath  # noqa: F401
    finally:
        linalg.ensure_blas = check


_defer_scipy()

_TILE = 512  # elements per tile: K float32 rows of it stay in L1


@njit(inline="always", cache=True)
def keep_entry(stream_key: np.uint64, index: np.int64, limit: np.uint64) -> bool:
    """Keep entry ``index`` (0-based, of the flattened tensor) of stream ``stream_key``?

    DARE's counter-based mask (:mod:`fedmerge.merging.dropmask`), for numba kernels
    (``@njit`` code calls it inline): ``stream_key`` a uint64 from
    :func:`~fedmerge.merging.dropmask.stream_key`, ``index`` an int64 ≥ 0, ``limit`` from
    :func:`~fedmerge.merging.dropmask.keep_limit` (any integer type). Equal to
    :func:`~fedmerge.merging.dropmask.keep_mask` entry for entry.
    """
    z = np.uint64(stream_key) + np.uint64(index + 1) * _GAMMA
    z = (z ^ (z >> _S30)) * _MIX1
    z = (z ^ (z >> _S27)) * _MIX2
    z ^= z >> _S31
    return (z >> _S11) < np.uint64(limit)


@njit(cache=True)
def keep_mask_np(keys: np.ndarray, start: int, m: int, limit: int) -> np.ndarray:
    """Masks ``(K, m)`` (bool) of entries start..start+m−1 for ``keys`` ``(K,)`` uint64."""
    out = np.empty((keys.shape[0], m), dtype=np.bool_)
    for k in range(keys.shape[0]):
        key = keys[k]
        for j in range(m):
            out[k, j] = keep_entry(key, start + j, limit)
    return out


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
    the stored magnitude's bit pattern on the float32 scale (>= :data:`_INF` if not finite)."""


@njit(inline="always")
def _bf16(v):
    """float32 -> bfloat16 bits, round to nearest even (torch's ``round_to_nearest_even``)."""
    b = _bits(v)
    rounded = np.uint16((b + ((b >> np.uint32(16)) & np.uint32(1)) + np.uint32(0x7FFF)) >> 16)
    return np.uint16(0x7FC0) if v != v else rounded


@overload(put, inline="always")
def _put(a, i, v):
    if a.dtype == types.uint16:

        def store_bf16(a, i, v):
            h = _bf16(v)
            a[i] = h
            return np.uint32(np.uint32(h & np.uint16(0x7FFF)) << np.uint32(16))

        return store_bf16
    if a.dtype == types.float32:

        def store_f32(a, i, v):
            a[i] = v
            return _bits(v) & _ABS

        return store_f32
    return None


_ABS = np.uint32(0x7FFFFFFF)
_INF = np.uint32(0x7F800000)  # bit patterns of |x| at or above this: Inf or NaN


@njit(inline="always")
def _tau(x, b, n, out):
    """out[:n] = float32(x[i]) − b[i]; the largest |τ| bit pattern (>= _INF: not finite)."""
    worst = np.uint32(0)
    for i in range(n):
        t = get(x, i) - b[i]
        out[i] = t
        worst = max(worst, _bits(t) & _ABS)
    return worst


@njit(inline="always")
def _drop(row, n, key, first, drop):
    """DARE on one expert's τ tile ``row[:n]`` (entries first..first+n−1 of the tensor):
    × keep (1 or 0, as ``tau.mul_(mask)``), then ÷ density when it is nonzero.
    ``drop`` = (limit, density): limit < 0 keeps everything (no DARE)."""
    limit, density = drop
    if limit < 0:
        return
    one, zero = np.float32(1), np.float32(0)
    for i in range(n):
        row[i] = row[i] * (one if keep_entry(key, first + i, limit) else zero)
    if density != zero:
        for i in range(n):
            row[i] = row[i] / density


@njit(inline="always")
def _widen(base, s, n, b):
    bs = base[s : s + n]
    for i in range(n):
        b[i] = get(bs, i)


@njit(cache=True, nogil=True)
def radix_count(base, experts, prefix, level, hist):
    """Histogram one digit of the float32 bit patterns of |τ_k| into ``hist`` ``(K, 2^16)``.

    ``level`` 0: the top 16 bits of every |τ_k|; 1: the low 16 bits of those
    whose top 16 bits equal ``prefix[k]``. (Non-negative floats order like their
    bit patterns, so two levels find the exact k-th smallest.)
    """
    m = base.shape[0]
    b = np.empty(_TILE, np.float32)
    t = np.empty(_TILE, np.float32)
    u = t.view(np.uint32)
    for s in range(0, m, _TILE):
        n = min(_TILE, m - s)
        _widen(base, s, n, b)
        for k in range(len(experts)):
            _tau(experts[k][s : s + n], b, n, t)
            h = hist[k]
            if level == 0:
                for i in range(n):
                    h[(u[i] & _ABS) >> np.uint32(16)] += 1
            else:
                p = np.uint32(prefix[k])
                for i in range(n):
                    a = u[i] & _ABS
                    if (a >> np.uint32(16)) == p:
                        h[a & np.uint32(0xFFFF)] += 1


@njit(cache=True, nogil=True)
def ties_block(base, experts, keys, first, drop, thr, w, normalize, low, lam, out):
    """TIES on one block: DARE's drop if ``drop`` says so (:func:`_drop`; ``keys`` ``(K,)``
    uint64 stream keys, ``first`` the block's offset in the tensor), trim at ``thr``
    ``(K,)`` (0: keep all), weigh by ``w`` ``(K,)``, elect the sign of
    the in-order sum, disjoint sum (÷ the agreeing weights when ``normalize``; ``low`` =
    min(w) if positive, else 0), θ_ref + λ·merged into ``out``: the operations of
    :func:`~fedmerge.merging.sparsify.elect_and_combine`, on L1-sized tiles (each loop a
    simple one over the tile, which LLVM vectorizes). Returns False if an input or output
    value is not finite."""
    K, m = len(experts), base.shape[0]
    b = np.empty(_TILE, np.float32)
    wt = np.empty((K, _TILE), np.float32)
    elected = np.empty(_TILE, np.float32)
    merged = np.empty(_TILE, np.float32)
    divisor = np.empty(_TILE, np.float32)
    worst = np.uint32(0)
    zero, one = np.float32(0), np.float32(1)
    for s in range(0, m, _TILE):
        n = min(_TILE, m - s)
        _widen(base, s, n, b)
        for k in range(K):
            row, t_k, w_k = wt[k], thr[k], w[k]
            worst = max(worst, _tau(experts[k][s : s + n], b, n, row))
            _drop(row, n, keys[k], first + s, drop)
            for i in range(n):  # copysign(threshold(|τ|), τ), times w_k
                t = row[i]
                row[i] = (t if abs(t) >= t_k else np.copysign(zero, t)) * w_k
        for i in range(n):
            elected[i] = wt[0, i] + zero if K == 1 else wt[0, i]  # one row sums as 0 + t
        for k in range(1, K):
            for i in range(n):
                elected[i] += wt[k, i]
        for i in range(n):
            elected[i] = np.copysign(one, elected[i])
        for k in range(K):
            w_k = w[k]
            for i in range(n):
                a = wt[k, i] * elected[i]
                a = zero if a < zero else a  # clamp(min=0) keeps −0.0
                d = w_k * (one if a > zero else zero)  # w_k · sign(a)
                if k == 0:
                    merged[i] = a + zero if K == 1 else a
                    divisor[i] = d + zero if K == 1 else d
                else:
                    merged[i] += a
                    divisor[i] += d
        if normalize and low > zero:  # clamp(min=low): a zero divisor merges ±0 anyway
            for i in range(n):
                d = divisor[i]
                merged[i] = merged[i] / (low if d < low else d)
        elif normalize:  # a zero divisor (no expert agrees) becomes 1
            for i in range(n):
                d = divisor[i]
                merged[i] = merged[i] / (one if d == zero else d)
        os = out[s : s + n]
        for i in range(n):
            worst = max(worst, put(os, i, merged[i] * elected[i] * lam + b[i]))
    return worst < _INF


@njit(cache=True, nogil=True)
def mix_block(base, experts, keys, first, drop, w, total, lam, out):
    """θ_ref + λ·(Σ_k w_k τ'_k [÷ ``total`` when nonzero]) into ``out``: the in-order sum of
    :func:`~fedmerge.merging.methods._mix`; τ' = τ after DARE's drop if ``drop`` says so
    (arguments as in :func:`ties_block`). Returns False if a value is not finite."""
    K, m = len(experts), base.shape[0]
    b = np.empty(_TILE, np.float32)
    acc = np.empty(_TILE, np.float32)
    t = np.empty(_TILE, np.float32)
    worst = np.uint32(0)
    zero = np.float32(0)
    for s in range(0, m, _TILE):
        n = min(_TILE, m - s)
        _widen(base, s, n, b)
        worst = max(worst, _tau(experts[0][s : s + n], b, n, acc))
        _drop(acc, n, keys[0], first + s, drop)
        w_k = w[0]
        for i in range(n):
            acc[i] = acc[i] * w_k
        for k in range(1, K):
            worst = max(worst, _tau(experts[k][s : s + n], b, n, t))
            _drop(t, n, keys[k], first + s, drop)
            w_k = w[k]
            for i in range(n):
                acc[i] += t[i] * w_k
        if K == 1:
            for i in range(n):
                acc[i] += zero  # torch sums one row as 0 + t
        if total != zero:
            for i in range(n):
                acc[i] = acc[i] / total
        os = out[s : s + n]
        for i in range(n):
            worst = max(worst, put(os, i, acc[i] * lam + b[i]))
    return worst < _INF


@njit(cache=True, nogil=True)
def magnitude_bits(base, experts, out):
    """The float32 bit patterns of |τ_k| of a (small) block into ``out`` ``(K, m)``."""
    m = base.shape[0]
    b = np.empty(m, np.float32)
    _widen(base, 0, m, b)
    for k in range(len(experts)):
        row = out[k].view(np.float32)
        _tau(experts[k], b, m, row)
        for i in range(m):
            out[k, i] &= _ABS


@njit(cache=True, nogil=True)
def bracket_count(base, experts, edges, counts, buf, stored):
    """Per expert k, with bit patterns lo < c < hi = ``edges[k]``: add to ``counts[k]`` the
    numbers of |τ_k| below lo, equal to lo, to c and to hi (their ties are counted, not
    stored), and copy the others strictly between lo and hi to ``buf[k, stored[k]:]``
    (``stored`` counts them all; only the first ``buf.shape[1]`` are kept)."""
    m = base.shape[0]
    cap = buf.shape[1]
    b = np.empty(_TILE, np.float32)
    t = np.empty(_TILE, np.float32)
    u = t.view(np.uint32)
    flag = np.zeros(_TILE, np.uint8)
    words = flag.view(np.uint64)
    for s in range(0, m, _TILE):
        n = min(_TILE, m - s)
        _widen(base, s, n, b)
        for k in range(len(experts)):
            _tau(experts[k][s : s + n], b, n, t)
            lo, c, hi = np.uint32(edges[k, 0]), np.uint32(edges[k, 1]), np.uint32(edges[k, 2])
            below, at_lo, at_c, at_hi = np.int32(0), np.int32(0), np.int32(0), np.int32(0)
            for i in range(n):  # branch-free int32 counts: LLVM vectorizes this loop
                a = u[i] & _ABS
                u[i] = a
                below += np.int32(a < lo)
                at_lo += np.int32(a == lo)
                at_c += np.int32(a == c)
                at_hi += np.int32(a == hi)
            for i in range(n):
                a = u[i]
                flag[i] = np.uint8(a > lo) & np.uint8(a < hi) & np.uint8(a != c)
            counts[k, 0] += below
            counts[k, 1] += at_lo
            counts[k, 2] += at_c
            counts[k, 3] += at_hi
            j = stored[k]
            for q in range((n + 7) // 8):  # the few flagged values: skip 8 at a time
                if words[q] != 0:
                    for i in range(8 * q, min(8 * q + 8, n)):
                        if flag[i]:
                            if j < cap:
                                buf[k, j] = u[i]
                            j += 1
                            flag[i] = 0
            stored[k] = j
