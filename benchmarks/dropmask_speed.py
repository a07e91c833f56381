"""DARE keep masks: the previous torch-generator draws vs the counter-based masks, ns/entry.

Computes the masks of ``--experts`` streams over ``--entries`` entries each, in blocks
of ``--block`` entries (the merge engine's row blocks), on one thread:

* ``previous``: what the engine did before (``merging/dropmask.py`` replaced it): one
  seeded ``torch.Generator`` (mt19937) per expert, ``random_(0, 2²⁴)`` into int32 and an
  integer compare, the stream continued from block to block;
* ``torch``: :func:`~fedmerge.merging.dropmask.keep_mask_torch` (int64 SplitMix64; the
  path for non-CPU tensors), per block and in tiles of ``--tile`` entries (cache-sized);
* ``C``: :func:`~fedmerge.merging.dropmask.keep_mask` on CPU (the C loop; what DARE's
  torch kernel runs, and what the fused loops inline).

Prints the best of ``--repeats`` runs, the ratio to ``previous`` and the load average,
plus what each would cost on the issue-20 case (4 experts × 99.5M entries).

    python benchmarks/dropmask_speed.py                      # 4 × 2²⁴ entries, ~1 min
    python benchmarks/dropmask_speed.py --entries 1048576    # quick
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fedmerge.merging.dropmask import keep_mask, keep_mask_torch, stream_key  # noqa: E402

LLM_ENTRIES = 4 * 99_500_000  # issue 20's 4 × 99.5M-parameter merge


def previous(keys: list[int], blocks: list[tuple[int, int]], density: float) -> None:
    """The replaced draw: per-expert mt19937 streams, 24-bit integer draws compared to a limit."""
    gens = [torch.Generator().manual_seed(k >> 1) for k in keys]  # manual_seed takes 63 bits
    limit = int(density * (1 << 24))
    for _, m in blocks:
        keep = torch.empty(len(keys), m, dtype=torch.bool)
        draws = torch.empty(m, dtype=torch.int32)
        for row, g in zip(keep, gens, strict=True):
            torch.lt(draws.random_(0, 1 << 24, generator=g), limit, out=row)


def torch_masks(keys: list[int], blocks: list[tuple[int, int]], density: float, tile: int) -> None:
    for start, m in blocks:
        for s in range(start, start + m, tile):
            keep_mask_torch(keys, s, min(tile, start + m - s), density)


def c_masks(keys: list[int], blocks: list[tuple[int, int]], density: float) -> None:
    for start, m in blocks:
        keep_mask(keys, start, m, density)


def best(fn: Callable[[], None], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--entries", type=int, default=1 << 24, help="per expert")
    parser.add_argument("--block", type=int, default=1 << 20, help="entries per engine block")
    parser.add_argument("--tile", type=int, default=1 << 15, help="entries per torch tile")
    parser.add_argument("--density", type=float, default=0.2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    keys = [stream_key(0, e, "model.embed_tokens.weight") for e in range(args.experts)]
    blocks = [(s, min(args.block, args.entries - s)) for s in range(0, args.entries, args.block)]
    keep_mask(keys, 0, 8, args.density)  # build (or load) the C loops outside the timing
    d = args.density
    cases = {
        "previous (mt19937 random_)": lambda: previous(keys, blocks, d),
        f"torch SplitMix64, {args.block}-entry blocks": lambda: torch_masks(
            keys, blocks, d, args.block
        ),
        f"torch SplitMix64, {args.tile}-entry tiles": lambda: torch_masks(
            keys, blocks, d, args.tile
        ),
        "C SplitMix64 (DARE on CPU)": lambda: c_masks(keys, blocks, d),
    }
    total = args.experts * args.entries
    load = os.getloadavg()[0]
    print(f"{args.experts} experts × {args.entries} entries, blocks of {args.block}, "
          f"density {d}, 1 thread, best of {args.repeats}; load average {load:.2f}")  # fmt: skip
    print(f"{'mask':<44} {'ns/entry':>9} {'vs previous':>12} {'4 × 99.5M (s)':>14}")
    base = None
    for name, fn in cases.items():
        ns = best(fn, args.repeats) / total * 1e9
        base = base or ns
        print(f"{name:<44} {ns:>9.2f} {base / ns:>11.2f}× {ns * LLM_ENTRIES * 1e-9:>14.2f}")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
