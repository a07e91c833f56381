"""PEFT LoRA adapters as experts: exact against peft's merge_and_unload, every merge method,
every continual method, HF directory output and --as-adapter round trips, and each error.

Tiny GPT-2 (Conv1D, fan_in_fan_out) and Llama (Linear, embedding LoRA) models are built
offline from configs; adapters are made with peft and seeded random factors.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("transformers")

import peft  # noqa: E402
import transformers  # noqa: E402

from fedmerge.checkpoint import load_state_dict, open_checkpoint, save_state_dict  # noqa: E402
from fedmerge.cli import main as cli  # noqa: E402
from fedmerge.codecs.expert import open_expert
from fedmerge.continual.methods import CONTINUAL_METHODS  # noqa: E402
from fedmerge.continual.store import ContinualStore  # noqa: E402
from fedmerge.errors import CheckpointError, FedmergeError, ValidationError  # noqa: E402
from fedmerge.hf.adapter import AdapterCheckpoint  # noqa: E402
from fedmerge.hf.merge import merge_to_adapter  # noqa: E402
from fedmerge.hf.tiny import load_base, make_adapter, make_base  # noqa: E402
from fedmerge.merging import METHODS, merge_checkpoints  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]


def dense_of(base: Path, adapter: Path, out: Path) -> Path:
    """peft's own merge: the adapter folded into the base, saved with the base's keys."""
    merged = peft.PeftModel.from_pretrained(load_base(base), adapter).merge_and_unload()
    state = merged.state_dict()
    with open_checkpoint(base) as ck:
        save_state_dict(
            {k: state[k].detach().clone().contiguous() for k in sorted(ck.specs())}, out
        )
    return out


def max_diff(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b)
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """GPT-2 base; a plain adapter, one with rank/alpha patterns + modules_to_save + lora_bias,
    one with rsLoRA; their dense merge_and_unload checkpoints."""
    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("gpt2")
    base = make_base(d / "base", "gpt2")
    adapters = [
        make_adapter(base, d / "a1", seed=1),
        make_adapter(base, d / "a2", seed=2, r=2, lora_alpha=4, rank_pattern={"c_fc": 3},
                     alpha_pattern={"c_fc": 5}, modules_to_save=["ln_f"], lora_bias=True),
        make_adapter(base, d / "a3", seed=3, r=4, lora_alpha=6, use_rslora=True),
    ]  # fmt: skip
    dense = [dense_of(base, a, d / f"dense{i}.safetensors") for i, a in enumerate(adapters)]
    return SimpleNamespace(dir=d, base=base, adapters=adapters, dense=dense)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """Llama base (Linear layers), two adapters, one with LoRA on the token embedding."""
    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("llama")
    base = make_base(d / "base", "llama")
    adapters = [
        make_adapter(base, d / "a1", seed=1),
        make_adapter(base, d / "a2", seed=2, target_modules=["q_proj", "embed_tokens"]),
    ]
    dense = [dense_of(base, a, d / f"dense{i}.safetensors") for i, a in enumerate(adapters)]
    return SimpleNamespace(dir=d, base=base, adapters=adapters, dense=dense)


# ----------------------------------------------------------------------------- reading


@pytest.mark.parametrize("model", ["gpt2", "llama"])
def test_adapter_reads_as_peft_merge_and_unload(model, request):
    m = request.getfixturevalue(model)
    for adapter, dense in zip(m.adapters, m.dense, strict=True):
        with open_expert(adapter, base=m.base) as ck:
            assert isinstance(ck, AdapterCheckpoint)
            assert ck.adapted()  # it does change something
            assert max_diff(ck.load(), load_state_dict(dense)) <= 1e-6


def test_patterns_rslora_and_bias_scalings(gpt2):
    with open_expert(gpt2.adapters[1], base=gpt2.base) as ck:
        fc = ck.factors["transformer.h.0.mlp.c_fc.weight"]
        attn = ck.factors["transformer.h.0.attn.c_attn.weight"]
        assert (fc.scaling, attn.scaling) == (5 / 3, 4 / 2)  # alpha_pattern/rank_pattern
        assert fc.transpose and attn.transpose  # GPT-2 Conv1D stores (in, out)
        assert set(ck.full) == {"transformer.ln_f.weight", "transformer.ln_f.bias"}
        assert "transformer.h.1.attn.c_proj.bias" in ck.bias_deltas
    with open_expert(gpt2.adapters[2], base=gpt2.base) as ck:
        assert {f.scaling for f in ck.factors.values()} == {6 / math.sqrt(4)}  # rsLoRA


def test_bare_base_under_causal_lm_adapter(llama, tmp_path):
    """An adapter made on LlamaForCausalLM ('model.layers...') over a bare LlamaModel base."""
    load_base(llama.base).model.save_pretrained(tmp_path / "bare")
    dense = load_state_dict(llama.dense[0])
    with open_expert(llama.adapters[0], base=tmp_path / "bare") as ck:
        assert "layers.0.self_attn.q_proj.weight" in ck.factors
        got = ck.load()
    assert max_diff(got, {k: dense["model." + k] for k in got}) <= 1e-6


def test_row_slices_match_whole_tensors(gpt2, llama):
    for m, adapter in ((gpt2, gpt2.adapters[1]), (llama, llama.adapters[1])):
        with open_expert(adapter, base=m.base) as ck:
            for key in ck.adapted():
                whole = ck.get(key)
                rows = ck.get_rows(key, 1, 3)
                assert rows.shape == whole[1:3].shape
                torch.testing.assert_close(rows, whole[1:3], rtol=0, atol=1e-7)


def synthetic(tmp_path: Path, base: dict, tensors: dict, **config) -> tuple[Path, Path]:
    """A hand-written adapter directory over a hand-written base file."""
    save_state_dict(base, tmp_path / "base.safetensors")
    folder = tmp_path / "adapter"
    folder.mkdir()
    cfg = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, **config}
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    save_state_dict(tensors, folder / "adapter_model.safetensors")
    return tmp_path / "base.safetensors", folder


def test_hand_computed_square_fan_in_fan_out(tmp_path):
    """Square weights: the orientation comes from fan_in_fan_out; ΔW = (B@A)ᵀ·α/r."""
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])  # (r=2, in=2)
    b = torch.tensor([[1.0, 1.0], [0.0, 3.0]])  # (out=2, r=2)
    base = {"blk.w.weight": torch.zeros(2, 2), "blk.w.bias": torch.zeros(2)}
    lora = {"base_model.model.blk.w.lora_A.weight": a, "base_model.model.blk.w.lora_B.weight": b}
    base_path, folder = synthetic(tmp_path, base, lora, fan_in_fan_out=True)
    with open_expert(folder, base=base_path) as ck:
        assert ck.get("blk.w.weight").tolist() == [[2.0, 0.0], [4.0, 12.0]]  # 2·(B@A)ᵀ
        assert ck.get("blk.w.bias").tolist() == [0.0, 0.0]


# ----------------------------------------------------------------------------- merging


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_merge_method_on_adapters_equals_dense(method, gpt2, tmp_path):
    fishers = []
    if METHODS[method].needs_fisher:
        with open_checkpoint(gpt2.base) as ck:
            g = torch.Generator().manual_seed(0)
            for i in range(len(gpt2.adapters)):
                fisher = {k: torch.rand(s.shape, generator=g) for k, s in ck.specs().items()}
                fishers.append(tmp_path / f"f{i}.safetensors")
                save_state_dict(fisher, fishers[-1])
    runs = {}
    for name, experts in (("adapters", gpt2.adapters), ("dense", gpt2.dense)):
        out = tmp_path / f"{name}.safetensors"
        merge_checkpoints(method, gpt2.base, experts, out, fisher_paths=fishers, progress=False)
        runs[name] = load_state_dict(out)
    assert max_diff(runs["adapters"], runs["dense"]) <= 1e-6
    assert max_diff(runs["adapters"], load_state_dict(gpt2.base)) > 1e-3  # not a no-op


@pytest.mark.parametrize("method", sorted(CONTINUAL_METHODS))
def test_every_continual_method_folds_adapters_like_dense(method, gpt2, tmp_path):
    merged = {}
    for name, experts in (("adapters", gpt2.adapters), ("dense", gpt2.dense)):
        store = ContinualStore.init(tmp_path / name, gpt2.base, method)
        for e in experts:
            store.add(e)
        merged[name] = store.merged()
    assert max_diff(merged["adapters"], merged["dense"]) <= 1e-6
    ids = [r["id"] for r in ContinualStore(tmp_path / "adapters").manifest()["experts"]]
    assert ids == ["a1", "a2", "a3"]


# ----------------------------------------------------------------------------- writing


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_merged_directory_loads_with_transformers(gpt2, tmp_path):
    out = tmp_path / "merged"
    merge_checkpoints("ties", gpt2.base, gpt2.adapters, out, progress=False)
    ids = torch.tensor([[3, 9, 27, 1, 50]])
    by_hand = load_base(gpt2.base)
    by_hand.load_state_dict(load_state_dict(out), strict=False)  # lm_head is tied to wte
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    torch.testing.assert_close(logits(loaded, ids), logits(by_hand, ids), rtol=0, atol=1e-6)
    assert not torch.allclose(logits(loaded, ids), logits(load_base(gpt2.base), ids), atol=1e-3)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert tokenizer("w3 w9")["input_ids"] == [3, 9]


def test_sharded_base_in_sharded_model_out(gpt2, tmp_path):
    """A sharded HF base (index + shards) in; a sharded directory with an index out."""
    load_base(gpt2.base).save_pretrained(tmp_path / "base", max_shard_size="40KB")
    assert (tmp_path / "base" / "model.safetensors.index.json").exists()
    out = tmp_path / "merged"
    merge_checkpoints("task_arithmetic", tmp_path / "base", gpt2.adapters, out,
                      max_shard_bytes=40_000, progress=False)  # fmt: skip
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1
    assert (out / "model.safetensors.index.json").exists() and (out / "config.json").exists()
    merge_checkpoints("task_arithmetic", gpt2.base, gpt2.dense, tmp_path / "d.safetensors",
                      progress=False)  # fmt: skip
    ids = torch.tensor([[1, 2, 3, 4]])
    by_hand = load_base(gpt2.base)
    by_hand.load_state_dict(load_state_dict(tmp_path / "d.safetensors"), strict=False)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    torch.testing.assert_close(logits(loaded, ids), logits(by_hand, ids), rtol=0, atol=1e-6)


def test_continual_export_directory_loads_with_transformers(llama, tmp_path):
    store = ContinualStore.init(tmp_path / "store", llama.base, "opcm")
    for a in llama.adapters:
        store.add(a)
    store.export(tmp_path / "out")
    ids = torch.tensor([[5, 7, 11]])
    by_hand = load_base(llama.base)
    by_hand.load_state_dict(store.merged())
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    torch.testing.assert_close(logits(loaded, ids), logits(by_hand, ids), rtol=0, atol=1e-6)


def peft_dense(base: Path, adapter: Path) -> dict:
    model = peft.PeftModel.from_pretrained(load_base(base), adapter).merge_and_unload()
    with open_checkpoint(base) as ck:
        return {k: v for k, v in model.state_dict().items() if k in ck}


@pytest.mark.parametrize("model", ["gpt2", "llama"])
def test_as_adapter_at_full_rank_reproduces_the_dense_merge(model, request, tmp_path):
    m = request.getfixturevalue(model)
    merge_checkpoints("task_arithmetic", m.base, m.adapters, tmp_path / "d.safetensors",
                      progress=False)  # fmt: skip
    report = merge_to_adapter("task_arithmetic", m.base, m.adapters, tmp_path / "lora", 1000,
                              progress=False)  # fmt: skip
    assert max(e for *_, e in report.rows) <= 1e-6
    assert (
        max_diff(peft_dense(m.base, tmp_path / "lora"), load_state_dict(tmp_path / "d.safetensors"))
        <= 1e-5
    )  # noqa: E501
    meta = open_checkpoint(tmp_path / "lora" / "adapter_model.safetensors").metadata
    assert set(json.loads(meta["fedmerge.svd_errors"])) == {r[0] for r in report.rows}


def test_as_adapter_truncation_error_is_eckart_young(gpt2, tmp_path):
    """At rank 2 the stored error equals √(Σ_{i>2} σ_i²)/‖D‖ of the merged ΔW, per module."""
    merge_checkpoints("average", gpt2.base, gpt2.adapters[:2], tmp_path / "d.safetensors",
                      progress=False)  # fmt: skip
    report = merge_to_adapter("average", gpt2.base, gpt2.adapters[:2], tmp_path / "lora", 2,
                              progress=False)  # fmt: skip
    merged, base = load_state_dict(tmp_path / "d.safetensors"), load_state_dict(gpt2.base)
    assert report.modules_to_save == ["transformer.ln_f"]
    for module, _, rank, err in report.rows:
        s = torch.linalg.svdvals((merged[f"{module}.weight"] - base[f"{module}.weight"]).double())
        assert rank == 2
        assert err == pytest.approx(float(s[2:].norm() / s.norm()), rel=1e-4)
    loaded = peft.PeftModel.from_pretrained(load_base(gpt2.base), tmp_path / "lora")
    assert loaded.peft_config["default"].lora_bias  # a2's biases travel as lora_B.bias


# ----------------------------------------------------------------------------- errors


def test_error_adapter_key_matches_nothing(tmp_path):
    lora = {"base_model.model.blk.nope.lora_A.weight": torch.ones(2, 2),
            "base_model.model.blk.nope.lora_B.weight": torch.ones(2, 2)}  # fmt: skip
    base_path, folder = synthetic(tmp_path, {"blk.w.weight": torch.zeros(2, 2)}, lora)
    with pytest.raises(ValidationError, match=r"adapter_model.safetensors.*blk\.nope.*matches no"):
        open_expert(folder, base=base_path)


def test_error_ambiguous_prefix(tmp_path):
    lora = {"base_model.model.model.w.lora_A.weight": torch.ones(2, 2),
            "base_model.model.model.w.lora_B.weight": torch.ones(2, 2)}  # fmt: skip
    base = {"model.w.weight": torch.zeros(2, 2), "w.weight": torch.zeros(2, 2)}
    base_path, folder = synthetic(tmp_path, base, lora)
    with pytest.raises(ValidationError, match="ambiguous"):
        open_expert(folder, base=base_path)


@pytest.mark.parametrize(
    ("a", "b", "match"),
    [
        ((3, 2), (2, 3), "do not have rank 2"),
        ((2, 5), (2, 2), r"gives \[2, 5\], which does not fit"),
    ],
)
def test_error_rank_and_shape(tmp_path, a, b, match):
    lora = {"base_model.model.w.lora_A.weight": torch.ones(a),
            "base_model.model.w.lora_B.weight": torch.ones(b)}  # fmt: skip
    base_path, folder = synthetic(tmp_path, {"w.weight": torch.zeros(2, 2)}, lora)
    with pytest.raises(ValidationError, match=f"lora_.*{match}"):
        open_expert(folder, base=base_path)


@pytest.mark.parametrize(
    ("config", "match"),
    [({"peft_type": "PREFIX_TUNING"}, "peft_type 'PREFIX_TUNING' is not supported"),
     ({"peft_type": "IA3"}, "peft_type 'IA3' is not supported"),
     ({"use_dora": True}, "'use_dora' is set")],
)  # fmt: skip
def test_error_unsupported_peft(tmp_path, config, match):
    lora = {"base_model.model.w.lora_A.weight": torch.ones(2, 2),
            "base_model.model.w.lora_B.weight": torch.ones(2, 2)}  # fmt: skip
    base_path, folder = synthetic(tmp_path, {"w.weight": torch.zeros(2, 2)}, lora, **config)
    with pytest.raises(ValidationError, match=f"adapter_config.json: {match}"):
        open_expert(folder, base=base_path)


def test_error_missing_files_and_base(gpt2, tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    (folder / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(CheckpointError, match=r"empty/adapter_model.safetensors: no such .*pickle"):
        open_expert(folder, base=gpt2.base)
    cfg = json.loads((gpt2.adapters[0] / "adapter_config.json").read_text())
    moved = tmp_path / "moved"
    moved.mkdir()
    weights = "adapter_model.safetensors"
    (moved / weights).write_bytes((gpt2.adapters[0] / weights).read_bytes())
    (moved / "adapter_config.json").write_text(
        json.dumps({**cfg, "base_model_name_or_path": "x/y"})
    )
    with pytest.raises(CheckpointError, match="give its base model"):
        open_expert(moved)
    with open_expert(gpt2.adapters[0]) as ck:  # base_model_name_or_path is a local dir
        assert ck.base.path == gpt2.base


def test_cli_error_names_the_file(gpt2, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    code = cli(["merge", "ties", "--base", str(gpt2.base), str(gpt2.adapters[0]), str(bad),
                "-o", str(tmp_path / "o")])  # fmt: skip
    assert code != 0
    assert "bad/adapter_config.json: peft_type 'IA3'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_as_adapter_needs_rank_and_hf_base(gpt2, tmp_path, capsys):
    assert cli(["merge", "ties", "--base", str(gpt2.base), str(gpt2.adapters[0]), "-o",
                str(tmp_path / "o"), "--as-adapter"]) != 0  # fmt: skip
    assert "--as-adapter needs --rank R" in capsys.readouterr().err
    base_file = gpt2.base / "model.safetensors"
    with pytest.raises(FedmergeError, match="needs the base as a Hugging Face model directory"):
        merge_to_adapter("ties", base_file, gpt2.dense[:1], tmp_path / "o", 4)
