"""The fused CPU forms (C loops) equal the torch kernels bit for bit.

Each test merges the same inputs twice, once with the method's fused form and
once with its torch kernel (``plan.fused = False``, the reference), and
demands identical bit patterns (signed zeros included), for bfloat16 and
float32 inputs and outputs, in one block and in many, with exact ties at the
thresholds, all-zero columns, −0.0, mixed weights, normalize on and off.
"""

import os
import shutil
from contextlib import ExitStack

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmerge.checkpoint import open_checkpoint, save_state_dict
from fedmerge.errors import ValidationError
from fedmerge.merging import StateSource, fused, native, plan_merge, run_plan

WHOLE = 1 << 40  # every key in one block
pytestmark = pytest.mark.skipif(
    shutil.which(os.environ.get("CC", "cc")) is None, reason="no C compiler to build the loops"
)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({2: torch.int16, 4: torch.int32}[t.element_size()])


def both(method, base, experts, weights=None, params=None, chunk=WHOLE, dtype=None):
    """(fused result, torch result) of the same merge, and how many fused loops ran."""
    names = ["base", *(f"e{i}" for i in range(len(experts)))]
    out, ran = [], []
    for use_fused in (True, False):
        src = [StateSource(s, n) for s, n in zip([base, *experts], names, strict=True)]
        plan = plan_merge(method, src[0], src[1:], names, weights, params, dtype=dtype,
                          chunk_elements=chunk)  # fmt: skip
        plan.fused = use_fused
        calls = []
        with _counting(calls):
            out.append(dict(run_plan(plan)))
        ran.append(len(calls))
    return out[0], out[1], ran


class _counting:
    """Count the calls of the fused merge loops (to prove the fused path ran)."""

    def __init__(self, calls):
        self.calls, self.saved = calls, {}

    def __enter__(self):
        for name in ("mix_block", "ties_block"):
            loop = self.saved[name] = getattr(native, name)
            setattr(native, name, lambda *a, _f=loop: self.calls.append(1) or _f(*a))

    def __exit__(self, *exc):
        for name, loop in self.saved.items():
            setattr(native, name, loop)


def assert_same(got: dict, want: dict):
    assert got.keys() == want.keys()
    for key in want:
        assert got[key].dtype == want[key].dtype
        assert torch.equal(bits(got[key]), bits(want[key])), (key, got[key], want[key])


def state(seed: int, k: int, shapes: dict, dtype: torch.dtype, coarse: bool):
    """Base and k experts; ``coarse``: τ on a 1/4 grid (exact ties, zeros, −0.0 in bf16)."""
    gen = torch.Generator().manual_seed(seed)
    base = {}
    for key, shape in shapes.items():
        b = torch.randn(shape, generator=gen)
        b.view(-1)[::5] = -0.0  # −0.0 in the base: θ_ref + (±0) keeps its sign or not
        base[key] = b.to(dtype)
    experts = []
    for _ in range(k):
        e = {}
        for key, shape in shapes.items():
            tau = torch.randn(shape, generator=gen)
            tau = (tau * 4).round() / 4 if coarse else tau * 0.01
            tau.view(-1)[::7] = 0.0  # all-zero columns where every expert has τ = 0
            e[key] = (base[key].float() + tau).to(dtype)
        experts.append(e)
    return base, experts


SHAPES = {"emb": (60, 40), "vec": (37,), "one": (1, 3), "s": ()}
WEIGHTS = {"ones": [1.0] * 6, "positive": [0.5, 2.0, 1.5, 0.25, 3.0, 1.0],
           "mixed": [1.0, -1.0, 0.0, 2.0, -0.5, 1.0]}  # fmt: skip


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 2**16), k=st.integers(1, 6),
       dtype=st.sampled_from([torch.bfloat16, torch.float32]), coarse=st.booleans(),
       method=st.sampled_from(["task_arithmetic", "ties", "average", "dare_ties",
                               "dare_linear"]),
       rescale=st.sampled_from(["inverse", "none", "l1"]), dare_seed=st.integers(0, 3),
       w=st.sampled_from(sorted(WEIGHTS)), normalize=st.booleans(),
       lam=st.sampled_from([1.0, 0.3, 2.5]), density=st.sampled_from([0.01, 0.2, 0.5, 1.0]),
       scope=st.sampled_from(["tensor", "global"]),
       chunk=st.sampled_from([WHOLE, 1, 97]))  # fmt: skip
def test_fused_equals_torch_kernel(seed, k, dtype, coarse, method, rescale, dare_seed, w,
                                   normalize, lam, density, scope, chunk):  # fmt: skip
    """Every fused method against its torch kernel; the loops ran unless the parameters are
    ones the fused forms leave to torch (average's plain sum, DARE's l1 rescaling)."""
    base, experts = state(seed, k, SHAPES, dtype, coarse)
    weights = WEIGHTS[w][:k]
    params = {"normalize": normalize}
    if method == "average":
        weights = [abs(x) + 0.5 for x in weights]  # average takes positive weights only
    else:
        params["lambda"] = lam
    if method == "ties":
        params |= {"density": density, "scope": scope}
    if method.startswith("dare"):
        params |= {"density": density, "rescale": rescale, "seed": dare_seed}
    got, want, ran = both(method, base, experts, weights, params, chunk)
    assert_same(got, want)
    l1 = method.startswith("dare") and rescale == "l1" and density < 1  # needs a norms pass
    torch_only = method == "average" and not normalize or l1
    assert ran[1] == 0 and (ran[0] > 0) != torch_only


@pytest.mark.parametrize("src,out", [(torch.bfloat16, torch.float32),
                                     (torch.float32, torch.bfloat16)])  # fmt: skip
@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_output_dtype_other_than_the_inputs(src, out, method):
    base, experts = state(3, 3, SHAPES, src, coarse=True)
    got, want, ran = both(method, base, experts, [0.5, 2.0, 1.0], {"lambda": 0.7}, 97, out)
    assert_same(got, want)
    assert ran[0] > 0


def test_bfloat16_rounding_equals_torch_for_every_kind_of_float():
    """float32 -> bfloat16 round-to-nearest-even: halfway cases (both parities), values that
    round up to the next binade or to Inf (rejected as non-finite output), subnormals, ±0."""
    gen = torch.Generator().manual_seed(0)
    patterns = torch.randint(0, 2**31 - 1, (200_000,), generator=gen, dtype=torch.int64)
    halfway = (torch.arange(0, 2**15, 7, dtype=torch.int64) << 16) | 0x8000
    odd_halfway = halfway | 0x10000
    x = torch.cat([patterns, halfway, odd_halfway, torch.tensor([0, 1, 0x7F7F7FFF])])
    x = x.to(torch.int32).view(torch.float32)
    x = torch.cat([x, -x])
    x = x[torch.isfinite(x) & (x.abs() < 3.3e38)]  # below the largest bfloat16's rounding edge
    base = {"w": torch.zeros_like(x)}
    got, want, ran = both("task_arithmetic", base, [{"w": x}], None, {"lambda": 1.0},
                          dtype=torch.bfloat16)  # fmt: skip
    assert_same(got, want)
    assert ran[0] > 0


def test_hand_picked_signed_zeros_and_threshold_ties():
    """Columns: all experts ±0 (with a −0.0 base), ties exactly at the threshold, a column
    where the elected sign has no agreeing weight (mixed weights), opposite equal masses."""
    base = torch.tensor([-0.0, 0.0, 1.0, -1.0, 2.0, 0.5, -0.0, 3.0])
    taus = [[-0.0, 0.0, 0.5, -0.5, 1.0, 0.25, 0.0, -1.0],
            [0.0, -0.0, 0.5, 0.5, -1.0, -0.25, -0.0, 1.0],
            [-0.0, -0.0, -0.5, 0.5, 1.0, 0.25, 0.0, 0.0]]  # fmt: skip
    experts = [{"w": base + torch.tensor(t)} for t in taus]
    for dtype in (torch.bfloat16, torch.float32):
        b = {"w": base.to(dtype)}
        ex = [{"w": e["w"].to(dtype)} for e in experts]
        for weights in ([1.0, 1.0, 1.0], [1.0, -1.0, 0.0], [0.5, 0.5, 2.0]):
            for normalize in (True, False):
                for density in (0.25, 0.5, 1.0):
                    params = {"density": density, "normalize": normalize}
                    got, want, _ = both("ties", b, ex, weights, params)
                    assert_same(got, want)
                got, want, _ = both("task_arithmetic", b, ex, weights, {"normalize": normalize})
                assert_same(got, want)


def exact_kth(tau: torch.Tensor, rank: int) -> np.ndarray:
    return tau.abs().kthvalue(rank, dim=1).values.numpy()


def kth_call(base: torch.Tensor, experts: list[torch.Tensor], chunks: int) -> fused.FusedCall:
    rows = base.shape[0]
    step = -(-rows // chunks)
    parts = [None] if chunks == 1 else [(r, min(r + step, rows)) for r in range(0, rows, step)]

    def read(r):
        return (
            (base, experts) if r is None else (base[r[0] : r[1]], [e[r[0] : r[1]] for e in experts])
        )

    return fused.FusedCall(read, parts, torch.empty(base.numel(), dtype=base.dtype),
                           torch.ones(len(experts), dtype=torch.float64), {})  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("chunks", [1, 9])
def test_kth_magnitude_bracket_is_exact_and_usually_hits(dtype, chunks, monkeypatch):
    """The sampled bracket gives kthvalue's answer for ranks across the range, in bf16 with
    heavy exact ties at the answer and at the bracket's edges; it never needs the radix
    fallback on such data (checked by making the fallback fail)."""
    gen = torch.Generator().manual_seed(1)
    n_rows, width = 600, 512
    base = torch.randn(n_rows, width, generator=gen).to(dtype)
    experts = [(base.float() + 0.01 * torch.randn(n_rows, width, generator=gen)).to(dtype)
               for _ in range(2)]  # fmt: skip
    tau = torch.stack([e.float() - base.float() for e in experts]).reshape(2, -1)
    monkeypatch.setattr(fused, "_radix", lambda call, rank: pytest.fail("bracket missed"))
    n = tau.shape[1]
    for rank in (n // 2, n - int(0.2 * n) + 1, n - int(0.01 * n) + 1, n):
        got = fused.kth_magnitudes(kth_call(base, experts, chunks), rank)
        assert np.array_equal(got, exact_kth(tau, rank)), rank


def test_kth_magnitude_falls_back_exactly_on_zeros_and_small_keys():
    """The rank inside a mass of exact zeros and a rank of 1 go to the two radix passes, a key
    below the sampling size is partitioned whole (in one block or several); all exact."""
    gen = torch.Generator().manual_seed(2)
    base = torch.randn(700, 512, generator=gen)
    experts = [base.clone(), base + torch.randn(700, 512, generator=gen)]
    experts[1].view(-1)[:200_000] = base.view(-1)[:200_000]  # zeros in both
    tau = torch.stack([e - base for e in experts]).reshape(2, -1)
    for rank in (1, 1000, 150_000, tau.shape[1]):
        got = fused.kth_magnitudes(kth_call(base, experts, 5), rank)
        assert np.array_equal(got, exact_kth(tau, rank)), rank
    small = base[:10], [e[:10] for e in experts]
    small_tau = tau.view(2, 700, 512)[:, :10].reshape(2, -1)
    for chunks, rank in [(1, 7), (1, 1), (4, 2000), (4, small_tau.shape[1])]:
        got = fused.kth_magnitudes(kth_call(*small, chunks), rank)
        assert np.array_equal(got, exact_kth(small_tau, rank)), (chunks, rank)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_big_keys_through_the_bracket_equal_the_torch_kernel(dtype):
    """Keys above the sampling size (the bracket path), in blocks and whole."""
    base, experts = state(5, 4, {"emb": (600, 512)}, dtype, coarse=False)
    for chunk in (WHOLE, 40_000):
        got, want, _ = both("ties", base, experts, None, {"density": 0.2}, chunk)
        assert_same(got, want)


@pytest.mark.parametrize("method", ["ties", "dare_ties", "task_arithmetic"])
def test_checkpoint_files_in_blocks_and_whole_equal_the_torch_kernel(tmp_path, method, monkeypatch):
    """From memory-mapped files, in blocks and whole, the fused loops equal the torch kernel;
    TIES' sampled bracket must hit (runs of rows, read one at a time, whose |τ| grows along
    the rows: a sample that kept one run's values for all would miss)."""
    base, experts = state(6, 3, {"emb": (600, 512), "b": (300,)}, torch.bfloat16, coarse=False)
    scale = torch.linspace(1, 8, 600)[:, None]
    for e in experts:
        e["emb"] = (base["emb"].float() + (e["emb"].float() - base["emb"].float()) * scale).to(
            torch.bfloat16
        )
    paths = []
    for i, sd in enumerate([base, *experts]):
        paths.append(tmp_path / f"m{i}.safetensors")
        save_state_dict(sd, paths[-1])
    monkeypatch.setattr(fused, "_radix", lambda call, rank: pytest.fail("bracket missed"))
    names = [str(p) for p in paths]
    for chunk in (WHOLE, 40_000):
        out = []
        for use_fused in (True, False):
            with ExitStack() as stack:
                cks = [stack.enter_context(open_checkpoint(p)) for p in paths]
                params = {} if method == "task_arithmetic" else {"density": 0.2}
                plan = plan_merge(method, cks[0], cks[1:], names, params=params,
                                  chunk_elements=chunk)  # fmt: skip
                plan.fused = use_fused
                out.append(dict(run_plan(plan)))
        assert_same(*out)


@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_non_finite_inputs_and_outputs_raise_the_torch_paths_errors(method, dtype):
    base, experts = state(7, 2, {"w": (50, 4)}, dtype, coarse=True)
    errors = []
    for bad in ("base", "e1", "overflow", "output"):
        b, ex = {"w": base["w"].clone()}, [{"w": e["w"].clone()} for e in experts]
        params = {"lambda": 1.0}
        if bad == "base":
            b["w"][30, 1] = float("nan")
        elif bad == "e1":
            ex[1]["w"][40, 2] = float("inf")
        elif bad == "overflow":  # finite inputs whose difference overflows float32
            b["w"][10, 0], ex[0]["w"][10, 0] = -3e38, 3e38
        else:  # finite τ, but θ_ref + λ·τ is not
            params["lambda"] = 3e38
        messages = []
        for use_fused in (True, False):
            names = ["base", "e0", "e1"]
            src = [StateSource(s, n) for s, n in zip([b, *ex], names, strict=True)]
            plan = plan_merge(method, src[0], src[1:], names, None, params, chunk_elements=40)
            plan.fused = use_fused
            with pytest.raises(ValidationError) as info:
                dict(run_plan(plan))
            messages.append(str(info.value))
        assert messages[0] == messages[1], (bad, messages)
        errors.append(messages[0])
    assert len(set(errors)) == 4 and "merged output" in errors[-1]
