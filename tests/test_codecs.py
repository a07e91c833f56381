"""Codecs: round trips (hypothesis), error feedback, and rejection of hostile encodings."""

import json
import math
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load, save

from fedmerge.checkpoint import TensorSpec
from fedmerge.codecs import (
    CODECS,
    Encoder,
    decode_blob,
    encode_state,
    get_codec,
    is_packed,
    pack_tensors,
    unpack_tensors,
)
from fedmerge.codecs.bits import decode_gaps, encode_gaps
from fedmerge.codecs.choco import ChocoGossip
from fedmerge.errors import ConfigError, ValidationError
from fedmerge.stheader import parse_header

PROPS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def tensors(draw, dtypes=(torch.float32,), max_dims=3):
    shape = draw(st.lists(st.integers(0, 9), max_size=max_dims))
    seed = draw(st.integers(0, 2**31))
    dtype = draw(st.sampled_from(dtypes))
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    if draw(st.booleans()):  # exact zeros and ties
        x = (x * 2).round() / 2
    return x.to(dtype)


def roundtrip(x: dict, codec: str, params: dict | None = None) -> dict:
    blob = encode_state(x, codec, params).to_bytes({"sender": "1"})
    specs = {k: TensorSpec.of(v) for k, v in x.items()}
    return decode_blob(blob, specs, source="agent 1")[0]


@PROPS
@given(x=tensors(dtypes=(torch.float32, torch.float64, torch.bfloat16, torch.float16)))
def test_none_is_exact(x):
    y = roundtrip({"a.w": x}, "none")["a.w"]
    assert y.dtype == x.dtype and torch.equal(y, x)


@PROPS
@given(x=tensors(dtypes=(torch.float32, torch.float64)), bits=st.integers(2, 8),
       block=st.integers(1, 20))  # fmt: skip
def test_quantize_error_within_half_a_step_per_block(x, bits, block):
    y = roundtrip({"w": x}, "quantize", {"bits": bits, "block": block})["w"]
    flat, err = x.reshape(-1), (y - x).abs().reshape(-1)
    pad = (-flat.numel()) % block
    absmax = torch.cat([flat.abs(), flat.new_zeros(pad)]).view(-1, block).amax(1)
    bound = (absmax / (2 ** (bits - 1) - 1) / 2).repeat_interleave(block)[: flat.numel()]
    assert bool((err <= bound * (1 + 1e-5) + 1e-7).all())


def test_quantize_stochastic_is_seeded_and_unbiased():
    x = {"w": torch.full((20000,), 0.3)}
    x["w"][0] = 1.0  # absmax 1 → 0.3 lies between codes 0.0 and 1/7 at 4 bits... 2 bits: 0 or 1
    params = {"bits": 2, "block": 20000, "stochastic": True}
    a, b = encode_state(x, "quantize", params, seed=5), encode_state(x, "quantize", params, seed=5)
    assert torch.equal(a.parts["w#codes"], b.parts["w#codes"])
    y = a.decode()["w"][1:]
    assert set(y.unique().tolist()) == {0.0, 1.0}
    assert abs(float(y.mean()) - 0.3) < 0.02  # 3σ of a Bernoulli(0.3) mean over 2·10⁴ draws ≈ 0.01


def _topk_mask(x: torch.Tensor, density: float) -> torch.Tensor:
    flat = x.reshape(-1)
    k = min(flat.numel(), max(1, math.ceil(density * flat.numel())))
    kth = flat.abs().sort(descending=True).values[k - 1]
    return (flat.abs() >= kth) & (flat != 0)


@PROPS
@given(x=tensors(dtypes=(torch.float32, torch.float64)), density=st.floats(0.01, 1.0))
def test_topk_keeps_exactly_the_selected_entries(x, density):
    y = roundtrip({"w": x}, "topk", {"density": density})["w"].reshape(-1)
    if x.numel() == 0:
        return
    mask = _topk_mask(x, density)
    assert torch.equal(y[mask], x.reshape(-1)[mask])
    assert not bool(y[~mask].any())


@PROPS
@given(x=tensors(dtypes=(torch.float32, torch.float64)), density=st.floats(0.01, 1.0),
       bits=st.sampled_from([16, 8, 4]), block=st.integers(1, 20))  # fmt: skip
def test_quantized_topk_keeps_the_selected_entries_within_half_a_step(x, density, bits, block):
    params = {"density": density, "bits": bits, "block": block}
    y = roundtrip({"w": x}, "topk", params)["w"].reshape(-1)
    if x.numel() == 0:
        return
    flat, mask = x.reshape(-1), _topk_mask(x, density)
    kept = flat[mask]  # in index order, as the codec blocks them
    pad = (-kept.numel()) % block
    scales = torch.cat([kept.abs(), kept.new_zeros(pad)]).view(-1, block).amax(1)
    bound = scales.repeat_interleave(block)[: kept.numel()] / (2 * (2 ** (bits - 1) - 1))
    # half a step, plus the float rounding of x / scale · L and of its decoding (a few ulps of
    # x: at 16 bits in float32 it can tip a rounding by ~0.004 of a step)
    slack = 4 * torch.finfo(kept.dtype).eps * kept.abs()
    assert bool(((y[mask] - kept).abs() <= bound * (1 + 1e-5) + slack + 1e-12).all())
    assert not bool(y[~mask].any())  # nothing outside the selection; a kept entry may round to 0
    assert bool((y[mask] * kept >= 0).all())  # never a flipped sign


def test_quantized_topk_by_hand_and_its_size():
    x = torch.tensor([0.0, 1.0, -0.5, 0.01, 0.25, 0.0, -2.0, 0.0])
    p = {"density": 0.5, "bits": 8, "block": 2}
    enc = encode_state({"w": x}, "topk", p)
    # blocks (1, -0.5), (0.25, -2); codes travel as q + 127
    assert enc.parts["w#codes"].tolist() == [254, 63, 143, 0]
    assert enc.parts["w#scales"].tolist() == [1.0, 2.0]
    assert enc.nbytes == 4 + 4 + 2 * 4  # 4 one-byte gaps, 4 codes, 2 float32 scales
    y = roundtrip({"w": x}, "topk", p)["w"]
    assert torch.allclose(y, torch.tensor([0, 1, -64 / 127, 0, 32 / 127, 0, -2, 0]))
    assert encode_state({"w": x}, "topk", {**p, "bits": 16}).parts["w#codes"].dtype == torch.int16
    four = encode_state({"w": x}, "topk", {**p, "bits": 4})  # q = 7, −4 (−3.5 to even), 1, −7
    assert four.parts["w#codes"].tolist() == [(7 + 7) | (3 << 4), (1 + 7) | (0 << 4)]


@PROPS
@given(x=tensors(), density=st.floats(0.01, 1.0))
def test_ternary_is_sign_times_mean_kept_magnitude(x, density):
    y = roundtrip({"w": x}, "ternary", {"density": density})["w"].reshape(-1)
    if x.numel() == 0:
        return
    flat, mask = x.reshape(-1), _topk_mask(x, density)
    scale = flat[mask].abs().mean() if mask.any() else torch.tensor(0.0)
    assert torch.allclose(y[mask], flat[mask].sign() * scale, rtol=1e-6)
    assert not bool(y[~mask].any())


def test_ternary_std_scale_and_global_scope_by_hand():
    a, b = torch.tensor([4.0, -1.0, 0.5, 0.0]), torch.tensor([-3.0, 0.25])
    # global, density 0.5: N = 6, threshold = 3rd smallest |x| (6 - int(3)) = 0.5,
    # so 4, 1, 0.5 and 3 are kept
    y = roundtrip({"a": a, "b": b}, "ternary", {"density": 0.5, "scope": "global", "scale": "std",
                                                "alpha": 2.0})  # fmt: skip
    sa, sb = 2 * float(a.std()), 2 * float(b.std())
    assert torch.allclose(y["a"], torch.tensor([sa, -sa, sa, 0.0]))
    assert torch.allclose(y["b"], torch.tensor([-sb, 0.0]))
    z = roundtrip({"a": a, "b": b}, "topk", {"density": 0.5, "scope": "global"})
    assert z["a"].tolist() == [4.0, -1.0, 0.5, 0.0] and z["b"].tolist() == [-3.0, 0.0]


@PROPS
@given(m=st.integers(1, 12), n=st.integers(1, 12), seed=st.integers(0, 2**31),
       rank_deficient=st.booleans())  # fmt: skip
def test_lowrank_at_full_rank_is_exact(m, n, seed, rank_deficient):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, n, generator=g)
    if rank_deficient and min(m, n) > 1:
        x = torch.randn(m, 1, generator=g) @ torch.randn(1, n, generator=g)
    y = roundtrip({"w": x, "b": torch.randn(n, generator=g)}, "lowrank", {"rank": min(m, n)})
    # exact up to float32 rounding of the QR/projection (grows with the condition number)
    assert float((y["w"] - x).abs().max()) <= 1e-4 * max(1.0, float(x.abs().max()))


def test_lowrank_warm_start_converges_to_the_best_rank_r_approximation():
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(30, 30, generator=g))
    v, _ = torch.linalg.qr(torch.randn(20, 20, generator=g))
    s = torch.tensor([10.0, 8.0, 6.0] + [0.5**i for i in range(17)])
    x = (u[:, :20] * s) @ v.T
    best = float(s[3:].norm())  # Eckart–Young: error of the best rank-3 approximation
    enc = Encoder("lowrank", {"rank": 3})
    errors = [float((enc.encode({"w": x})[1]["w"] - x).norm()) for _ in range(15)]
    assert errors[0] > 1.01 * best  # one iteration from a random start is not optimal …
    assert errors[-1] <= best * (1 + 1e-4)  # … the warm-started subspace gets there


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31), density=st.floats(0.05, 0.5), rounds=st.integers(1, 30))
def test_error_feedback_running_sums_track_with_a_bounded_residual(seed, density, rounds):
    g = torch.Generator().manual_seed(seed)
    enc = Encoder("topk", {"density": density}, error_feedback=True)
    true_sum, sent_sum, biggest = torch.zeros(50), torch.zeros(50), 0.0
    for _ in range(rounds):
        x = torch.rand(50, generator=g) * 2 - 1
        biggest = max(biggest, float(x.norm()))
        true_sum += x
        sent_sum += enc.encode({"w": x})[1]["w"]
    residual = enc.residual["w"]
    assert torch.allclose(sent_sum + residual, true_sum, atol=1e-4)
    k = max(1, math.ceil(density * 50))
    q = math.sqrt(1 - k / 50)
    assert float(residual.norm()) <= q / (1 - q) * biggest + 1e-4


def test_error_feedback_off_keeps_no_residual():
    enc = Encoder("topk", {"density": 0.5})
    enc.encode({"w": torch.tensor([1.0, 0.1])})
    assert enc.residual == {}


@given(idx=st.lists(st.integers(0, 2**40), max_size=30, unique=True))
@settings(max_examples=60, deadline=None)
def test_varint_gaps_roundtrip(idx):
    t = torch.tensor(sorted(idx), dtype=torch.int64)
    assert decode_gaps(encode_gaps(t), len(idx), 2**40 + 1).tolist() == sorted(idx)


def test_every_codec_is_registered_with_docs():
    assert sorted(CODECS) == ["lowrank", "none", "quantize", "ternary", "topk"]
    for codec in CODECS.values():
        assert codec.doc
    with pytest.raises(ConfigError, match="codec 'quantize': parameter 'bits'"):
        get_codec("quantize").resolve({"bits": 9})
    with pytest.raises(ConfigError, match="codec 'none' has no parameter 'density'"):
        get_codec("none").resolve({"density": 0.1})


# ----------------------------------------------------------------------------- hostile

SPECS = {"layer.w": TensorSpec(torch.float32, (4, 5)), "b": TensorSpec(torch.float32, (5,))}
X = {"layer.w": torch.arange(20.0).reshape(4, 5) - 7, "b": torch.tensor([0.0, 2, -3, 0, 1])}


def forge(codec: str, params: dict, edit) -> bytes:
    """Encode X, then let ``edit(parts, meta)`` tamper with the parts or the header metadata."""
    enc = encode_state(X, codec, params)
    parts, meta = dict(enc.parts), enc.metadata()
    edit(parts, meta)
    return save(parts, metadata=meta)


def u8(*values):
    return torch.tensor(values, dtype=torch.uint8)


def _set(name, value):
    return lambda parts, meta: parts.__setitem__(name, value)


def _meta(field, value):
    return lambda parts, meta: meta.__setitem__(field, value)


def _spec_of(key, shape):
    def edit(parts, meta):
        specs = json.loads(meta["codec_specs"])
        specs[key][1] = shape
        meta["codec_specs"] = json.dumps(specs)

    return edit


HOSTILE = {
    "index past the end": ("topk", {"density": 0.4}, _set("b#gaps", u8(1, 9)), "'b'.*past"),
    "indices going backwards": (
        "topk",
        {"density": 0.4},
        _set("b#gaps", u8(2, 0)),
        "'b'.*increasing",
    ),
    "unterminated varint": (
        "topk",
        {"density": 0.4},
        _set("b#gaps", u8(1, 0x81)),
        "'b'.*inside a varint",
    ),
    "wrong count": (
        "topk",
        {"density": 0.4},
        _set("b#gaps", u8(1, 1, 1)),
        "'b'.*holds 3 indices, expected 2",
    ),
    "too many values": (
        "topk",
        {"density": 0.4},
        _set("b#values", torch.ones(6)),
        "'b'.*at most 5",
    ),
    "NaN value": (
        "topk",
        {"density": 0.4},
        _set("b#values", torch.tensor([1.0, math.nan])),
        "'b'.*non-finite",
    ),
    "8-bit top-k code out of range": (
        "topk",
        {"density": 0.4, "bits": 8},
        _set("b#codes", u8(128, 255)),
        "'b'.*code 128 is outside",
    ),
    "top-k scales of the wrong count": (
        "topk",
        {"density": 0.4, "bits": 16, "block": 1},
        _set("b#scales", torch.ones(1)),
        "'b'.*'scales' has shape",
    ),
    "4-bit top-k codes for fewer indices": (
        "topk",
        {"density": 0.4, "bits": 4},
        _set("b#codes", u8(0x77, 0x07)),
        "'b'.*2 index bytes cannot hold 3..4",
    ),
    "top-k codes of the wrong width": (
        "topk",
        {"density": 0.4, "bits": 16},
        _set("b#codes", torch.ones(2, dtype=torch.uint8)),
        "'b'.*'codes' is U8, expected I16",
    ),
    "top-k codes past numel": (
        "topk",
        {"density": 0.4, "bits": 8},
        _set("b#codes", torch.ones(6, dtype=torch.uint8)),
        "'b'.*at most 5",
    ),
    "top-k bits not a choice": ("topk", {}, _meta("codec_params", '{"bits": 12}'), "'bits'"),
    "code out of range": (
        "quantize",
        {"bits": 8},
        _set("b#codes", u8(0, 1, 2, 255, 3)),
        "'b'.*code 128 is outside",
    ),
    "negative scale": (
        "quantize",
        {"bits": 4},
        _set("b#scales", torch.tensor([-1.0])),
        "'b'.*negative",
    ),
    "codes of the wrong size": (
        "quantize",
        {"bits": 4},
        _set("b#codes", torch.zeros(5, dtype=torch.uint8)),
        "'b'.*'codes' has shape",
    ),
    "infinite ternary scale": (
        "ternary",
        {},
        _set("b#scale", torch.tensor(math.inf)),
        "'b'.*scale",
    ),
    "sign padding bits": ("ternary", {"density": 0.2}, _set("b#signs", u8(0xF0)), "'b'.*padding"),
    "factor rank above the parameter": (
        "lowrank",
        {"rank": 1},
        _set("layer.w#p", torch.ones(4, 2)),
        "'layer.w'.*factors",
    ),
    "unknown codec": ("none", {}, _meta("codec", "zstd"), "unknown codec 'zstd'"),
    "bad parameter": ("quantize", {}, _meta("codec_params", '{"bits": 99}'), "'bits'"),
    "params not JSON": ("quantize", {}, _meta("codec_params", "{"), "codec_params"),
    "decoded shape lies": ("none", {}, _spec_of("b", [5000000]), "'b' has shape"),
    "missing part": ("topk", {}, lambda parts, meta: parts.pop("b#values"), "'b'.*parts"),
    "stray part": ("none", {}, _set("evil#value", torch.ones(1)), "unknown key 'evil'"),
}


@pytest.mark.parametrize("form", ["blob", "tensors"])
@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_encodings_are_one_clear_validation_error(case, form):
    codec, params, edit, message = HOSTILE[case]
    blob = forge(codec, params, edit)
    with pytest.raises(ValidationError, match=message) as info:
        if form == "blob":
            decode_blob(blob, SPECS, source="payload from agent 7")
        else:  # the same parts and metadata as named tensors (pack_tensors' form)
            header = parse_header(blob)
            meta = json.dumps(header.metadata).encode()
            tensors = {**load(blob), "#codec": torch.frombuffer(bytearray(meta), dtype=torch.uint8)}
            unpack_tensors(tensors, SPECS, source="payload from agent 7")
    assert "agent 7" in str(info.value)


@PROPS
@given(x=tensors(), codec=st.sampled_from(sorted(CODECS)))
def test_packed_tensors_round_trip_like_blobs(x, codec):
    enc = encode_state({"a.w": x}, codec)
    packed = pack_tensors(enc)
    assert is_packed(packed) and not is_packed(enc.parts)
    got = unpack_tensors(packed, {"a.w": TensorSpec.of(x)}, source="agent 1")["a.w"]
    assert torch.equal(got, enc.decode()["a.w"])


def test_decoded_size_is_bounded_before_allocating():
    huge = {"w": TensorSpec(torch.float32, (2**20, 2**20))}  # 4 TiB if anyone allocated it
    blob = forge("topk", {}, lambda parts, meta: meta.__setitem__(
        "codec_specs", json.dumps({"w": ["F32", [2**20, 2**20]]})))  # fmt: skip
    with pytest.raises(ValidationError, match="over the 1000000 limit"):
        decode_blob(blob, None, source="agent 2", max_decoded_bytes=10**6)
    with pytest.raises(ValidationError, match="missing key 'b'"):
        decode_blob(blob, SPECS, source="agent 2")
    assert huge  # the receiver's own specs would be the bound when given


def test_blob_size_limit_and_truncation():
    blob = encode_state(X, "none").to_bytes()
    with pytest.raises(ValidationError, match="exceeds the 10 limit"):
        decode_blob(blob, SPECS, max_bytes=10)
    (n,) = struct.unpack("<Q", blob[:8])
    with pytest.raises(ValidationError):
        decode_blob(blob[: 8 + n + 3], SPECS)


# ----------------------------------------------------------------------------- CHOCO


def choco_rounds(n, codec, params, gamma, rounds, seed=0, resync=0, lost=()):
    """CHOCO-Gossip on a ring of n (Metropolis–Hastings: 1/3 to each side) -> (x0, x, agents,
    mean after every round). ``lost``: (round, sender, receiver) messages that never arrive."""
    g = torch.Generator().manual_seed(seed)
    x0 = [{"w": torch.randn(40, generator=g), "b": torch.randn(3, generator=g)} for _ in range(n)]
    agents = [ChocoGossip(i, codec, params, gamma, resync=resync) for i in range(n)]
    x, means = x0, []
    for r in range(1, rounds + 1):  # the engines count rounds from 0: round r publishes r − 1
        q = [a.publish(xi, r - 1)[1] for a, xi in zip(agents, x, strict=True)]
        heard = [[(j, q[j], 1 / 3) for j in ((i - 1) % n, (i + 1) % n) if (r, j, i) not in lost]
                 for i in range(n)]  # fmt: skip
        x = [a.merge(x[i], heard[i], {j for j, _, _ in heard[i] if a.is_keyframe(r - 1)})
             for i, a in enumerate(agents)]  # fmt: skip
        means.append(_mean(x, "w"))
    return x0, x, agents, means


def _mean(xs, key):
    return sum(x[key] for x in xs) / len(xs)


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(3, 7),
    codec=st.sampled_from([("topk", {"density": 0.2}), ("ternary", {"density": 0.3}),
                           ("quantize", {"bits": 2}), ("lowrank", {"rank": 1})]),
    gamma=st.floats(0.05, 1.0), rounds=st.integers(1, 8), seed=st.integers(0, 1000),
    resync=st.sampled_from([0, 2, 3]),
)  # fmt: skip
def test_choco_gossip_keeps_the_network_average_exactly(n, codec, gamma, rounds, seed, resync):
    x0, x, _, _ = choco_rounds(n, *codec, gamma, rounds, seed, resync)
    for key in ("w", "b"):
        assert torch.allclose(_mean(x, key), _mean(x0, key), atol=1e-5)


def test_key_frames_resync_copies_a_lost_message_left_behind():
    """Messages lost in rounds 2 and 3: without key frames the receivers' copies stay
    behind for good and the average keeps drifting; with a key frame every 4 rounds every
    copy equals its owner's after round 4, and from then on the average is kept exactly."""
    lost = {(2, 0, 1), (3, 2, 1), (3, 4, 3)}  # (round, sender, receiver)
    args = (6, "topk", {"density": 0.2}, 0.4, 12)

    def behind(agents):
        return max(float((a.copies[j]["w"] - agents[j].copies[j]["w"]).abs().max())
                   for a in agents for j in a.copies)  # fmt: skip

    _, _, plain, plain_means = choco_rounds(*args, lost=lost)
    _, _, synced, synced_means = choco_rounds(*args, resync=4, lost=lost)
    assert behind(plain) > 1e-3 and behind(synced) == 0.0
    assert float((plain_means[-1] - plain_means[4]).abs().max()) > 1e-4  # still drifting
    for m in synced_means[4:]:  # kept exactly from the key frame of round 4 on
        assert torch.allclose(m, synced_means[3], atol=1e-6)
    assert not torch.allclose(synced_means[3], synced_means[0], atol=1e-6)  # the loss did drift


def test_choco_gossip_with_topk_reaches_consensus():
    x0, x, _, _ = choco_rounds(8, "topk", {"density": 0.1}, 0.3, 300)
    spread = [sum(float((xi["w"] - _mean(xs, "w")).norm() ** 2) for xi in xs) for xs in (x0, x)]
    assert spread[1] < 1e-4 * spread[0]


def test_global_topk_of_only_empty_tensors_encodes_nothing():
    """Global top-k over a state whose every tensor is empty (the fuzz test's find): no
    threshold to select, an empty tensor back."""
    for bits in (32, 8):
        enc = encode_state({"t0": torch.zeros(0)}, "topk",
                           {"density": 1.0, "scope": "global", "bits": bits})  # fmt: skip
        out = enc.decode()
        assert list(out) == ["t0"] and out["t0"].shape == (0,)
