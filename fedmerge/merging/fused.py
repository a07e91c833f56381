"""Fused CPU forms of merge methods: one loop per element instead of ~10 torch passes.

The torch kernels (:mod:`fedmerge.merging.methods`) make each step a full pass
over K × n float32 task vectors (form τ, |τ|, trim, weigh, sum, elect, clamp,
sum, divide, scale, cast): 0.1-0.5 ns per entry each, 9-20× the I/O floor on
LLM-sized checkpoints. A fused form reads each block of the inputs in their
stored dtype (bfloat16 or float32) and does all of a pass's work per element
on L1-sized tiles (:mod:`fedmerge.merging.native`: C loops, compiled on first
use), writing the output dtype straight into the output tensor. Each operation
is the float32 operation the torch kernel does, in the same order, so the bits
are the same (tested in ``tests/test_merging_fused.py``).

TIES needs each expert's exact k-th smallest |τ_k| over the whole tensor
first, without materialising τ: one pass over the blocks around a sampled
bracket (:func:`kth_magnitudes`), or, where that misses, two radix counting
passes (the idea of :class:`~fedmerge.merging.globalk.RadixSelect`).
DARE's masks come from the counter-based generator of
:mod:`fedmerge.merging.dropmask`, which the torch path evaluates too.

A form is registered with its method (``Method.fused``) and called by the
engine as ``form(call)`` with a :class:`FusedCall`; it returns
``NotImplemented`` (these parameters are not covered: the engine runs the torch
kernel), None (done) or the index of the first block holding a non-finite
input or output (the engine then finds and names it, as the torch path does).
The engine uses a form only for CPU tensors whose input and output dtypes are
in :data:`DTYPES` (float16 and float64 stay on torch), and only where the loops
could be built (:func:`fedmerge.merging.native.library`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fedmerge.merging import native
from fedmerge.merging.sparsify import magnitude_rank

DTYPES = (torch.bfloat16, torch.float32)
"""Input and output dtypes the fused loops read and write."""

Rows = tuple[int, int] | None
Block = tuple[torch.Tensor, Sequence[torch.Tensor]]  # a block's θ_ref and θ_k, stored dtype


@dataclass
class FusedCall:
    """One key for a fused form: how to read its blocks, and where the result goes.

    ``read(rows)`` -> (base, experts) of one block, any shape, in the stored
    dtype; ``out``: the flat output ``(numel,)`` in the output dtype, filled
    block after block; ``weights`` ``(K,)`` float64; ``thresholds``: the global
    TIES thresholds ``(K,)`` from the pre-pass, if any.
    """

    read: Callable[[Rows], Block]
    parts: list[Rows]
    out: torch.Tensor
    weights: torch.Tensor
    params: dict[str, Any]
    thresholds: torch.Tensor | None = None
    stream_keys: Sequence[int] = ()  # DARE: each expert's mask stream for this key
    _single: Any = field(default=None, repr=False)  # the numpy form of a one-block key


class NotOnCPU(Exception):
    """An input tensor lives on another device: the torch kernels merge it."""


def _array(t: torch.Tensor) -> np.ndarray:
    """A flat numpy view of ``t`` (bfloat16 as its uint16 bit patterns)."""
    if t.device.type != "cpu":
        raise NotOnCPU(t.device)
    return native.array(t)


def _arrays(block: Block) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
    base, experts = block
    return _array(base), tuple(_array(e) for e in experts)


def _blocks(call: FusedCall):
    """Yield the numpy form of every block, ``(base, experts)``; a single block is read once
    and reused by every pass."""
    if len(call.parts) == 1:
        if call._single is None:
            call._single = _arrays(call.read(call.parts[0]))
        yield call._single
        return
    for rows in call.parts:
        yield _arrays(call.read(rows))


_NO_DROP = (np.int64(-1), np.float32(0))


def _drop(call: FusedCall) -> tuple[np.int64, np.float32] | None:
    """DARE's (keep limit, divisor) for the loops; None where they do not cover it
    (``rescale: l1`` needs the norms pass)."""
    from fedmerge.merging.dropmask import keep_limit

    p = call.params
    if p["density"] >= 1:
        return _NO_DROP
    if p["rescale"] == "l1":
        return None
    divisor = p["density"] if p["rescale"] == "inverse" else 0.0
    return np.int64(keep_limit(p["density"])), np.float32(divisor)


def _write(call: FusedCall, loop: Callable[..., bool], drop, *args: Any) -> int | None:
    """Run ``loop(base, experts, keys, first, drop, *args, out_block)`` over the blocks, in
    order; the index of the first block with a non-finite value, or None."""
    out = _array(call.out)
    keys = np.array(call.stream_keys or [0] * len(call.weights), np.uint64)
    start = 0
    for i, (base, experts) in enumerate(_blocks(call)):
        stop = start + base.shape[0]
        if not loop(base, experts, keys, np.int64(start), drop, *args, out[start:stop]):
            return i
        start = stop
    return None


def mix(call: FusedCall, drop=_NO_DROP) -> int | None:
    """``task_arithmetic``: θ_ref + λ·Σ_k w_k τ_k (÷ Σ w_k with ``normalize``)."""
    w = call.weights
    total = float(w.sum())
    divide = call.params["normalize"] and abs(total) >= 1e-8
    lam = np.float32(call.params["lambda"])
    args = (w.float().numpy(), np.float32(total if divide else 0), lam)
    return _write(call, native.mix_block, drop, *args)


def dare_linear(call: FusedCall) -> int | None:
    """``dare_linear`` (rescale inverse or none): DARE's drop, then :func:`mix`."""
    drop = _drop(call)
    return NotImplemented if drop is None else mix(call, drop)


def average(call: FusedCall) -> int | None:
    """``average`` with ``normalize`` (Σ w_k θ_k / Σ w_k, computed as θ_ref + mean τ); the
    plain weighted sum adds Σw·θ_ref with an FMA-prone ``add(alpha=)``: left to torch."""
    if not call.params["normalize"]:
        return NotImplemented
    return mix(FusedCall(call.read, call.parts, call.out, call.weights,
                         {"normalize": True, "lambda": 1.0}))  # fmt: skip


_SAMPLE = 1 << 16  # at most this many |τ_k| values per expert sampled to bracket the rank
_PIECES = 64  # ... in this many evenly spaced runs of rows


def kth_magnitudes(call: FusedCall, rank: int) -> np.ndarray:
    """The exact ``rank``-th smallest float32 |τ_k| of every expert over all blocks -> ``(K,)``.

    Small keys: :func:`_every_magnitude`. Big ones: a sample
    of 2^12–2^16 values per expert (:func:`_sample_size`; runs of rows) names a
    likely answer c and a bracket lo < c < hi around it; one pass counts the values
    below lo, the ties at lo, c and hi (bfloat16 task vectors hold heavy exact ties)
    and those between lo and c, and copies the ~1–3% strictly inside, where one
    ``np.partition`` picks the answer (:func:`_pick`). If the bracket misses the rank
    or overflows its buffer, the radix passes run instead. Exact either way.
    """
    numel = call.out.numel()
    if numel <= 2 * _SAMPLE:
        return _every_magnitude(call, rank)
    sample = _sample(call, numel)
    k, s = sample.shape
    p = rank / numel
    margin = int(4 * math.sqrt(s * p * (1 - p))) + 16
    low, mid, high = int(p * s) - margin, min(int(p * s), s - 1), int(p * s) + margin
    # the three order statistics a sort would put there, in O(s) instead of O(s log s)
    sample = np.partition(sample, sorted({mid, *(x for x in (low, high) if 0 < x < s)}), axis=1)
    sample = sample.astype(np.int64)
    c = sample[:, mid]
    if not c.all():  # the rank is likely among exact zeros: count them
        return _radix(call, rank)
    lo = np.minimum(sample[:, low] if low > 0 else 0, c - 1)
    hi = np.maximum(sample[:, high] if high < s else 0xFFFFFFFF, c + 1)  # to the top
    cap = int(min(numel, 2 * (2 * margin / s) * numel + 65536))
    counts, stored = np.zeros((k, 5), np.int64), np.zeros(k, np.int64)
    buf = np.empty((k, cap), np.uint32)
    edges = np.stack([lo, c, hi], axis=1)
    for base, experts in _blocks(call):
        native.bracket_count(base, experts, edges, counts, buf, stored)
    picks = [_pick(rank, edges[j], counts[j], buf[j, : stored[j]], stored[j] <= cap)
             for j in range(k)]  # fmt: skip
    if None in picks:
        return _radix(call, rank)
    return np.array(picks, np.uint32).view(np.float32)


def _pick(rank: int, edges, counts, inside: np.ndarray, complete: bool) -> int | None:
    """The rank-th smallest bit pattern from a bracket pass (None: not in the bracket).

    ``counts``: below lo, at lo, at c, at hi, strictly between lo and c; ``inside``: the
    values strictly inside (lo, hi) other than c, in any order (its ``counts[4]`` smallest
    lie below c), all of them if ``complete``. One ``np.partition`` at most."""
    lo, c, hi = (int(x) for x in edges)
    below, at_lo, at_c, at_hi, under = (int(x) for x in counts)
    if rank <= below or not complete:
        return None
    r = rank - below - at_lo  # rank among the values above lo
    if r <= 0:
        return lo
    if under < r <= under + at_c:
        return c
    r -= at_c if r > under else 0  # rank within inside (sorted: under c, then over c)
    if r <= inside.size:
        return int(np.partition(inside, r - 1)[r - 1])
    return hi if r - inside.size <= at_hi else None


def _sample_size(numel: int) -> int:
    """|τ_k| values to sample per expert: ~(1.6·n)^⅔, in [2^12, 2^16]. The sample's partition
    costs ∝ s and the bracket's inside ∝ 8·√(p(1−p)/s)·n (p ≈ 0.2–0.8); s ∝ n^⅔ balances them."""
    return int(min(_SAMPLE, max(_SAMPLE >> 4, (1.6 * numel) ** (2 / 3))))


def _sample(call: FusedCall, numel: int) -> np.ndarray:
    """|τ_k| bit patterns ``(K, ~_sample_size)`` from :data:`_PIECES` evenly spaced runs of rows
    (of elements, for a key in one block: one call of the loop)."""
    size = _sample_size(numel)
    if len(call.parts) == 1:
        base, experts = next(_blocks(call))
        run = max(1, size // _PIECES)
        starts = np.linspace(0, numel - run, _PIECES).astype(np.int64)
        bits = np.empty((len(experts), _PIECES * run), np.uint32)
        native.magnitude_runs(base, experts, starts, run, bits)
        return bits
    rows = call.parts[-1][1]
    run = max(1, -(-size // (_PIECES * (numel // rows))))
    starts = np.linspace(0, rows - run, _PIECES).astype(np.int64)
    return np.concatenate([_magnitudes(*_arrays(call.read((int(a), int(a) + run))))
                           for a in starts], axis=1)  # fmt: skip


def _magnitudes(base: np.ndarray, experts: Sequence[np.ndarray]) -> np.ndarray:
    """The |τ_k| bit patterns of a whole block -> ``(K, m)`` uint32."""
    bits = np.empty((len(experts), base.shape[0]), np.uint32)
    native.magnitude_runs(base, experts, np.zeros(1, np.int64), base.shape[0], bits)
    return bits


def _every_magnitude(call: FusedCall, rank: int) -> np.ndarray:
    """The exact ``rank``-th smallest |τ_k| of a small key (at most 2 · :data:`_SAMPLE` values
    per expert, ≤ 2 MB for K = 4): all its bit patterns, one ``np.partition`` (a 1,024-entry
    norm: ~40 µs, where the radix passes spent ~1.5 ms on their 2^16-bin histograms)."""
    parts = [_magnitudes(base, experts) for base, experts in _blocks(call)]
    bits = np.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]
    return np.partition(bits, rank - 1, axis=1)[:, rank - 1].copy().view(np.float32)


def _radix(call: FusedCall, rank: int) -> np.ndarray:
    """The exact ``rank``-th smallest |τ_k| by two counting passes over the blocks: the top 16
    bits of the float32 bit patterns, then the low 16 bits inside the bin holding the rank."""
    k = len(call.weights)
    hist = np.zeros((k, 1 << 16), np.int64)
    prefix = np.zeros(k, np.int64)
    want = np.full(k, rank, np.int64)
    for level in (0, 1):
        hist[:] = 0
        for base, experts in _blocks(call):
            native.radix_count(base, experts, prefix, level, hist)
        cum = np.cumsum(hist, axis=1)
        digit = (cum < want[:, None]).sum(axis=1)  # the first bin whose count reaches the rank
        want -= np.where(digit > 0, cum[np.arange(k), np.maximum(digit - 1, 0)], 0)
        prefix = (prefix << 16) | digit
    return prefix.astype(np.uint32).view(np.float32)


def dare_ties(call: FusedCall) -> int | None:
    """``dare_ties`` (rescale inverse or none): DARE's drop, then TIES' elect/disjoint merge."""
    drop = _drop(call)
    return (
        NotImplemented
        if drop is None
        else _elect(call, drop, np.zeros(len(call.weights), np.float32))
    )


def _elect(call: FusedCall, drop, thr: np.ndarray) -> int | None:
    """Drop (DARE) or trim at ``thr`` (TIES), weigh, elect, disjoint merge: one loop."""
    p, w = call.params, call.weights
    low = float(w.min())
    if low > 0 and np.float32(low) == 0:  # weights below float32's range: leave to torch
        return NotImplemented
    args = (thr, w.float().numpy(), bool(p["normalize"]), np.float32(max(low, 0.0)),
            np.float32(p["lambda"]))  # fmt: skip
    return _write(call, native.ties_block, drop, *args)


def ties(call: FusedCall) -> int | None:
    """``ties``: per-tensor (or global) magnitude thresholds, then the trim/elect/disjoint
    merge of :func:`~fedmerge.merging.methods.ties` in one loop."""
    p, w = call.params, call.weights
    if call.thresholds is not None:
        thr = call.thresholds.to(torch.float32).numpy()
    else:
        rank = magnitude_rank(call.out.numel(), p["density"])
        if rank == 0:  # keeps nothing (zeroes τ, +0): tiny tensors only
            return NotImplemented
        thr = np.zeros(len(w), np.float32) if rank is None else kth_magnitudes(call, rank)
    return _elect(call, _NO_DROP, thr)
