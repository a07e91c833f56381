"""Exact k-th smallest magnitudes over a stream of blocks, and the global TIES threshold.

Streaming a tensor (or a whole model) block by block, we find the exact k-th
smallest |τ| of every expert by a radix select on the bit patterns of |τ| (for
non-negative floats the bit pattern, read as an integer, is ordered like the
value), 16 bits per pass:

* pass 1 counts the top 16 bits of every value into a 2^16-bin histogram per
  row, which names the bin holding the k-th smallest value;
* each further pass counts the next 16 bits of the values whose higher bits
  equal the prefix found so far (float32: 2 passes; float64: 4 passes).

Memory is one small histogram per row and rank; each pass reads every input
once. We chose this over sorting (needs all of |τ|) and over a one-pass
histogram (exact only to ~1%). :class:`RadixSelect` serves the per-tensor
thresholds of a key too big for one block (TIES, breadcrumbs) and
:class:`GlobalThreshold`, the official TIES code's one threshold per expert
over all N parameters: ``kthvalue(|τ|, N − int(N·density))``. The global
selection runs on |τ| rounded to float32 (for float64 checkpoints the threshold
is that float32 value).

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

from collections.abc import Callable

import torch

_DIGIT = 16
_BINS = 1 << _DIGIT
_INT = {torch.float32: torch.int32, torch.float64: torch.int64}


def _first_reaching(hist: torch.Tensor, rank: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the bin where the cumulative count reaches ``rank``, and the rank inside it."""
    cum = hist.cumsum(dim=1)
    idx = torch.searchsorted(cum, rank.reshape(-1, 1).clone()).squeeze(1)
    before = torch.where(idx > 0, cum.gather(1, (idx - 1).clamp(min=0)[:, None]).squeeze(1), 0)
    return idx, rank - before


class RadixSelect:
    """Exact k-th smallest value of every row of a stream of non-negative blocks.

    ``ranks(totals)`` maps the per-row element counts ``(K,)`` seen in the
    first pass to the 1-based ranks wanted per row ``(K, R)`` (R ranks per
    row). Feed every block ``(K, m)`` to :meth:`observe` in each of the
    ``passes`` passes, calling :meth:`end_pass` after each; then ``values``
    ``(K, R)`` holds the selected values in ``dtype`` (float32 or float64).
    """

    def __init__(
        self, n_rows: int, dtype: torch.dtype, ranks: Callable[[torch.Tensor], torch.Tensor]
    ):
        self.dtype, self.int = dtype, _INT[dtype]
        self.passes = torch.finfo(dtype).bits // _DIGIT
        self.ranks = ranks
        self.hist = torch.zeros(n_rows, _BINS, dtype=torch.int64)
        self.prefix: torch.Tensor | None = None  # (K, R) bits found so far
        self.rank: torch.Tensor | None = None  # (K, R) rank inside the current prefix
        self.values: torch.Tensor | None = None

    def _shift(self, pass_index: int) -> int:
        return _DIGIT * (self.passes - 1 - pass_index)

    def observe(self, pass_index: int, block: torch.Tensor) -> None:
        """Count one block ``(K, m)`` of non-negative values (``dtype``)."""
        top = block.view(self.int) >> self._shift(pass_index)  # the bits down to this digit
        for k in range(top.shape[0]):
            if pass_index == 0:
                self.hist[k] += torch.bincount(top[k], minlength=_BINS)
                continue
            for r, prefix in enumerate(self.prefix[k].tolist()):
                # digits under the prefix land in 1.._BINS, the rest in 0 or _BINS + 1
                d = (top[k] - ((prefix << _DIGIT) - 1)).clamp_(0, _BINS + 1)
                self.hist[k, r] += torch.bincount(d, minlength=_BINS + 2)[1:-1]

    def end_pass(self, pass_index: int) -> None:
        if pass_index == 0:
            self.rank = self.ranks(self.hist.sum(dim=1))
            self.prefix = torch.zeros_like(self.rank)
            self.hist = self.hist[:, None, :].expand(*self.rank.shape, _BINS)
        k, r = self.rank.shape
        digit, self.rank = _first_reaching(self.hist.reshape(k * r, _BINS), self.rank.reshape(-1))
        self.rank = self.rank.view(k, r)
        self.prefix = (self.prefix << _DIGIT) | digit.view(k, r)
        if pass_index + 1 < self.passes:
            self.hist = torch.zeros(k, r, _BINS, dtype=torch.int64)
        else:
            self.values = self.prefix.to(self.int).view(self.dtype)


class GlobalThreshold(RadixSelect):
    """Exact per-expert threshold ``kthvalue(|τ_k|, N − int(N·density))`` over all keys.

    :meth:`observe` takes stacked task vectors ``(K, m)`` (any float dtype);
    ``thresholds`` ``(K,)`` float32 is set after the last pass.
    """

    def __init__(self, density: float, n_experts: int):
        def rank(total: torch.Tensor) -> torch.Tensor:
            return (total - (total.double() * density).long()).clamp(min=1)[:, None]

        super().__init__(n_experts, torch.float32, rank)
        self.thresholds: torch.Tensor | None = None

    def observe(self, pass_index: int, tau: torch.Tensor) -> None:
        super().observe(pass_index, tau.abs().to(torch.float32))

    def end_pass(self, pass_index: int) -> None:
        super().end_pass(pass_index)
        if self.values is not None:
            self.thresholds = self.values[:, 0]
