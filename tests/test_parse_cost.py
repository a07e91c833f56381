"""Header parse cost is bounded by the blob (issue 19 defect 5): a forged header with a
million zero-size tensors is refused before any JSON is parsed, and for any header the
parser's peak memory and work stay under a fixed multiple of the blob size."""

import importlib
import json
import struct
import tracemalloc
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedmerge import stheader
from fedmerge.errors import ValidationError
from fedmerge.stheader import MAX_TENSORS, parse_header

MEMORY_MULTIPLE = 64  # generous: CPython's JSON objects cost ~10-25× their text
MEMORY_SLACK = 1 << 20


def blob_of(header: dict) -> bytes:
    raw = json.dumps(header, separators=(",", ":")).encode()
    return struct.pack("<Q", len(raw)) + raw


def zero_size(n: int) -> bytes:
    """n zero-size tensors: a legal-looking header that costs O(n) Python objects."""
    one = '"t%d":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}'
    raw = ("{" + ",".join(one % i for i in range(n)) + "}").encode()
    return struct.pack("<Q", len(raw)) + raw


def test_a_million_zero_size_tensors_are_refused_before_parsing(monkeypatch):
    blob = zero_size(1_000_000)  # ~60 MB, like the 65 MB blob
    assert len(blob) > 50_000_000

    def no_parse(*args, **kwargs):
        raise AssertionError("the JSON was parsed: the count limit came too late")

    monkeypatch.setattr(stheader.json, "loads", no_parse)
    with pytest.raises(ValidationError, match="more than the 50000-tensor limit"):
        parse_header(blob)


def test_the_tensor_limit_is_a_parameter():
    blob = zero_size(10)
    assert len(parse_header(blob).tensors) == 10
    with pytest.raises(ValidationError, match="9-tensor limit"):
        parse_header(blob, max_tensors=9)
    assert MAX_TENSORS == 50_000


def test_escaped_keys_cannot_dodge_the_count():
    """The pre-count is structural ('{'), not a search for a key an escape could hide."""
    one = '"t%d":{"dtyp\\u0065":"F32","shap\\u0065":[0],"data_offset\\u0073":[0,0]}'
    raw = ("{" + ",".join(one % i for i in range(12)) + "}").encode()
    blob = struct.pack("<Q", len(raw)) + raw
    with pytest.raises(ValidationError, match="limit"):
        parse_header(blob, max_tensors=10)


def test_metadata_entry_count_is_bounded():
    header = {"__metadata__": {f"k{i}": "" for i in range(stheader.MAX_METADATA + 1)}}
    with pytest.raises(ValidationError, match="metadata entries"):
        parse_header(blob_of(header))


# ----------------------------------------------------------------------------- property

JSON_LEAVES = st.one_of(st.integers(-5, 2**40), st.text(max_size=8), st.booleans(), st.none())


@st.composite
def hostile_headers(draw) -> bytes:
    """Headers shaped to maximise objects per byte: many tensors, long shapes, arrays of
    short strings, wide metadata, junk entries, deep nesting (within the count limit)."""
    kind = draw(st.sampled_from(["tensors", "long_shape", "strings", "metadata", "junk", "deep"]))
    n = draw(st.integers(1, 3000))
    if kind == "tensors":
        header = {f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}
                  for i in range(n)}  # fmt: skip
    elif kind == "long_shape":
        header = {"t": {"dtype": "F32", "shape": [1] * n * 10, "data_offsets": [0, 4]}}
    elif kind == "strings":
        header = {"t": {"dtype": "F32", "shape": ["a"] * n * 10, "data_offsets": [0, 0]}}
    elif kind == "metadata":
        header = {"__metadata__": {f"{i}": "" for i in range(n)}}
    elif kind == "junk":
        header = {f"{i}": draw(st.lists(JSON_LEAVES, max_size=20)) for i in range(n // 10 + 1)}
    else:
        raw = ('{"t":' + "[" * n + "]" * n + "}").encode()
        return struct.pack("<Q", len(raw)) + raw
    return blob_of(header)


class CountingHook:
    """Counts the key/value pairs the JSON parser hands over: the parser's work."""

    def __init__(self, hook):
        self.hook, self.pairs = hook, 0

    def __call__(self, pairs):
        self.pairs += len(pairs)
        return self.hook(pairs)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
          HealthCheck.data_too_large, HealthCheck.large_base_example])  # fmt: skip
@given(hostile_headers())
def test_parse_memory_and_work_are_a_fixed_multiple_of_the_blob(blob):
    counter = CountingHook(stheader._no_duplicates)
    tracemalloc.start()
    try:
        with mock.patch.object(stheader, "_no_duplicates", counter):
            parse_header(blob)
    except ValidationError:
        pass
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak <= MEMORY_MULTIPLE * len(blob) + MEMORY_SLACK
    assert counter.pairs <= len(blob) // 4  # a pair needs at least '"":0,' of text


# ----------------------------------------------------------------------------- byte bound


def test_every_runtime_bounds_payload_bytes(monkeypatch):
    """validation.max_bytes 0 means twice the receiver's own size, in Flower too (it meant
    'no bound' there): the blob is refused by size before its header is parsed."""
    pytest.importorskip("flwr")
    from types import SimpleNamespace

    import torch

    from fedmerge.config import TrainConfig, ValidationConfig
    from fedmerge.data.partition import AgentData
    from fedmerge.decentralized.agent import Agent
    from fedmerge.models import build_model

    client_app = importlib.import_module("fedmerge.runtimes.flower.client_app")
    from fedmerge.runtimes.flower.records import blob_array

    model = build_model("mlp", in_shape=(4,), num_classes=3, seed=0, hidden=[5])
    x = torch.zeros(6, 4)
    data = AgentData(x, torch.zeros(6, dtype=torch.long), x, torch.zeros(6, dtype=torch.long))
    agent = Agent(0, model, data, train=TrainConfig(), validation=ValidationConfig(), seed=0)
    own = sum(t.numel() * t.element_size() for t in agent.tensors().values())
    assert agent.byte_limit() == 2 * own > 0
    seen = []
    monkeypatch.setattr(client_app, "receive_and_merge",
                        lambda agent, deliveries, *a: seen.extend(deliveries) or
                        SimpleNamespace(rejected=len(deliveries)))  # fmt: skip
    monkeypatch.setattr(client_app, "MergeContext", lambda *a: None)
    monkeypatch.setattr(stheader, "_decode", lambda *a: pytest.fail("parsed an oversized blob"))
    step = {"senders": [1], "weights": [0.5], "self-weight": 0.5}
    inbox = {"1": blob_array(zero_size(10) + b"\0" * 2 * own)}
    content = SimpleNamespace(config_records={"step": step}, array_records={"inbox": inbox})
    setup = SimpleNamespace(config=None, calibration=lambda: None, protocol=None)
    assert client_app.merge_inbox(agent, SimpleNamespace(content=content), setup, 0) == 1
    assert "exceeds the" in seen[0].item.reason
