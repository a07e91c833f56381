"""Exact k-th smallest magnitudes over a stream of blocks, and the global TIES threshold.

Streaming a tensor (or a whole model) block by block, we find the exact k-th
smallest |τ| of every expert by a radix select on the bit patterns of |τ| (for
non-negative floats the bit pattern, read as an integer, is ordered like the
value), 16 bits per pass:

* pass 1 counts the top 16 bits of every value into a 2^16-bin histogram per
  row, which names the bin holding the k-th smallest value;
* the second pass keeps the values that fall in that bin (a bin spans 1/128
  of an octave in float32: a fraction of a percent of the values) and
  ``kthvalue`` picks the answer among them: 2 passes in all;
* when the named bins hold too many values (heavy ties), each further pass
  instead counts the next 16 bits of the values whose higher bits equal the
  prefix found so far (float32: 2 passes; float64: 4 passes).

Memory is one small histogram per row and rank (plus the few kept values);
each pass reads every input once. We chose this over sorting (needs all of |τ|) and over a one-pass
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
    row). Feed every block ``(K, m)`` (read anew: :meth:`observe` may
    overwrite it) to :meth:`observe` in each pass, calling
    :meth:`end_pass` after each, while the pass index is below ``passes``
    (which :meth:`end_pass` may lower); then ``values`` ``(K, R)`` holds the
    selected values in ``dtype`` (float32 or float64).

    After the first pass (a histogram of the top 16 bits) the wanted value of
    each (row, rank) lies in one bin. When those bins hold at most
    ``gather_limit`` values in all and at most 1/16 of the values seen (the
    usual case: a bin spans 1/128 of an octave in float32, 1/16 in float64),
    the second and last pass keeps the values falling in them and
    ``kthvalue`` picks the answer from these few; otherwise (heavy exact ties,
    e.g. zeros) each further pass counts the next 16 bits under the prefix
    found so far (float32: 2 passes, float64: 4).
    """

    def __init__(
        self,
        n_rows: int,
        dtype: torch.dtype,
        ranks: Callable[[torch.Tensor], torch.Tensor],
        gather_limit: int = 1 << 22,
    ):
        self.dtype, self.int = dtype, _INT[dtype]
        self.passes = torch.finfo(dtype).bits // _DIGIT
        self.top_shift = torch.finfo(dtype).bits - _DIGIT
        self.ranks, self.gather_limit = ranks, gather_limit
        self.hist = torch.zeros(n_rows, _BINS, dtype=torch.int64)
        self.prefix: torch.Tensor | None = None  # (K, R) bits found so far
        self.rank: torch.Tensor | None = None  # (K, R) rank inside the current prefix
        self.kept: list[list[torch.Tensor]] | None = None  # [k][r]: the values in its bin
        self.filled: list[list[int]] = []  # [k][r]: how many of them the gather pass has found
        self.values: torch.Tensor | None = None
        self.seen = 0  # values counted in the first pass

    def _shift(self, pass_index: int) -> int:
        return _DIGIT * (self.passes - 1 - pass_index)

    def observe(self, pass_index: int, block: torch.Tensor) -> None:
        """Count (or, in the gather pass, keep) one block ``(K, m)`` of non-negative values.

        The first pass overwrites ``block`` (its top bits are computed in place)."""
        if pass_index == 0:
            return self._count_top(block.view(self.int).bitwise_right_shift_(self.top_shift))
        if self.kept is not None:
            return self._keep(block, block.view(self.int) >> self.top_shift)
        top = block.view(self.int) >> self._shift(pass_index)  # the bits down to this digit
        for k in range(top.shape[0]):
            for r, prefix in enumerate(self.prefix[k].tolist()):
                # digits under the prefix land in 1.._BINS, the rest in 0 or _BINS + 1
                d = (top[k] - ((prefix << _DIGIT) - 1)).clamp_(0, _BINS + 1)
                self.hist[k, r] += torch.bincount(d, minlength=_BINS + 2)[1:-1]

    def _count_top(self, top: torch.Tensor) -> None:
        """Pass 0: histogram of the top 16 bits ``top`` ``(K, m)`` of a block."""
        for k in range(top.shape[0]):
            self.hist[k] += torch.bincount(top[k], minlength=_BINS)

    def _keep(self, block: torch.Tensor, top: torch.Tensor) -> None:
        """The gather pass: copy the values of ``block`` in each (row, rank)'s bin into the
        buffers sized by the histogram (allocated before the pass: no small allocation
        outlives a block, which would fragment the heap between the blocks' big ones)."""
        m = block.shape[1]
        mask = torch.zeros(-(-m // _LANES.numel()) * _LANES.numel(), dtype=torch.bool)
        for k, (row, filled) in enumerate(zip(self.kept, self.filled, strict=True)):
            for r, prefix in enumerate(self.prefix[k].tolist()):
                torch.eq(top[k], prefix, out=mask[:m])
                idx = _sparse_nonzero(mask)
                start, filled[r] = filled[r], filled[r] + idx.numel()
                torch.index_select(block[k], 0, idx, out=row[r][start : filled[r]])

    def end_pass(self, pass_index: int) -> None:
        if self.kept is not None:  # the gather pass: pick the answer among the kept values
            pick = [[float(vals.kthvalue(r).values) for vals, r in zip(row, ranks, strict=True)]
                    for row, ranks in zip(self.kept, self.rank.tolist(), strict=True)]  # fmt: skip
            self.values = torch.tensor(pick, dtype=self.dtype)
            self.passes, self.kept = 2, None
            return
        if pass_index == 0:
            totals = self.hist.sum(dim=1)
            self.rank, self.seen = self.ranks(totals), int(totals.sum())
            self.prefix = torch.zeros_like(self.rank)
            self.hist = self.hist[:, None, :].expand(*self.rank.shape, _BINS)
        k, r = self.rank.shape
        hist = self.hist.reshape(k * r, _BINS)
        digit, rank = _first_reaching(hist, self.rank.reshape(-1))
        self.rank = rank.view(k, r)
        self.prefix = (self.prefix << _DIGIT) | digit.view(k, r)
        counts = hist.gather(1, digit[:, None]).view(k, r).tolist()
        # gather a few values; a bin holding many (exact ties, e.g. zeros) is cheaper to count
        limit = min(self.gather_limit, max(self.seen // 16, 1 << 12))
        if pass_index == 0 and sum(map(sum, counts)) <= limit:
            self.kept = [[torch.empty(c, dtype=self.dtype) for c in row] for row in counts]
            self.filled, self.passes = [[0] * r for _ in range(k)], 2
        elif pass_index + 1 < self.passes:
            self.hist = torch.zeros(k, r, _BINS, dtype=torch.int64)
        else:
            self.values = self.prefix.to(self.int).view(self.dtype)


_LANES = torch.arange(8)  # bool mask bytes read as one int64 word


def _sparse_nonzero(mask: torch.Tensor) -> torch.Tensor:
    """The indices of the True entries of a sparse bool ``mask`` (length a multiple of 8).

    ``nonzero`` scans the 8-byte words of the mask instead of its bytes, then
    checks the 8 bytes of the few words that hold a True: ~3× faster when
    under a few percent of the entries are True.
    """
    words = mask.view(torch.int64).nonzero().squeeze(1)
    candidates = (words[:, None] * _LANES.numel() + _LANES).reshape(-1)
    return candidates[mask[candidates]]


def select(a: torch.Tensor, ranks: torch.Tensor, gather_limit: int = 1 << 22) -> torch.Tensor:
    """The exact ``ranks[k, r]``-th smallest of every row of ``a`` ``(K, n)`` (non-negative
    float32/float64), all in memory: :class:`RadixSelect` over one block -> ``(K, R)``."""
    sel = RadixSelect(a.shape[0], a.dtype, lambda total: ranks, gather_limit)
    top = a.view(sel.int) >> sel.top_shift  # computed once for both passes
    sel._count_top(top)
    sel.end_pass(0)
    if sel.kept is not None:
        sel._keep(a, top)
        sel.end_pass(1)
    for p in range(1, sel.passes if sel.values is None else 0):
        sel.observe(p, a)
        sel.end_pass(p)
    return sel.values


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
        """One block ``(K, m)`` of task vectors (or of a payload's tensors: left as they are)."""
        super().observe(pass_index, tau.abs().to(torch.float32))

    def end_pass(self, pass_index: int) -> None:
        super().end_pass(pass_index)
        if self.values is not None:
            self.thresholds = self.values[:, 0]
