"""Bytes in Flower records: a safetensors blob as a Flower ``Array`` and back."""

from __future__ import annotations

from flwr.app import Array

from fedmerge.errors import ValidationError


def blob_array(data: bytes) -> Array:
    """Raw bytes (a safetensors blob) as a Flower ``Array``, which Flower chunks and dedups."""
    return Array(dtype="uint8", shape=(len(data),), stype="safetensors", data=data)


def array_blob(array: Array) -> bytes:
    if array.stype != "safetensors":
        raise ValidationError(f"expected a safetensors blob, got stype {array.stype!r}")
    return bytes(array.data)
