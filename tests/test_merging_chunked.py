"""The block-wise engine: merging in tiny row blocks gives the whole-tensor result bit for bit."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmerge import open_checkpoint, read_metadata, save_state_dict
from fedmerge.merging import METHODS, StateSource, merge, merge_checkpoints, plan_merge, run_plan
from fedmerge.merging.dropmask import keep_mask, keep_mask_torch
from fedmerge.merging.engine import blocks
from fedmerge.merging.globalk import RadixSelect

WHOLE = 1 << 40  # a chunk no tensor reaches: every key in one block (the previous engine)


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bit patterns (so that −0.0 and 0.0 differ)."""
    return t.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def run(method, base, experts, fishers, params, chunk):
    names = ["base", *(f"e{i}" for i in range(len(experts))), *(f"f{i}" for i in fishers)]
    src = [StateSource(s, n) for s, n in zip([base, *experts, *fishers], names, strict=True)]
    k = len(experts)
    plan = plan_merge(method, src[0], src[1 : 1 + k], names, [1.0, 0.5, 2.0][:k], params,
                      src[1 + k :], chunk_elements=chunk)  # fmt: skip
    return dict(run_plan(plan))


def method_params(method: str, draw) -> dict:
    known = METHODS[method].resolve()
    params = {}
    if "density" in known:
        params["density"] = draw(st.sampled_from([0.05, 0.3, 0.5, 0.9, 1.0]))
    if "scope" in known:
        params["scope"] = draw(st.sampled_from(["tensor", "global"]))
    if "rescale" in known:
        params["rescale"] = draw(st.sampled_from(["inverse", "l1", "none"]))
    if "gamma" in known:
        params["gamma"] = draw(st.sampled_from([0.0, 0.1, 0.4]))
    return params


@settings(max_examples=60, deadline=None)
@given(data=st.data(), method=st.sampled_from(sorted(METHODS)), k=st.integers(1, 3),
       chunk=st.integers(1, 13), dtype=st.sampled_from([torch.float32, torch.float64]),
       coarse=st.booleans(), seed=st.integers(0, 2**16))  # fmt: skip
def test_chunked_equals_whole_tensor(data, method, k, chunk, dtype, coarse, seed):
    """Any method, tiny chunks (a row or a few), float32/float64, with and without exact ties
    among the magnitudes: every output bit equals the one-block merge. The exception: DARE
    ``rescale: l1`` on float64 sums float64 norms in a different order (a few ulps)."""
    gen = torch.Generator().manual_seed(seed)
    shapes = {"emb": (17, 3), "vec": (29,), "t3": (5, 2, 3), "one": (1, 4), "s": ()}

    def rand(shape):
        x = torch.randn(shape, generator=gen, dtype=torch.float64)
        return ((x * 4).round() / 4 if coarse else x).to(dtype)  # coarse: many equal |τ|

    base = {key: rand(s) for key, s in shapes.items()}
    experts = [{key: base[key] + rand(s) for key, s in shapes.items()} for _ in range(k)]
    fishers = [{key: rand(s).abs() for key, s in shapes.items()} for _ in range(k)]
    fishers = fishers if METHODS[method].needs_fisher else []
    params = method_params(method, data.draw)
    want = run(method, base, experts, fishers, params, WHOLE)
    got = run(method, base, experts, fishers, params, chunk)
    for key in shapes:
        if params.get("rescale") == "l1" and dtype == torch.float64:
            # rounding of the float64 norm ratio only: a few ulps, absolute ≤ 1e-14 near zero
            torch.testing.assert_close(got[key], want[key], rtol=1e-13, atol=1e-14)
        else:
            assert torch.equal(bits(got[key]), bits(want[key])), (key, got[key], want[key])


def test_blocks_are_row_slices_of_about_chunk_elements():
    base = {"emb": torch.zeros(10, 4), "bias": torch.zeros(3), "s": torch.tensor(1.0)}
    plan = plan_merge("ties", StateSource(base, "b"), [StateSource(base, "e")], ["b", "e"],
                      chunk_elements=9)  # fmt: skip
    assert blocks(plan, "emb") == [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10)]
    assert blocks(plan, "bias") == [None] and blocks(plan, "s") == [None]
    wide = plan_merge("ties", StateSource({"w": torch.zeros(2, 50)}, "b"),
                      [StateSource({"w": torch.zeros(2, 50)}, "e")], ["b", "e"],
                      chunk_elements=9)  # fmt: skip
    assert blocks(wide, "w") == [(0, 1), (1, 2)]  # at least one row


def test_threshold_ties_keep_every_tied_entry_whole_or_chunked():
    """|τ| = [1, 2, 2, 2, 3], density 0.4: k = 2, the threshold is the 4th smallest |τ| = 2,
    and all three entries tied at it are kept (mergekit would keep an arbitrary one)."""
    base = {"w": torch.zeros(5)}
    experts = [{"w": torch.tensor([1.0, -2.0, 2.0, 2.0, -3.0])}]
    for chunk in (WHOLE, 1, 2):
        out = run("ties", base, experts, [], {"density": 0.4}, chunk)["w"]
        assert out.tolist() == [0.0, -2.0, 2.0, 2.0, -3.0]


def test_radix_select_is_exact_for_several_ranks_and_float64():
    gen = torch.Generator().manual_seed(3)
    for dtype in (torch.float32, torch.float64):
        a = (torch.randn(3, 1000, generator=gen, dtype=dtype) * 1e3).abs()
        a[:, ::7] = a[:, :1]  # ties
        ranks = torch.tensor([1, 17, 500, 1000])
        sel = RadixSelect(3, dtype, lambda total, r=ranks: r.expand(len(total), -1))
        p = 0
        while p < sel.passes:  # the first pass may shorten the stream (gathering the bin)
            for block in a.split(37, dim=1):
                sel.observe(p, block.contiguous())
            sel.end_pass(p)
            p += 1
        want = torch.stack([a.kthvalue(int(r), dim=1).values for r in ranks], dim=1)
        assert p == 2
        assert torch.equal(sel.values, want)


@settings(max_examples=20, deadline=None)
@given(sizes=st.lists(st.integers(0, 40), min_size=1, max_size=6), seed=st.integers(0, 99),
       first=st.sampled_from([0, 1, 2**32 - 7, 2**40]))  # fmt: skip
def test_dare_masks_computed_in_blocks_equal_the_whole_mask(sizes, seed, first):
    """Counter-based masks: blocks in any order (here reversed) give the whole mask, with
    either implementation, also past 2³² entries."""
    keys = [seed, 2**64 - 1 - seed, seed << 40]
    whole = keep_mask(keys, first, sum(sizes), 0.3)
    starts = [first + sum(sizes[:i]) for i in range(len(sizes))]
    parts = [keep_mask(keys, starts[i], sizes[i], 0.3) for i in reversed(range(len(sizes)))]
    assert torch.equal(torch.cat(parts[::-1], dim=1), whole)
    assert torch.equal(keep_mask_torch(keys, first, sum(sizes), 0.3), whole)


class RowSpy:
    """A source that logs every read: ``(key, rows)``, rows None for a whole-tensor ``get``."""

    def __init__(self, state, log):
        self.state, self.log = state, log

    def specs(self):
        return StateSource(self.state, "").specs()

    def get(self, key):
        self.log.append((key, None))
        return self.state[key]

    def get_rows(self, key, start, stop):
        self.log.append((key, (start, stop)))
        return self.state[key][start:stop]


@pytest.mark.parametrize(("method", "params", "passes"), [
    ("task_arithmetic", {}, 1), ("ties", {}, 2), ("dare_ties", {"rescale": "l1"}, 2),
    ("breadcrumbs", {}, 3), ("ties", {"scope": "global"}, 1)])  # fmt: skip
def test_big_tensors_are_only_read_in_blocks(method, params, passes):
    """A 64 × 8 tensor with 16-element chunks: every read is 2 rows; the key is streamed
    once per pass (fused TIES' threshold of a small key: 1 pass, breadcrumbs' radix select:
    2, DARE l1 norms: 1, then the merge)."""
    log: list = []
    state = {"w": torch.randn(64, 8)}
    experts = [{"w": state["w"] + torch.randn(64, 8)} for _ in range(2)]
    srcs = [RowSpy(s, log) for s in (state, *experts)]
    plan = plan_merge(method, srcs[0], srcs[1:], ["b", "e0", "e1"], params=params,
                      chunk_elements=16)  # fmt: skip
    log.clear()
    out = dict(run_plan(plan))
    assert all(rows is not None and rows[1] - rows[0] == 2 for _, rows in log)
    global_passes = 2 if params.get("scope") == "global" else 0
    assert len(log) == (global_passes + passes) * 32 * 3
    assert torch.equal(out["w"], merge(method, state, experts, **params)["w"])


def test_checkpoints_merged_in_blocks_equal_in_memory_and_record_threads(tmp_path):
    """Row slices of memory-mapped files (one expert a sharded directory)."""
    gen = torch.Generator().manual_seed(0)
    base = {"emb": torch.randn(40, 6, generator=gen), "b": torch.randn(7, generator=gen)}
    experts = [{k: v + torch.randn(v.shape, generator=gen) for k, v in base.items()}
               for _ in range(3)]  # fmt: skip
    save_state_dict(base, tmp_path / "base.safetensors")
    paths = []
    for i, e in enumerate(experts):
        paths.append(tmp_path / (f"e{i}" if i == 1 else f"e{i}.safetensors"))
        save_state_dict(e, paths[-1], max_shard_bytes=500 if i == 1 else 2**30)
    for method in ("ties", "dare_ties", "breadcrumbs_ties"):
        out = tmp_path / f"{method}.safetensors"
        report = merge_checkpoints(method, tmp_path / "base.safetensors", paths, out,
                                   params={"density": 0.3}, progress=False, threads=1,
                                   chunk_elements=13)  # fmt: skip
        want = merge(method, base, experts, density=0.3)
        with open_checkpoint(out) as ck:
            for key in want:
                assert torch.equal(ck.get(key), want[key]), (method, key)
        assert report.threads == 1 and read_metadata(out)["fedmerge.threads"] == "1"


def test_compressed_experts_merge_in_blocks(tmp_path):
    """A compressed expert decodes a whole key and serves its rows from it: merged in
    7-element blocks beside a plain checkpoint, it equals the in-memory merge."""
    from fedmerge.codecs.expert import compress_checkpoint, open_expert

    gen = torch.Generator().manual_seed(1)
    base = {"emb": torch.randn(40, 6, generator=gen)}
    expert = {"emb": base["emb"] + torch.randn(40, 6, generator=gen)}
    save_state_dict(base, tmp_path / "base.safetensors")
    save_state_dict(expert, tmp_path / "e.safetensors")
    compress_checkpoint(tmp_path / "e.safetensors", tmp_path / "base.safetensors",
                        tmp_path / "c.safetensors", "ternary", {"density": 0.5})  # fmt: skip
    with open_expert(tmp_path / "c.safetensors", base=tmp_path / "base.safetensors") as ck:
        decoded = ck.load()
    out = tmp_path / "m.safetensors"
    merge_checkpoints("ties", tmp_path / "base.safetensors",
                      [tmp_path / "c.safetensors", tmp_path / "e.safetensors"], out,
                      progress=False, chunk_elements=7)  # fmt: skip
    want = merge("ties", base, [decoded, expert])
    with open_checkpoint(out) as ck:
        assert torch.equal(ck.get("emb"), want["emb"])


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_ties", "breadcrumbs_ties"])
def test_output_does_not_depend_on_the_thread_count(method):
    """Tensors above torch's parallel grain (32k elements), merged whole and in blocks, on
    1 and 2 threads: the same bits."""
    from fedmerge.threads import torch_threads

    gen = torch.Generator().manual_seed(2)
    base = {"w": torch.randn(300, 200, generator=gen)}
    experts = [{"w": base["w"] + torch.randn(300, 200, generator=gen)} for _ in range(3)]
    outs = []
    for threads in (1, 2):
        with torch_threads(threads):
            outs += [run(method, base, experts, [], {}, chunk)["w"] for chunk in (WHOLE, 40_000)]
    assert all(torch.equal(bits(o), bits(outs[0])) for o in outs[1:])
