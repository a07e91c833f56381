"""Fuzzing (hypothesis) of everything that parses outside input: the safetensors reader on
disk, payload decoding, config parsing. Every input either parses or raises a fedmerge
error (never another exception, a hang, or an allocation beyond the input's size).

The budget is bounded (``max_examples``) so this runs in CI in a few seconds per target;
set ``FEDMERGE_FUZZ_EXAMPLES`` to fuzz longer locally.
"""

import json
import os
import resource
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save

from fedmerge.checkpoint import load_state_dict
from fedmerge.codecs import decode_blob, encode_state, pack_tensors, unpack_tensors
from fedmerge.config import SimConfig, field_docs, load_config
from fedmerge.decentralized.payload import Payload, validate_payload
from fedmerge.errors import CheckpointError, ConfigError, ValidationError
from fedmerge.statedict import specs_of
from fedmerge.stheader import parse_header

EXAMPLES = int(os.environ.get("FEDMERGE_FUZZ_EXAMPLES", "150"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
DTYPES = ["F32", "F64", "F16", "BF16", "I64", "I32", "I8", "U8", "BOOL", "F8_E4M3", "U64", "x"]
BIG = st.sampled_from([2**31, 2**32 + 7, 2**40, 2**62, 2**63 - 1, 2**64 - 1])
SMALL_OR_BIG = st.one_of(st.integers(-3, 64), BIG)


def rss_mib() -> float:
    """Peak resident memory of this process so far (MiB; Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.fixture(autouse=True)
def bounded_memory():
    """No fuzz case may allocate what a forged size claims (the inputs are ≤ a few KiB)."""
    before = rss_mib()
    yield
    assert rss_mib() - before < 256, "a fuzz case allocated far more than its input"


# ----------------------------------------------------------------------------- inputs


@st.composite
def state_dicts(draw):
    """Small real state dicts: 1–3 tensors of float/int dtypes, shapes up to 3×4."""
    n = draw(st.integers(1, 3))
    dtypes = [torch.float32, torch.float64, torch.bfloat16, torch.int64, torch.uint8]
    out = {}
    for i in range(n):
        shape = draw(st.lists(st.integers(0, 4), max_size=2))
        dtype = draw(st.sampled_from(dtypes))
        out[f"t{i}"] = torch.arange(int(torch.tensor(shape).prod()) if shape else 1).reshape(
            shape
        ).to(dtype)  # fmt: skip
    return out


@st.composite
def forged_headers(draw):
    """A header JSON whose fields may lie: odd dtypes, shapes, offsets, metadata, keys."""
    entries = {}
    for i in range(draw(st.integers(0, 3))):
        entry = {
            "dtype": draw(st.sampled_from(DTYPES)),
            "shape": draw(st.lists(SMALL_OR_BIG, max_size=3)),
            "data_offsets": draw(st.lists(SMALL_OR_BIG, min_size=1, max_size=3)),
        }
        if draw(st.booleans()):
            entry = draw(st.sampled_from([[], "x", 3, None, {**entry, "extra": 1}]))
        entries[draw(st.sampled_from([f"t{i}", "__metadata__", "é", ""]))] = entry
    if draw(st.booleans()):
        entries["__metadata__"] = draw(
            st.one_of(st.dictionaries(st.text(max_size=3), st.text(max_size=3)), st.integers())
        )
    return json.dumps(entries).encode()


def with_length(header: bytes, data: bytes, lie: int | None) -> bytes:
    return struct.pack("<Q", len(header) if lie is None else lie) + header + data


@st.composite
def mangled_blobs(draw):
    """A valid safetensors blob, then one mutation: truncation, byte flips, a lying
    length prefix, a forged header, a non-UTF-8 header, or duplicate keys."""
    blob = save(draw(state_dicts()), metadata={"sender": "1"})
    (n,) = struct.unpack("<Q", blob[:8])
    header, data = blob[8 : 8 + n], blob[8 + n :]
    how = draw(st.sampled_from(["truncate", "flip", "length", "forge", "utf8", "dup", "none"]))
    if how == "truncate":
        return blob[: draw(st.integers(0, len(blob) - 1))]
    if how == "flip":
        out = bytearray(blob)
        for _ in range(draw(st.integers(1, 4))):
            out[draw(st.integers(0, len(out) - 1))] ^= draw(st.integers(1, 255))
        return bytes(out)
    if how == "length":
        return with_length(header, data, draw(st.one_of(st.integers(0, 2 * n), BIG)))
    if how == "forge":
        lie = draw(st.one_of(st.none(), st.integers(0, 300), BIG))
        return with_length(draw(forged_headers()), draw(st.binary(max_size=64)), lie)
    if how == "utf8":
        at = draw(st.integers(1, len(header) - 2))
        bad = draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x80\x80"]))
        return with_length(header[:at] + bad + header[at + 1 :], data, None)
    if how == "dup":  # repeat the first entry under the same name
        first = json.loads(header)
        key = next(iter(first))
        text = header.decode().rstrip()
        dup = text[:-1] + f",{json.dumps(key)}:{json.dumps(first[key])}}}"
        return with_length(dup.encode(), data, None)
    return blob


# ----------------------------------------------------------------------------- reader


def test_forged_sizes_rejected_before_reading(tmp_path):
    """Hand-made worst cases: each named, none read past the header."""
    cases = {
        "huge header length": (struct.pack("<Q", 2**63) + b"{}", "header length"),
        "length beyond file": (with_length(b'{"a":1}', b"", 10**6), "bytes that follow"),
        "huge shape": (
            with_length(
                b'{"w":{"dtype":"F32","shape":[1099511627776],"data_offsets":[0,4]}}',
                b"\0" * 4,
                None,
            ),
            "bytes for F32",
        ),  # fmt: skip
        "offsets past data": (
            with_length(
                b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4000000000]}}', b"\0" * 4, None
            ),
            "outside",
        ),  # fmt: skip
        "overlap": (
            with_length(
                b'{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},'
                b'"b":{"dtype":"U8","shape":[2],"data_offsets":[1,3]}}',
                b"\0" * 3,
                None,
            ),
            "overlaps",
        ),  # fmt: skip
        "duplicate": (
            with_length(
                b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},'
                b'"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}',
                b"\0",
                None,
            ),
            "duplicate key 'a'",
        ),  # fmt: skip
        "deep JSON": (with_length(b"[" * 100_000, b"", None), "not valid JSON"),
        "non-utf8": (with_length(b'{"\xff":1}', b"", None), "not UTF-8"),
        "unknown dtype": (
            with_length(b'{"w":{"dtype":"Q9","shape":[1],"data_offsets":[0,1]}}', b"\0", None),
            "unsupported dtype",
        ),
        "gap": (
            with_length(b'{"w":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}', b"\0\0", None),
            "gap",
        ),
    }
    for name, (blob, message) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(blob)
        with pytest.raises(CheckpointError, match=message) as info:
            load_state_dict(path)
        assert str(path) in str(info.value), name
        with pytest.raises(ValidationError, match=message):
            parse_header(blob)


@pytest.mark.timeout(120)
@FUZZ
@given(blob=mangled_blobs())
def test_fuzz_checkpoint_reader(blob):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "m.safetensors"
        path.write_bytes(blob)
        try:
            state = load_state_dict(path)
        except CheckpointError as exc:
            assert str(path) in str(exc)
            return
    header = parse_header(blob)  # it parsed: our header check must agree and describe it
    assert sorted(state) == sorted(header.tensors)
    for key, t in state.items():
        assert tuple(t.shape) == header.tensors[key].shape


# ----------------------------------------------------------------------------- payloads


@pytest.mark.timeout(120)
@FUZZ
@given(tensors=state_dicts(), data=st.data())
def test_fuzz_payload_decoding(tensors, data):
    good = Payload.make({k: v.double() for k, v in tensors.items()}, sender=2, round=1,
                        samples=5, kind="delta")  # fmt: skip
    blob = good.to_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    how = data.draw(st.sampled_from(["mangle", "meta", "forge"]))
    if how == "mangle":
        blob = data.draw(mangled_blobs()) if data.draw(st.booleans()) else _flip(blob, data)
    elif how == "meta":  # lying metadata: missing fields, non-integers, huge numbers, bad kind
        meta = json.loads(blob[8 : 8 + n])["__metadata__"]
        field = data.draw(st.sampled_from(sorted(meta)))
        meta[field] = data.draw(st.sampled_from(["", "x", "9" * 5000, "-1", "full", "1e9"]))
        if data.draw(st.booleans()):
            del meta[field]
        blob = save(good.tensors, metadata=meta)
    else:
        blob = with_length(data.draw(forged_headers()), data.draw(st.binary(max_size=32)), None)
    try:
        p = Payload.from_bytes(blob)
    except ValidationError:
        return
    try:  # decoded: the receiver's validation decides, with a ValidationError if not
        validate_payload(p, kind="delta", specs=specs_of(good.tensors), own_norm=1e9,
                         max_norm_ratio=10.0, max_bytes=1 << 20)  # fmt: skip
    except ValidationError:
        return
    assert p.hash == good.hash and p.sender == int(p.sender)


def _flip(blob: bytes, data) -> bytes:
    out = bytearray(blob)
    out[data.draw(st.integers(0, len(out) - 1))] ^= data.draw(st.integers(1, 255))
    return bytes(out)


@st.composite
def codec_choices(draw):
    """A codec and parameters (some valid, some not)."""
    codec = draw(st.sampled_from(["none", "topk", "quantize", "ternary", "lowrank"]))
    params = {
        "topk": {
            "density": draw(st.floats(0.05, 1.0)),
            "scope": draw(st.sampled_from(["tensor", "global"])),
            "bits": draw(st.sampled_from([32, 16, 8, 4])),
            "block": draw(st.integers(1, 8)),
        },
        "ternary": {"density": draw(st.floats(0.05, 1.0))},
        "quantize": {"bits": draw(st.integers(2, 8)), "block": draw(st.integers(1, 8))},
        "lowrank": {"rank": draw(st.integers(1, 4))},
    }.get(codec, {})  # fmt: skip
    return codec, params


@pytest.mark.timeout(120)
@FUZZ
@given(tensors=state_dicts(), choice=codec_choices(), data=st.data())
def test_fuzz_compressed_payloads(tensors, choice, data):
    """Encoded blobs with flipped bytes, lying codec metadata or swapped parts: decoding
    gives the right shapes or one ValidationError, never another exception."""
    floats = {k: v.float() * 0.37 - 1 for k, v in tensors.items()}
    specs = specs_of(floats)
    enc = encode_state(floats, *choice)
    parts, meta = dict(enc.parts), enc.metadata()
    how = data.draw(st.sampled_from(["flip", "meta", "part", "mangle", "packed"]))
    if how == "meta":
        field = data.draw(st.sampled_from(sorted(meta)))
        meta[field] = data.draw(st.sampled_from([
            "", "{", "[]", '{"bits": 1}', '{"bits": 8, "block": 1, "density": 0.5}',
            '{"bits": 32, "density": 0.5}', '{"rank": 0}', '{"density": 2}', "topk", "lowrank",
            "quantize", json.dumps({k: ["F32", [2**40]] for k in specs}),
            json.dumps({k: ["I64", [1]] for k in specs}), json.dumps({"x": ["F32", []]}),
        ]))  # fmt: skip
        blob = save(parts, metadata=meta)
    elif how == "part" and parts:
        name = data.draw(st.sampled_from(sorted(parts)))
        dtype = data.draw(st.sampled_from([torch.uint8, torch.float32, torch.int64]))
        values = data.draw(st.lists(st.integers(0, 255), max_size=12))
        parts[name] = torch.tensor(values, dtype=torch.int64).to(dtype)
        blob = save(parts, metadata=meta)
    elif how == "mangle":
        blob = data.draw(mangled_blobs())
    elif how == "packed":  # the named-tensor form, one byte of one tensor flipped
        packed = {k: v.clone() for k, v in pack_tensors(enc).items()}
        name = data.draw(st.sampled_from(sorted(packed)))
        raw = packed[name].reshape(-1).view(torch.uint8)
        if raw.numel():
            raw[data.draw(st.integers(0, raw.numel() - 1))] ^= data.draw(st.integers(1, 255))
        try:
            out = unpack_tensors(packed, specs, source="agent 3", max_decoded_bytes=1 << 20)
        except ValidationError as exc:
            assert "agent 3" in str(exc)
            return
        assert specs_of(out) == specs
        return
    else:
        blob = _flip(save(parts, metadata=meta), data)
    try:
        out, _ = decode_blob(blob, specs, source="agent 3", max_decoded_bytes=1 << 20)
    except ValidationError as exc:
        assert "agent 3" in str(exc)
        return
    assert specs_of(out) == specs


# ----------------------------------------------------------------------------- config

FIELDS = [name for name, _, _ in field_docs()]
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**20), 10**20),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
)  # fmt: skip
NESTED = st.one_of(SCALARS, st.lists(SCALARS, max_size=3))
VALUES = st.one_of(NESTED, st.dictionaries(st.text(max_size=6), NESTED, max_size=3))
KEYS = st.one_of(
    st.sampled_from(FIELDS), st.sampled_from([f.split(".")[0] for f in FIELDS]),
    st.text(max_size=12),
)  # fmt: skip


@st.composite
def config_mappings(draw):
    """Mappings that mix real dotted fields (nested properly) with junk keys and values."""
    out: dict = {}
    for key in draw(st.lists(KEYS, max_size=5)):
        *path, last = key.split(".")
        node = out
        for part in path:
            node = node.setdefault(part, {}) if isinstance(node.get(part, {}), dict) else {}
        node[last] = draw(VALUES)
    return out


@pytest.mark.timeout(120)
@FUZZ
@given(mapping=config_mappings())
def test_fuzz_config_mappings(mapping):
    try:
        cfg = load_config(mapping)
    except ConfigError:
        return
    assert isinstance(cfg, SimConfig)


@pytest.mark.timeout(120)
@FUZZ
@given(
    overrides=st.lists(
        st.one_of(
            st.text(max_size=30),
            st.tuples(KEYS, st.text(max_size=20)).map("=".join),
            st.tuples(KEYS, VALUES.map(json.dumps)).map("=".join),
        ),
        max_size=4,
    )
)
def test_fuzz_config_overrides(overrides):
    try:
        cfg = load_config(None, overrides)
    except ConfigError:
        return
    assert isinstance(cfg, SimConfig)


@pytest.mark.timeout(120)
@FUZZ
@given(raw=st.one_of(st.binary(max_size=200), VALUES.map(json.dumps).map(str.encode)))
def test_fuzz_config_files(raw):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "run.yaml"
        path.write_bytes(raw)
        try:
            load_config(path)
        except ConfigError as exc:
            assert str(path) in str(exc) or ":" in str(exc)


@pytest.mark.parametrize(
    "item", ["a=" + "[" * 5000, "data.options=" + "{a: " * 3000, "rounds=" + "9" * 5000, "=1", "x"]
)
def test_override_pathologies_are_config_errors(item):
    """Found by the fuzzers: too-deep YAML and over-long integers in ``--set`` values."""
    with pytest.raises(ConfigError, match="--set"):
        load_config(None, [item])


def test_non_utf8_config_file_is_a_config_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_bytes(b"rounds: 3\n\x80")
    with pytest.raises(ConfigError, match=r"config .*bad.yaml: not UTF-8 text"):
        load_config(path)
