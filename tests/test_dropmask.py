"""DARE's counter-based keep masks: SplitMix64 as published, two implementations with
identical bits, any block order, and masks that look independent and Bernoulli(density).

The statistical checks run on fixed keys (deterministic); each bound is a p ≈ 1e-6 tail of
the distribution the statistic has under the null hypothesis, so a real defect fails them
while a good generator passes them every time."""

import math

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmerge.merging import native
from fedmerge.merging.dropmask import (
    keep_limit,
    keep_mask,
    keep_mask_torch,
    stream_key,
)

MASK = (1 << 64) - 1


def splitmix64(state: int):
    """Vigna's splitmix64.c, transcribed: ``next()`` adds γ to the state and mixes it."""
    while True:
        state = (state + 0x9E3779B97F4A7C15) & MASK
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
        yield z ^ (z >> 31)


def plain_keep(key: int, index: int, density: float) -> bool:
    """Entry ``index`` is kept iff the 53-bit uniform of the (index+1)-th output < density."""
    gen = splitmix64((key + index * 0x9E3779B97F4A7C15) & MASK)  # skip index outputs
    return (next(gen) >> 11) * 2.0**-53 < density


def uniforms(key: int, start: int, m: int) -> np.ndarray:
    """u_i = (h_i >> 11)·2⁻⁵³ of entries start..start+m−1 (numpy uint64 wraps mod 2⁶⁴)."""
    z = np.uint64(key) + np.arange(start + 1, start + m + 1, dtype=np.uint64) * np.uint64(
        0x9E3779B97F4A7C15
    )
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return ((z ^ (z >> np.uint64(31))) >> np.uint64(11)).astype(np.float64) * 2.0**-53


def test_splitmix64_reference_gives_the_published_outputs_for_seed_0():
    gen = splitmix64(0)
    published = [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F, 0xF88BB8A8724C81EC]
    assert [next(gen) for _ in range(4)] == published


def test_hand_computed_decisions_for_stream_key_0():
    """Outputs 1..4 of seed 0 give u = 0.8833, 0.4315, 0.0264, 0.9709 (h / 2⁶⁴)."""
    want = {0.5: [0, 1, 1, 0], 0.9: [1, 1, 1, 0], 0.03: [0, 0, 1, 0], 0.02: [0, 0, 0, 0]}
    for density, keep in want.items():
        assert keep_mask([0], 0, 4, density)[0].tolist() == [bool(k) for k in keep]
        assert keep_mask_torch([0], 0, 4, density)[0].tolist() == [bool(k) for k in keep]
    # entry 2 alone: u = 0x06C45D188009454F >> 11 times 2⁻⁵³, just above and below it
    u = (0x06C45D188009454F >> 11) * 2.0**-53
    assert keep_mask([0], 2, 1, math.nextafter(u, 1)).item()
    assert not keep_mask([0], 2, 1, u).item()  # kept iff u < density, strictly


KEYS = st.one_of(st.sampled_from([0, 1, 2**63 - 1, 2**63, 2**64 - 1]), st.integers(0, MASK))
DENSITIES = st.one_of(
    st.sampled_from([0.1, 0.2, 1 / 3, 0.5, 0.9, 1.0, 1e-12, 2**-53, 1 - 2**-53]),
    st.floats(0.0, 1.0, exclude_min=True),
)


@settings(max_examples=200, deadline=None)
@given(keys=st.lists(KEYS, min_size=1, max_size=4), start=st.sampled_from([0, 1, 2**32 - 3,
       2**40 + 5, 2**62]), m=st.integers(0, 300), density=DENSITIES)  # fmt: skip
def test_torch_and_c_implementations_agree_bit_for_bit(keys, start, m, density):
    """Also past 2³² entries and for keys with the top bit set (negative as int64)."""
    want = keep_mask_torch(keys, start, m, density)
    assert want.shape == (len(keys), m) and want.dtype == torch.bool
    assert torch.equal(keep_mask(keys, start, m, density), want)
    np_keys = np.array(keys, dtype=np.uint64)
    assert np.array_equal(native.keep_mask(np_keys, start, m, keep_limit(density)), want.numpy())
    as_int64 = torch.from_numpy(np_keys.view(np.int64))  # keys given as a tensor of their bits
    assert torch.equal(keep_mask_torch(as_int64, start, m, density), want)
    for k, key in enumerate(keys):
        for j in range(0, m, 37):  # the plain reference, sparsely
            assert plain_keep(key, start + j, density) == bool(want[k, j])


def test_keep_limit_is_the_count_of_53_bit_uniforms_below_density():
    """(limit − 1)·2⁻⁵³ < density ≤ limit·2⁻⁵³ (exact in float64), clamped to [0, 2⁵³]."""
    gen = torch.Generator().manual_seed(0)
    grid = [0.1, 1 / 3, 0.5, 2**-53, 3 * 2**-54, 1e-300, 1 - 2**-53, 1.0]
    for density in grid + torch.rand(200, generator=gen, dtype=torch.float64).tolist():
        limit = keep_limit(density)
        assert (limit - 1) * 2.0**-53 < density <= limit * 2.0**-53, density
    assert keep_limit(0.0) == 0 and keep_limit(1.0) == keep_limit(5.0) == 2**53
    assert keep_limit(0.5) == 2**52 and keep_limit(1e-300) == 1


def test_stream_keys_are_64_bit_and_differ_by_seed_expert_and_key():
    keys = {stream_key(s, e, k) for s in range(3) for e in range(4) for k in ("a", "b", "a.b")}
    assert len(keys) == 36 and all(0 <= k < 2**64 for k in keys)
    assert max(keys) >= 2**63  # the full 64 bits, not 63


def test_keep_rate_is_binomial_for_every_density():
    """2²⁰ entries of each of 4 keys: |rate − density| within 5 binomial σ (p < 6e-7)."""
    m = 1 << 20
    keys = [stream_key(0, e, "w") for e in range(4)]
    for density in (0.001, 0.01, 0.1, 0.3, 0.5, 0.9, 0.99):
        rates = keep_mask(keys, 12345, m, density).double().mean(dim=1)
        sigma = math.sqrt(density * (1 - density) / m)
        assert bool(((rates - density).abs() < 5 * sigma).all()), (density, rates)


def chi2_bound(dof: int) -> float:
    """An upper p ≈ 1e-6 quantile of χ²(dof) (Wilson–Hilferty, z = 4.75)."""
    z, v = 4.75, 2 / (9 * dof)
    return dof * (1 - v + z * math.sqrt(v)) ** 3


def chi2_2x2(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson χ² (1 dof) of independence of two bool sequences."""
    n = a.numel()
    pa, pb = a.double().mean(), b.double().mean()
    stat = 0.0
    for x, px in ((a, pa), (~a, 1 - pa)):
        for y, py in ((b, pb), (~b, 1 - pb)):
            expected = n * px * py
            stat += float(((x & y).sum() - expected) ** 2 / expected)
    return stat


def test_masks_are_independent_across_experts_neighbours_and_related_keys():
    """χ² of 2×2 tables: expert vs expert of one key, entry i vs i+1 and i+64 of one
    stream, and streams whose keys differ in one low bit or by 1 (nearby Weyl states)."""
    m = 1 << 20
    for density in (0.1, 0.5):
        keys = [stream_key(3, e, "layer.weight") for e in range(4)]
        masks = keep_mask(keys, 0, m, density)
        pairs = [(masks[i], masks[j]) for i in range(4) for j in range(i + 1, 4)]
        pairs += [(masks[0, :-1], masks[0, 1:]), (masks[1, :-64], masks[1, 64:])]
        near = keep_mask([keys[0] + 1, keys[0] ^ 4, 0, 1], 0, m, density)
        pairs += [(masks[0], near[0]), (masks[0], near[1]), (near[2], near[3])]
        for a, b in pairs:
            assert chi2_2x2(a, b) < chi2_bound(1), density


def test_uniforms_are_uniform_alone_and_in_pairs():
    """The 53-bit uniforms behind the decisions (the numpy transcription equals the mask):
    256 equal bins, and 16 × 16 bins of neighbouring pairs (u_i, u_i+1)."""
    key, m = stream_key(0, 0, "emb"), 1 << 20
    u = uniforms(key, 0, m)
    assert np.array_equal(u < 0.37, keep_mask([key], 0, m, 0.37)[0].numpy())
    for counts in (np.bincount((u * 256).astype(np.int64), minlength=256),
                   np.bincount((u[:-1] * 16).astype(np.int64) * 16 + (u[1:] * 16).astype(np.int64),
                               minlength=256)):  # fmt: skip
        expected = counts.sum() / 256
        assert ((counts - expected) ** 2 / expected).sum() < chi2_bound(255)
