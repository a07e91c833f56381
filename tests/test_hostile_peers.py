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
