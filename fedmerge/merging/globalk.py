"""A global magnitude threshold per expert, found without holding the model.

The official TIES code flattens each whole task vector and keeps the entries
with ``|τ| >= kthvalue(|τ|, N − int(N·density))`` (one threshold per expert
over all N parameters). Streaming key by key, we find that exact value by a
two-pass radix select on the float32 bit patterns of |τ| (for non-negative
floats the bit pattern, read as an integer, is ordered like the value):

* pass 1 counts the high 16 bits of every |τ| into a 32768-bin histogram per
  expert, which names the bin holding the k-th smallest value;
* pass 2 counts the low 16 bits of the entries inside that bin only.

Memory is two small histograms per expert; each pass reads every input once
(a pass is as costly as the floor, so ``scope: global`` costs ~2 extra reads).
We chose this over sorting (needs all of |τ|) and over a one-pass histogram
(exact only to ~1%). For float64 checkpoints the selection runs on |τ| rounded
to float32 and the threshold is that float32 value.

>>> import torch
>>> g = GlobalThreshold(density=0.5, n_experts=1)
>>> chunks = [torch.tensor([[1.0, -4.0]]), torch.tensor([[3.0, 2.0, -0.5]])]
>>> for p in range(g.passes):
...     for t in chunks:
...         g.observe(p, t)
...     g.end_pass(p)
>>> g.thresholds.tolist()   # N=5, k = 5 - int(2.5) = 3rd smallest |τ| = 2
[2.0]
"""

from __future__ import annotations

import torch

_HI_BINS = 1 << 15  # sign bit is 0 for |τ|, so the top 16 bits take 2^15 values
_LO_BINS = 1 << 16


def magnitude_bits(tau: torch.Tensor) -> torch.Tensor:
    """|τ| as float32, reinterpreted as int32 (order-preserving for values ≥ 0)."""
    return tau.abs().to(torch.float32).view(torch.int32)


def _row_bincount(values: torch.Tensor, bins: int) -> torch.Tensor:
    """Histogram of every row of ``values`` ``(K, m)`` (ints in [0, bins)) -> ``(K, bins)``."""
    rows = values.shape[0]
    offset = torch.arange(rows, dtype=values.dtype)[:, None] * bins
    return torch.bincount((values + offset).reshape(-1), minlength=rows * bins).view(rows, bins)


def _first_reaching(hist: torch.Tensor, rank: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the bin where the cumulative count reaches ``rank``, and the rank inside it."""
    cum = hist.cumsum(dim=1)
    idx = torch.searchsorted(cum, rank[:, None]).squeeze(1)
    before = torch.where(idx > 0, cum.gather(1, (idx - 1).clamp(min=0)[:, None]).squeeze(1), 0)
    return idx, rank - before


class GlobalThreshold:
    """Exact per-expert threshold ``kthvalue(|τ_k|, N − int(N·density))`` over all keys."""

    passes = 2

    def __init__(self, density: float, n_experts: int):
        self.density = density
        self.hi = torch.zeros(n_experts, _HI_BINS, dtype=torch.int64)
        self.lo = torch.zeros(n_experts, _LO_BINS, dtype=torch.int64)
        self.bin: torch.Tensor | None = None
        self.rank: torch.Tensor | None = None
        self.thresholds: torch.Tensor | None = None  # (K,) float32

    def observe(self, pass_index: int, tau: torch.Tensor) -> None:
        """Count one key's stacked task vectors ``tau`` ``(K, n)``."""
        bits = magnitude_bits(tau)
        if pass_index == 0:
            self.hi += _row_bincount(bits >> 16, _HI_BINS)
            return
        inside = (bits >> 16) == self.bin[:, None]
        low = torch.where(inside, bits & 0xFFFF, _LO_BINS)  # outside -> an overflow bin
        self.lo += _row_bincount(low, _LO_BINS + 1)[:, :_LO_BINS]

    def end_pass(self, pass_index: int) -> None:
        if pass_index == 0:
            total = self.hi.sum(dim=1)
            k = (total - (total.double() * self.density).long()).clamp(min=1)
            self.bin, self.rank = _first_reaching(self.hi, k)
            return
        low, _ = _first_reaching(self.lo, self.rank)
        bits = ((self.bin << 16) | low).to(torch.int32)
        self.thresholds = bits.view(torch.float32)
