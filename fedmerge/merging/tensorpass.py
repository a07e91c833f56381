"""Per-tensor statistics gathered over a key's blocks before a kernel runs on them.

A key too big for one block is merged block by block (rows of the tensor).
Methods whose kernel needs a statistic of the whole tensor declare a
``tensor_pass``: an object with ``passes`` (which ``end_pass`` may lower),
``observe(pass_index, tau)`` (one block of stacked task vectors ``(K, m)``)
and ``end_pass(pass_index)`` that, after its last pass, stores the statistic in the key's
:class:`~fedmerge.merging.methods.KeyContext`. The kernel then applies it to
every block and gets the same result as on the whole tensor.

>>> import torch
>>> from fedmerge.merging.methods import KeyContext
>>> ctx = KeyContext("w", numel=5)
>>> tp = KthMagnitudes([4], 1, torch.float32, ctx)
>>> for p in range(tp.passes):
...     for block in (torch.tensor([[1.0, -4.0]]), torch.tensor([[3.0, 2.0, -0.5]])):
...         tp.observe(p, block)
...     tp.end_pass(p)
>>> ctx.kth[4].tolist()   # the 4th smallest |τ| of the five
[3.0]
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from fedmerge.merging.dropmask import keep_mask
from fedmerge.merging.globalk import RadixSelect
from fedmerge.merging.sparsify import drop_norms

if TYPE_CHECKING:
    from fedmerge.merging.methods import KeyContext


class KthMagnitudes:
    """The exact ``rank``-th smallest |τ_k| of every expert over the whole tensor -> ``ctx.kth``.

    Equal to :func:`~fedmerge.merging.sparsify.kth_smallest` on the whole
    ``|τ|`` in the work dtype (2 passes; float64 with heavy ties: 4).
    """

    def __init__(self, ranks: list[int], n_experts: int, dtype: torch.dtype, ctx: KeyContext):
        wanted = torch.tensor(ranks, dtype=torch.int64)
        self.ranks, self.ctx = ranks, ctx
        self.select = RadixSelect(n_experts, dtype, lambda total: wanted.expand(len(total), -1))

    @property
    def passes(self) -> int:
        return self.select.passes  # 2 once the first pass finds the bins small enough

    def observe(self, pass_index: int, tau: torch.Tensor) -> None:
        """One block of task vectors ``(K, m)``; overwritten (the engine reads each block anew)."""
        self.select.observe(pass_index, tau.abs_())

    def end_pass(self, pass_index: int) -> None:
        self.select.end_pass(pass_index)
        if self.select.values is not None:
            self.ctx.kth = {r: self.select.values[:, i] for i, r in enumerate(self.ranks)}


class DropNorms:
    """DARE ``rescale: l1``: each expert's L1 norm before and after dropping -> ``ctx.norms``.

    Computes the masks of ``ctx.stream_keys`` at the block's offset ``ctx.start``
    (the kernel's pass computes the same masks again).
    """

    passes = 1

    def __init__(self, density: float, ctx: KeyContext):
        self.density, self.ctx = density, ctx
        self.sums: tuple[torch.Tensor, torch.Tensor] | None = None

    def observe(self, pass_index: int, tau: torch.Tensor) -> None:
        ctx = self.ctx
        before, after = drop_norms(
            tau, keep_mask(ctx.stream_keys, ctx.start, tau.shape[1], self.density, tau.device)
        )
        self.sums = (before, after) if self.sums is None else (
            self.sums[0] + before, self.sums[1] + after)  # fmt: skip

    def end_pass(self, pass_index: int) -> None:
        self.ctx.norms = self.sums
