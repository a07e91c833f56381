"""Codecs for payloads: compressed task vectors on the wire and on disk.

Each codec is a registered unit with declared parameters (:mod:`.registry`):

- ``none``: dense, exact;
- ``topk``: the largest-magnitude entries with their values, indices as varint gaps;
- ``quantize``: 2–8-bit codes with per-block absmax scales (stochastic rounding option);
- ``ternary``: ComPEFT, the top-k entries as sign × one scale per tensor;
- ``lowrank``: PowerSGD rank-r factors per matrix with a warm-started subspace.

:class:`Encoder` adds error feedback and keeps per-key sender state; :mod:`.wire` puts
an encoding in one safetensors blob (the header names the codec and its parameters)
and decodes a received one safely (sizes checked against the receiver's specs before
anything is allocated).

>>> import torch
>>> from fedmerge.codecs import decode_blob, encode_state
>>> x = {"w": torch.arange(6.0).reshape(2, 3)}
>>> blob = encode_state(x, "quantize", {"bits": 8}).to_bytes({"sender": "3"})
>>> y, meta = decode_blob(blob, {"w": TensorSpec.of(x["w"])}, source="agent 3")
>>> float((y["w"] - x["w"]).abs().max()) <= 5 / 127 / 2, meta["codec"]
(True, 'quantize')
"""

from fedmerge.checkpoint import TensorSpec
from fedmerge.codecs import dense, lowrank, quantize, sparse  # noqa: F401  (registers codecs)
from fedmerge.codecs.feedback import Encoder
from fedmerge.codecs.registry import CODECS, Codec, KeyContext, Malformed, get_codec, register
from fedmerge.codecs.wire import (
    Encoded,
    Layout,
    decode_blob,
    encode_state,
    is_packed,
    pack_tensors,
    read_layout,
    unpack_tensors,
)

__all__ = [
    "CODECS",
    "Codec",
    "Encoded",
    "Encoder",
    "KeyContext",
    "Layout",
    "Malformed",
    "TensorSpec",
    "decode_blob",
    "encode_state",
    "get_codec",
    "is_packed",
    "pack_tensors",
    "read_layout",
    "register",
    "unpack_tensors",
]
