"""The streaming engine: equals the in-memory API, holds one key at a time, records metadata."""

import json

import pytest
import torch

from fedmerge import TensorSpec, open_checkpoint, read_metadata, save_state_dict
from fedmerge.merging import METHODS, merge, merge_checkpoints, plan_merge, run_plan
from fedmerge.merging.dropmask import stream_key

SHAPES = {"l1.weight": (6, 5), "l1.bias": (6,), "l2.weight": (3, 6), "emb": (11, 4)}


def make(seed, base=None, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    out = {k: torch.randn(s, generator=gen) * scale for k, s in SHAPES.items()}
    if base is not None:
        out = {k: base[k] + v for k, v in out.items()}
    out["steps"] = torch.tensor(seed, dtype=torch.int64)
    return out


@pytest.fixture
def files(tmp_path):
    base = make(0)
    experts = [make(i, base, scale=0.1 * i) for i in (1, 2, 3)]
    fisher = [{k: v.abs() for k, v in make(10 + i).items() if k != "steps"} for i in range(3)]
    paths = {"base": tmp_path / "base.safetensors"}
    save_state_dict(base, paths["base"])
    for i, e in enumerate(experts):
        # one expert as a Hugging Face sharded directory
        target = tmp_path / f"e{i}" if i == 1 else tmp_path / f"e{i}.safetensors"
        save_state_dict(e, target, max_shard_bytes=100 if i == 1 else 2**30)
        paths[f"e{i}"] = target
        save_state_dict(fisher[i], tmp_path / f"f{i}.safetensors")
    return base, experts, fisher, paths


@pytest.mark.parametrize("method", sorted(METHODS))
def test_streaming_equals_in_memory(files, tmp_path, method):
    base, experts, fisher, paths = files
    needs = METHODS[method].needs_fisher
    params = {"density": 0.5} if "density" in METHODS[method].resolve() else {}
    want = merge(method, base, experts, [1, 2, 0.5], fisher=fisher if needs else (), **params)
    out = tmp_path / "out"
    merge_checkpoints(method, paths["base"], [paths[f"e{i}"] for i in range(3)], out,
                      weights=[1, 2, 0.5], params=params,
                      fisher_paths=[tmp_path / f"f{i}.safetensors" for i in range(3)] if needs
                      else (), max_shard_bytes=200, progress=False)  # fmt: skip
    assert (out / "model.safetensors.index.json").exists()  # sharded output
    with open_checkpoint(out) as ck:
        assert ck.keys() == sorted(want)
        for key in want:
            assert torch.equal(ck.get(key), want[key]), key


def test_global_ties_streaming_equals_in_memory(files, tmp_path):
    base, experts, _, paths = files
    want = merge("ties", base, experts, density=0.3, scope="global")
    out = tmp_path / "g.safetensors"
    merge_checkpoints("ties", paths["base"], [paths[f"e{i}"] for i in range(3)], out,
                      params={"density": "0.3", "scope": "global"}, progress=False)  # fmt: skip
    with open_checkpoint(out) as ck:
        for key in want:
            assert torch.equal(ck.get(key), want[key])


class Spy:
    """A source that logs which key each ``get`` asks for."""

    def __init__(self, state, log):
        self.state, self.log = state, log

    def specs(self):
        return {k: TensorSpec.of(v) for k, v in self.state.items()}

    def get(self, key):
        self.log.append(key)
        return self.state[key]


@pytest.mark.parametrize(("method", "params"), [("ties", {}), ("dare_ties", {}), ("fisher", {})])
def test_engine_reads_one_key_at_a_time(files, method, params):
    base, experts, fisher, _ = files
    log: list[str] = []
    fishers = [Spy(f, log) for f in fisher] if method == "fisher" else []
    plan = plan_merge(method, Spy(base, log), [Spy(e, log) for e in experts],
                      ["b", "e0", "e1", "e2", *(["f0", "f1", "f2"] if fishers else [])],
                      params=params, fishers=fishers)  # fmt: skip
    seen_out = []
    for key, _tensor in run_plan(plan):
        seen_out.append(key)
        # all reads since the previous output were for this key only
        assert set(log) == {key}, (key, set(log))
        log.clear()
    assert seen_out == sorted([*SHAPES, "steps"])


def test_global_prepass_streams_key_by_key(files):
    base, experts, _, _ = files
    log: list[str] = []
    plan = plan_merge("ties", Spy(base, log), [Spy(e, log) for e in experts],
                      ["b", "e0", "e1", "e2"], params={"scope": "global"})  # fmt: skip
    next(run_plan(plan))
    floats = sorted(SHAPES)
    # two pre-passes over the float keys, 4 reads (base + 3 experts) per key, in blocks
    blocks = [log[i : i + 4] for i in range(0, len(log), 4)]
    assert [b[0] for b in blocks[: 2 * len(floats)]] == floats * 2
    assert all(len(set(b)) == 1 for b in blocks)


def test_dare_seed_depends_on_key_and_expert_not_on_key_order(files):
    base, experts, _, _ = files
    full = merge("dare_ties", base, experts, density=0.5, seed=9)
    only = merge("dare_ties", {"l2.weight": base["l2.weight"]},
                 [{"l2.weight": e["l2.weight"]} for e in experts], density=0.5, seed=9)  # fmt: skip
    assert torch.equal(full["l2.weight"], only["l2.weight"])
    assert len({stream_key(9, e, k) for e in range(3) for k in SHAPES}) == 3 * len(SHAPES)


def test_output_metadata_records_method_params_and_inputs(files, tmp_path):
    _, _, _, paths = files
    out = tmp_path / "m.safetensors"
    merge_checkpoints("ties", paths["base"], [paths["e0"], paths["e2"]], out,
                      weights=[1, 3], params={"density": 0.4}, dtype=torch.bfloat16,
                      progress=False)  # fmt: skip
    meta = read_metadata(out)
    assert meta["fedmerge.method"] == "ties"
    assert json.loads(meta["fedmerge.params"])["density"] == 0.4
    assert json.loads(meta["fedmerge.weights"]) == [1.0, 3.0]
    assert meta["fedmerge.base"].startswith("base.safetensors (")
    assert [e.split(" ")[0] for e in json.loads(meta["fedmerge.experts"])] == [
        "e0.safetensors",
        "e2.safetensors",
    ]
    with open_checkpoint(out) as ck:
        assert ck.dtype("l1.weight") == torch.bfloat16 and ck.dtype("steps") == torch.int64


def test_progress_bar_on_a_terminal(files, tmp_path, monkeypatch, capsys):
    import fedmerge.merging.engine as engine
    from fedmerge.report import progress

    _, _, _, paths = files
    monkeypatch.setattr(engine, "PROGRESS_MIN_ELEMENTS", 1)
    monkeypatch.setattr(engine.sys.stderr, "isatty", lambda: True, raising=False)
    out = tmp_path / "p.safetensors"
    merge_checkpoints("ties", paths["base"], [paths["e0"], paths["e2"]], out,
                      params={"scope": "global"}, progress=progress)  # fmt: skip
    assert out.exists() and "merge ties" in capsys.readouterr().err
