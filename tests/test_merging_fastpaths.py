"""The fast merge kernels equal their plain definitions bit for bit.

The engine computes TIES, DARE and their building blocks with cheaper
operations than the textbook formulas (histogram selection, threshold +
copysign trimming, counter-based DARE masks, in-order row sums, a clamp instead of
a masked fill). Each test here writes the plain formula (the previous engine's
code) and demands identical bits, including signed zeros and exact ties.
"""

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmerge.merging import merge
from fedmerge.merging.dropmask import keep_mask_torch, stream_key
from fedmerge.merging.engine import _all_finite
from fedmerge.merging.globalk import RadixSelect, select
from fedmerge.merging.sparsify import keep_by_threshold, sum_rows


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def in_order(t: torch.Tensor) -> torch.Tensor:
    """Σ_k t_k added row after row (one row: torch's sum, 0 + t₀): the defined order."""
    if t.shape[0] == 1:
        return t.sum(dim=0)
    out = t[0].clone()
    for row in t[1:]:
        out = out + row
    return out


def plain_elect(weighted: torch.Tensor, w: torch.Tensor, normalize: bool) -> torch.Tensor:
    """TIES election and disjoint merge as first written (masked fill), with the in-order
    sums the engine defines (``t.sum(dim=0)`` changes its order above 4 rows)."""
    total = in_order(weighted)
    elected = torch.ones_like(total).copysign_(total)
    agreeing = (weighted * elected).clamp(min=0)
    merged = in_order(agreeing)
    if normalize:
        divisor = in_order(agreeing.sign() * w.to(weighted.dtype)[:, None])
        merged = merged / divisor.masked_fill(divisor == 0, 1.0)
    return merged * elected


def plain_ties(base, experts, w, density, normalize):
    tau = torch.stack([e - base for e in experts]).reshape(len(experts), -1)
    n = tau.shape[1]
    k = int(density * n)
    if density < 1:
        if k == 0:
            tau = tau * 0
        else:
            thr = tau.abs().kthvalue(n - k + 1, dim=1).values
            tau = tau * (tau.abs() >= thr[:, None]).to(tau.dtype)
    merged = plain_elect(tau * w.to(tau.dtype)[:, None], w, normalize)
    return (merged * 1.0 + base.reshape(-1)).reshape(base.shape)


def plain_dare_ties(base, experts, density, seed, key):
    tau = torch.stack([e - base for e in experts]).reshape(len(experts), -1)
    keys = [stream_key(seed, i, key) for i in range(len(experts))]
    keep = keep_mask_torch(keys, 0, tau.shape[1], density)  # the int64 torch implementation
    tau = tau * keep.to(tau.dtype) / density
    merged = plain_elect(tau, torch.ones(len(experts), dtype=torch.float64), False)
    return (merged + base.reshape(-1)).reshape(base.shape)


def draw_state(data, k: int, n: int, dtype: torch.dtype):
    """Base and k experts with exact ties, zeros and −0.0 task-vector entries."""
    seed = data.draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=gen, dtype=torch.float64)
    experts = []
    for _ in range(k):
        tau = torch.randn(n, generator=gen, dtype=torch.float64)
        if data.draw(st.booleans()):
            tau = (tau * 4).round() / 4  # many equal magnitudes, zeros included
        experts.append((base + tau).to(dtype))
    return base.to(dtype), experts


@settings(max_examples=60, deadline=None)
@given(data=st.data(), k=st.integers(1, 6), n=st.sampled_from([1, 7, 300, 40_000]),
       dtype=st.sampled_from([torch.float32, torch.float64]),
       density=st.sampled_from([0.01, 0.2, 0.5, 0.9, 1.0]), normalize=st.booleans())  # fmt: skip
def test_ties_equals_the_plain_definition(data, k, n, dtype, density, normalize):
    """Any expert count (row sums change strategy above 4), weights positive or mixed with
    zero and negative ones (the divisor fix changes strategy), ties and tiny densities."""
    base, experts = draw_state(data, k, n, dtype)
    w = data.draw(st.sampled_from(["ones", "positive", "mixed"]))
    weights = {"ones": [1.0] * k, "positive": [0.5, 2.0, 1.5, 0.25, 3.0, 1.0][:k],
               "mixed": [1.0, -1.0, 0.0, 2.0, -0.5, 1.0][:k]}[w]  # fmt: skip
    got = merge("ties", {"w": base}, [{"w": e} for e in experts], weights,
                density=density, normalize=normalize)["w"]  # fmt: skip
    want = plain_ties(base, experts, torch.tensor(weights, dtype=torch.float64), density,
                      normalize)  # fmt: skip
    assert torch.equal(bits(got), bits(want))


@settings(max_examples=30, deadline=None)
@given(data=st.data(), k=st.integers(1, 5), n=st.sampled_from([5, 300, 40_000]),
       dtype=st.sampled_from([torch.float32, torch.float64]),
       density=st.sampled_from([0.1, 0.2, 1 / 3, 0.9]), seed=st.integers(0, 99))  # fmt: skip
def test_dare_ties_equals_the_plain_definition(data, k, n, dtype, density, seed):
    """Masks from the per-(seed, expert, key) streams (torch implementation; the engine
    uses the C one), applied as a float product and ×1/density."""
    base, experts = draw_state(data, k, n, dtype)
    got = merge("dare_ties", {"w": base}, [{"w": e} for e in experts],
                density=density, seed=seed)["w"]  # fmt: skip
    want = plain_dare_ties(base, experts, density, seed, "w")
    assert torch.equal(bits(got), bits(want))


def test_row_sums_add_in_order_for_every_row_count():
    """In order for any K (what the fused loops reproduce); torch's own sum agrees up to 4."""
    gen = torch.Generator().manual_seed(1)
    for dtype in (torch.float32, torch.float64):
        for k in range(1, 9):
            scale = torch.logspace(-6, 6, k, dtype=dtype)[torch.randperm(k, generator=gen)]
            t = torch.randn(k, 10_007, generator=gen, dtype=dtype) * scale[:, None]
            assert torch.equal(bits(sum_rows(t)), bits(in_order(t))), (dtype, k)
            if k <= 4:
                assert torch.equal(bits(sum_rows(t)), bits(t.sum(dim=0))), (dtype, k)


def test_threshold_trim_equals_the_masked_product():
    """Signed zeros and exact ties included; a zero threshold keeps everything."""
    tau = torch.tensor([[0.5, -0.5, 0.0, -0.0, 0.25, -1.0], [3.0, -0.0, -2.0, 2.0, 0.0, 1.0]])
    for thr in ([0.5, 2.0], [0.0, 0.0], [1.5, 3.5], [1e-45, 5e-324]):
        t = torch.tensor(thr)
        for dtype in (torch.float32, torch.float64):
            x = tau.to(dtype)
            want = x * (x.abs() >= t.to(dtype)[:, None]).to(dtype)
            got = keep_by_threshold(x.clone(), t)
            assert torch.equal(bits(got), bits(want)), (thr, dtype)


def test_selection_gathers_the_named_bin_or_counts_digits_exactly():
    """Gathering (the usual case) and digit counting (when the bins are too full) both give
    ``kthvalue``; float64 takes 2 passes when it can gather, 4 when it counts."""
    gen = torch.Generator().manual_seed(3)
    for dtype in (torch.float32, torch.float64):
        a = (torch.randn(3, 5000, generator=gen, dtype=dtype) * 1e3).abs()
        a[:, ::7] = a[:, :1]  # ties
        a[:, ::11] = 0.0
        ranks = torch.tensor([1, 17, 2500, 5000]).expand(3, -1)
        want = torch.stack([a.kthvalue(int(r), dim=1).values for r in ranks[0]], dim=1)
        for limit, passes in ((1 << 22, 2), (0, 2 if dtype == torch.float32 else 4)):
            assert torch.equal(select(a, ranks, limit), want)
            sel = RadixSelect(3, dtype, lambda total, r=ranks: r, limit)
            p = 0
            while p < sel.passes:
                for block in a.split(37, dim=1):
                    sel.observe(p, block.contiguous())
                sel.end_pass(p)
                p += 1
            assert p == passes and torch.equal(sel.values, want)


def test_finiteness_check_survives_an_overflowing_sum():
    big = torch.full((4,), 3e38)
    assert math.isinf(big.sum()) and _all_finite(big)
    for bad in (math.nan, math.inf, -math.inf):
        assert not _all_finite(torch.tensor([1.0, bad, 2.0]))
    assert not _all_finite(torch.tensor([math.inf, -math.inf]))
