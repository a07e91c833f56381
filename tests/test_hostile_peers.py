"""Hostile peers on the receive path (issue 19 defects 1 and 2): a forged torch.distributed
wire table is a counted rejection naming the sender, never a RecursionError/AttributeError
that kills the receiving rank; a payload with a negative or future round is rejected
instead of raising KeyError or silencing the real sender for good."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedmerge.config import TrainConfig, ValidationConfig
from fedmerge.data.partition import AgentData
from fedmerge.decentralized.agent import Agent
from fedmerge.decentralized.delivery import Delivery
from fedmerge.decentralized.payload import Payload
from fedmerge.errors import ValidationError
from fedmerge.models import build_model
from fedmerge.runtimes.torchdist.wire import ALIGN, pack, unpack


def agent(i: int = 0) -> Agent:
    model = build_model("mlp", in_shape=(4,), num_classes=3, seed=0, hidden=[5])
    x, y = torch.randn(10, 4, generator=torch.Generator().manual_seed(i)), torch.arange(10) % 3
    return Agent(i, model, AgentData(x, y, x[:0], y[:0]), train=TrainConfig(),
                 validation=ValidationConfig(), seed=0)  # fmt: skip


def forged(table: bytes, sender: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """A wire message whose tensor table is ``table`` (header consistent with it)."""
    header, body = pack(agent(sender).publish(round=1))
    start = (len(table) + ALIGN - 1) // ALIGN * ALIGN
    data = body[int(header[6]) :]
    new = torch.zeros(start + data.numel(), dtype=torch.uint8)
    new[: len(table)] = torch.frombuffer(bytearray(table), dtype=torch.uint8)
    new[start:] = data
    header = header.clone()
    header[6] = start
    return header, new


TABLES = [
    b'{"hash": "x", "tensors": ' + b"[" * 3000 + b"]" * 3000 + b"}",  # RecursionError
    json.dumps({"hash": "x", "tensors": [["w", 7, [2], 0]]}).encode(),  # dtype an int
    json.dumps({"hash": "x", "tensors": [["w", "float32", [10**30], 0]]}).encode(),
    json.dumps({"hash": "x", "tensors": [["w", "float32", "ab", 0]]}).encode(),
    json.dumps({"hash": "x", "tensors": [["w", "float32", [2]]]}).encode(),
    json.dumps({"hash": "x", "tensors": {"w": 1}}).encode(),
    json.dumps({"hash": "x", "tensors": [["w", "float32", [2.5], 0]]}).encode(),
    json.dumps({"hash": "x", "tensors": [["w", "float32", [2], 0.5]]}).encode(),
    json.dumps({"hash": "x", "tensors": [[["w"], "float32", [2], 0]]}).encode(),
    json.dumps({"hash": "x", "tensors": [["w", "float32", [-1, -2], 0]]}).encode(),
    json.dumps([1, 2]).encode(),
    b"\xff\xfe not json",
]


@pytest.mark.parametrize("table", TABLES)
def test_forged_wire_tables_are_validation_errors_naming_the_sender(table):
    header, body = forged(table, sender=2)
    with pytest.raises(ValidationError, match="payload from agent 2"):
        unpack(header, body)


LEAVES = st.one_of(st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=6), st.none(),
                   st.booleans())  # fmt: skip


def _nest(inner):
    return st.one_of(st.lists(inner, max_size=5),
                     st.dictionaries(st.text(max_size=6), inner, max_size=5))  # fmt: skip


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.recursive(LEAVES, _nest, max_leaves=30))
def test_fuzzed_wire_tables_never_raise_anything_else(entries):
    header, body = forged(json.dumps({"hash": "x", "tensors": entries}).encode())
    with contextlib.suppress(ValidationError):
        unpack(header, body)


def delivery(p: Payload) -> Delivery:
    return Delivery(p.sender, 0.5, p)


def test_negative_and_future_rounds_are_counted_rejections():
    receiver, honest = agent(0), agent(2)
    forged_rounds = [honest.publish(round=-1), honest.publish(round=10**9)]
    got = receiver.receive([delivery(p) for p in forged_rounds], round=3)
    assert got == [] and len(receiver.rejected) == 2
    assert "round -1): the round is negative" in receiver.rejected[0]
    assert "from the future" in receiver.rejected[1]
    assert receiver.last_round == {}  # the real sender is not silenced
    assert len(receiver.receive([delivery(honest.publish(round=3))], round=3)) == 1


# ----------------------------------------------------------------------------- Flower replies


def flower_reply(node: int, *, flat=None, stype="safetensors", nbytes=10, extra=None):
    """A Flower reply as the relay receives it (real records, a stand-in message)."""
    from types import SimpleNamespace

    from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
    from safetensors.torch import save as st_save

    flat = torch.zeros(6, dtype=torch.float64) if flat is None else flat
    arrays = {"flat": Array(dtype="uint8", shape=(1,), stype="safetensors",
                            data=st_save({"flat": flat})),
              "payload": Array(dtype="uint8", shape=(3,), stype=stype, data=b"abc")}  # fmt: skip
    metrics = {"rejected": 0, "global_acc": 0.5, **({} if nbytes is None else {"nbytes": nbytes})}
    content = RecordDict({"arrays": ArrayRecord(arrays), "metrics": MetricRecord(metrics)})
    if extra:
        content = extra(content)
    meta = SimpleNamespace(src_node_id=100 + node, reply_to_message_id="step")
    return SimpleNamespace(metadata=meta, content=content, has_error=lambda: False)


def test_one_malformed_flower_reply_skips_that_node_only():
    """Wrong flat length, wrong payload stype, missing nbytes, NaN flat, no metrics: each
    such node is skipped for the step and named; the honest node's reply is kept."""
    pytest.importorskip("flwr")
    from types import SimpleNamespace

    from flwr.app import RecordDict

    from fedmerge.runtimes.flower.relay import RelayOptions, collect

    def no_metrics(content):
        return RecordDict({"arrays": content.array_records["arrays"]})

    replies = [flower_reply(0), flower_reply(1, flat=torch.zeros(7, dtype=torch.float64)),
               flower_reply(2, stype="numpy.ndarray"), flower_reply(3, nbytes=None),
               flower_reply(4, flat=torch.full((6,), float("nan"), dtype=torch.float64)),
               flower_reply(5, extra=no_metrics)]  # fmt: skip
    # the relay pushes one step message (id "step") and pulls its replies
    grid = SimpleNamespace(push_messages=lambda msgs: ["step"], pull_messages=lambda ids: replies)
    back = {100 + i: i for i in range(6)}
    got = collect(grid, [], back, RelayOptions(), 0, flat_len=6)
    assert sorted(got) == [0]


# ----------------------------------------------------------------------------- omniscient attacks


def test_ipm_and_alie_attacks_by_hand():
    """IPM (Xie et al. 2020): −ε · mean of the honest neighbours' tensors. ALIE (Baruch et
    al. 2019): mean − z · std of the honest neighbours, per coordinate (population std)."""
    from fedmerge.config import ByzantineConfig
    from fedmerge.decentralized.adversary import attack

    own = {"w": torch.tensor([100.0, 100.0])}
    honest = [{"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([3.0, 6.0])}]
    g = torch.Generator().manual_seed(0)
    ipm = attack(own, ByzantineConfig(attack="ipm", scale=0.5), g, honest)
    assert ipm["w"].tolist() == [-1.0, -2.0]  # −0.5 · [2, 4]
    alie = attack(own, ByzantineConfig(attack="alie", scale=1.5), g, honest)
    assert alie["w"].tolist() == [2.0 - 1.5 * 1.0, 4.0 - 1.5 * 2.0]
    alone = attack(own, ByzantineConfig(attack="ipm", scale=1.0), g, [])
    assert alone["w"].tolist() == [-100.0, -100.0]  # no honest neighbour: its own tensors


def test_ipm_uses_the_attackers_honest_neighbours():
    import networkx as nx

    from fedmerge.config import load_config
    from fedmerge.decentralized.adversary import Adversary

    sets = ["placement=list", "nodes=[0, 1]", "attack=ipm", "scale=1"]
    cfg = load_config(None, [f"faults.byzantine.{s}" for s in sets])
    adv = Adversary(cfg, nx.path_graph(4))  # 0 - 1 - 2 - 3: node 1's honest neighbour is 2
    payloads = {i: Payload.make({"w": torch.full((2,), float(i))}, sender=i, round=0, samples=1,
                                kind="delta") for i in range(4)}  # fmt: skip
    out = adv.corrupt(payloads, 0)
    assert out[1].tensors["w"].tolist() == [-2.0, -2.0]
    assert out[0].tensors["w"].tolist() == [-0.0, -0.0]  # no honest neighbour: −1 · its own 0
    assert out[2] is payloads[2]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(-(2**63), 2**63 - 1), min_size=9, max_size=9), st.integers(0, 16))
def test_fuzzed_wire_headers_are_checked_or_refused(values, sender):
    """Any 9 × int64 header: body_size returns a size within what it checked, or refuses."""
    from fedmerge.runtimes.torchdist.wire import body_size

    try:
        size = body_size(torch.tensor(values, dtype=torch.int64), sender)
    except ValidationError:
        return
    assert values[2] == sender and 0 < size == values[6] + values[7]


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=64), st.sampled_from(["safetensors", "numpy.ndarray", ""]),
       st.dictionaries(st.sampled_from(["nbytes", "rejected", "global_acc"]),
                       st.one_of(st.integers(-5, 2**40), st.floats(allow_nan=False)),
                       max_size=3))  # fmt: skip
def test_fuzzed_flower_records_are_judged_not_raised(blob, stype, metrics):
    pytest.importorskip("flwr")
    from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

    from fedmerge.runtimes.flower.relay import check_reply

    arrays = {k: Array(dtype="uint8", shape=(len(blob),), stype=stype, data=blob)
              for k in ("flat", "payload")}  # fmt: skip
    rec = RecordDict({"arrays": ArrayRecord(arrays), "metrics": MetricRecord(metrics)})
    assert isinstance(check_reply(rec, flat_len=6), str)  # never valid, never an exception


# -- a hostile rank in a real torch.distributed run (3 processes, gloo on loopback) --------
def test_hostile_rank_in_a_real_torchdist_run_is_named_and_harmless(monkeypatch, capfd, tmp_path):
    """Rank 2 of 3 (complete graph) sends a forged sender, a 3000-deep tensor table, a NaN
    tensor and a forged round 10⁹, one per round (tests/torchdist_faults.py). The run
    finishes; each honest node rejects exactly the attacker's one payload per round, the
    logs name agent 2 for each attack, and the honest nodes' accuracies are those of a
    clean run in which node 2 is cut off (in-process simulator on the graph 0-1, 2 alone)
    to 1e-6: the attacker cost them its own contribution and nothing more."""
    from fedmerge.config import load_config
    from fedmerge.runtimes import torchdist
    from fedmerge.runtimes.local.simulator import Simulator

    monkeypatch.setenv("FEDMERGE_TRUSTED_MODULES", "tests.torchdist_faults")  # the ranks too
    monkeypatch.setenv("FEDMERGE_TEST_EVIL_RANK", "2")
    sets = ["rounds=4", "vectorize=never", "distributed.timeout_s=30"]
    evil = "train.loss=tests.torchdist_faults:hostile_cross_entropy"
    cfg = load_config(None, [*sets, "topology={graph: complete, n: 3}", evil])
    rows = torchdist.run(cfg, procs=3, threads=1)
    (tmp_path / "cut.adjlist").write_text("0 1\n1\n2\n")
    graph = f"{{graph: file, path: {tmp_path}/cut.adjlist, allow_disconnected: true}}"
    cut = load_config(None, [*sets, f"topology={graph}"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        clean = Simulator(cut).run()
    finally:
        torch.set_num_threads(threads)
    assert len(rows) == 12 and [r["rejected"] for r in rows if r["agent"] == 2] == [0] * 4
    honest = [(r, c) for r, c in zip(rows, clean, strict=True) if r["agent"] != 2]
    assert all(r["rejected"] == 1 for r, _ in honest)
    for key in ("global_acc", "local_acc"):  # what the attacker did changed nothing else
        assert all(r[key] == pytest.approx(c[key], abs=1e-6) for r, c in honest), key
    log = capfd.readouterr().err
    for reason in [
        "payload from agent 2: header names sender 3",
        "payload from agent 2 (round 1): unreadable tensor table",
        "payload from agent 2 (round 2): 'fc0.weight' has 1 non-finite value",
        "payload from agent 2 (round 1000000000): the round is from the future",
    ]:
        assert reason in log, (reason, log[-3000:])
