"""Properties of the merge methods (hypothesis) and of the exact selection helpers."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmerge.merging import METHODS, merge
from fedmerge.merging.globalk import GlobalThreshold
from fedmerge.merging.sparsify import kth_smallest

# parameters under which a method is the identity on identical experts / a single expert.
# Trimming and dropping methods only are at density 1: with density < 1 they return
# θ_ref + trim(τ) (ties, breadcrumbs) or a random subset of τ (dare), by definition.
NEUTRAL = {
    "average": {},
    "task_arithmetic": {"lambda": 1.0, "normalize": True},
    "ties": {"density": 1.0, "lambda": 1.0},
    "dare_linear": {"density": 1.0, "normalize": True},
    "dare_ties": {"density": 1.0, "normalize": True},
    "breadcrumbs": {"density": 1.0, "normalize": True},
    "breadcrumbs_ties": {"density": 1.0, "normalize": True},
    "magmax": {"lambda": 1.0},
    "fisher": {},
}

floats = st.floats(-10, 10, allow_nan=False, width=32)


def states(n_experts, size):
    vec = st.lists(floats, min_size=size, max_size=size)
    return st.tuples(vec, st.lists(vec, min_size=n_experts, max_size=n_experts))


def fisher_for(method, k, size):
    return [{"w": torch.ones(size)}] * k if METHODS[method].needs_fisher else ()


def test_neutral_table_covers_every_method():
    assert set(NEUTRAL) == set(METHODS)


@settings(max_examples=25, deadline=None)
@given(data=states(1, 6), method=st.sampled_from(sorted(NEUTRAL)))
def test_one_expert_with_lambda_1_returns_it(data, method):
    base, ex = {"w": torch.tensor(data[0])}, {"w": torch.tensor(data[1][0])}
    out = merge(method, base, [ex], fisher=fisher_for(method, 1, 6), **NEUTRAL[method])
    torch.testing.assert_close(out["w"], ex["w"], atol=1e-5, rtol=1e-5)


@settings(max_examples=25, deadline=None)
@given(data=states(1, 5), k=st.integers(2, 4), method=st.sampled_from(sorted(NEUTRAL)),
       w=st.lists(st.floats(0.1, 5), min_size=4, max_size=4))  # fmt: skip
def test_identical_experts_merge_to_that_expert(data, k, method, w):
    base, ex = {"w": torch.tensor(data[0])}, {"w": torch.tensor(data[1][0])}
    weights = None if method == "magmax" else w[:k]  # magmax selects w_k·τ_k, unnormalized
    out = merge(method, base, [ex] * k, weights, fisher=fisher_for(method, k, 5), **NEUTRAL[method])
    torch.testing.assert_close(out["w"], ex["w"], atol=1e-5, rtol=1e-5)


@settings(max_examples=25, deadline=None)
@given(data=states(4, 7), perm=st.permutations(range(4)),
       w=st.lists(st.floats(0.1, 5), min_size=4, max_size=4))  # fmt: skip
def test_average_is_order_invariant(data, perm, w):
    base = {"w": torch.tensor(data[0])}
    experts = [{"w": torch.tensor(v)} for v in data[1]]
    a = merge("average", base, experts, w)
    b = merge("average", base, [experts[i] for i in perm], [w[i] for i in perm])
    torch.testing.assert_close(a["w"], b["w"], atol=1e-5, rtol=1e-5)


@settings(max_examples=40, deadline=None)
@given(data=states(3, 12), density=st.sampled_from([0.25, 0.5, 1.0]))
def test_ties_keeps_only_sign_agreeing_entries(data, density):
    base = {"w": torch.tensor(data[0])}
    experts = [{"w": torch.tensor(v)} for v in data[1]]
    tau = torch.stack([e["w"] - base["w"] for e in experts])
    out = merge("ties", base, experts, density=density)["w"] - base["w"]
    trimmed = merge("ties", base, experts, density=density, normalize=False)["w"] - base["w"]
    elected = torch.where(trimmed >= 0, 1.0, -1.0)
    assert bool((out * elected >= -1e-5).all())  # never against the elected sign
    agreeing = torch.where(tau * elected > 0, tau.abs(), 0.0).amax(dim=0)
    assert bool((out.abs() <= agreeing + 1e-4).all())  # a mean of agreeing entries only


@settings(max_examples=20, deadline=None)
@given(data=states(3, 9), method=st.sampled_from(["dare_linear", "dare_ties"]))
def test_dare_with_p_0_is_task_arithmetic_or_ties(data, method):
    base = {"w": torch.tensor(data[0])}
    experts = [{"w": torch.tensor(v)} for v in data[1]]
    got = merge(method, base, experts, density=1.0, **{"lambda": 0.7})
    if method == "dare_linear":
        want = merge("task_arithmetic", base, experts, **{"lambda": 0.7})
    else:
        want = merge("ties", base, experts, density=1.0, normalize=False, **{"lambda": 0.7})
    torch.testing.assert_close(got["w"], want["w"])


def test_dare_mean_over_seeds_approaches_task_arithmetic():
    gen = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(50, generator=gen)}
    experts = [{"w": base["w"] + torch.randn(50, generator=gen)} for _ in range(3)]
    ta = merge("task_arithmetic", base, experts, **{"lambda": 1.0})["w"]
    runs = torch.stack(
        [merge("dare_linear", base, experts, density=0.5, seed=s)["w"] for s in range(400)]
    )
    # each run has std ≈ sqrt(Σ τ²) per entry; the mean of 400 shrinks it 20-fold
    err = (runs.mean(0) - ta).abs().max()
    one_run = (runs[0] - ta).abs().max()
    assert err < 0.35 and err < one_run / 5


@settings(max_examples=30, deadline=None)
@given(n=st.integers(70_000, 90_000), frac=st.floats(0, 1), ties=st.booleans(),
       seed=st.integers(0, 100))  # fmt: skip
def test_kth_smallest_is_exact_on_long_rows(n, frac, ties, seed):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(2, n, generator=gen).abs()
    if ties:
        a = (a * 4).round() / 4  # many equal values, zeros included
    k = min(n, max(1, int(frac * n)))
    torch.testing.assert_close(kth_smallest(a, k), a.kthvalue(k, dim=1).values, rtol=0, atol=0)


@settings(max_examples=20, deadline=None)
@given(sizes=st.lists(st.integers(1, 300), min_size=1, max_size=5),
       density=st.floats(0.01, 0.99), seed=st.integers(0, 100))  # fmt: skip
def test_global_threshold_equals_official_kthvalue_over_the_whole_model(sizes, density, seed):
    gen = torch.Generator().manual_seed(seed)
    chunks = [torch.randn(3, s, generator=gen) * 10 ** torch.randn(1).item() for s in sizes]
    copies = [c.clone() for c in chunks]
    g = GlobalThreshold(density, 3)
    for p in range(g.passes):
        for c in chunks:
            g.observe(p, c)  # and leaves c as it was
        g.end_pass(p)
    flat = torch.cat(chunks, dim=1).abs()
    assert all(torch.equal(c, d) for c, d in zip(chunks, copies, strict=True))
    n = flat.shape[1]
    want = flat.kthvalue(max(1, n - int(n * density)), dim=1).values
    assert torch.equal(g.thresholds, want)
