"""The continual store's manifest: its schema, checked on every read and before every write.

A manifest is JSON (no NaN/Infinity) with exactly the fields of :data:`SCHEMA`; the file
names it holds are not free text: ``base.file`` must be ``base.safetensors`` and
``state_file`` must be ``state-NNNNNN.safetensors`` for the manifest's own generation
(None at step 0), so a tampered manifest cannot point the store at, or make it delete,
a file outside it. Counts must agree (``step`` = number of ``tau_norms`` = number of
``experts``). Every violation is a :class:`~fedmerge.errors.CheckpointError` naming the
file and the field.

>>> m = {"step": "3"}
>>> check_manifest(m, "m.json")
Traceback (most recent call last):
...
fedmerge.errors.CheckpointError: m.json: missing field 'format'
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

from fedmerge.errors import CheckpointError

FORMAT = "fedmerge-continual-store"
VERSION = 1
BASE_FILE = "base.safetensors"
Check = tuple[Callable[[Any], bool], str]


def state_name(generation: int) -> str:
    """The accumulator file of ``generation``."""
    return f"state-{generation:06d}.safetensors"


def _count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _sha256(v: Any) -> bool:
    return isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v) is not None


def _optional(check: Check) -> Check:
    return (lambda v: v is None or check[0](v)), f"{check[1]} or null"


def _list_of(check: Check) -> Check:
    return (lambda v: isinstance(v, list) and all(check[0](x) for x in v)), f"a list of {check[1]}"


def _record_of(schema: Mapping[str, Check]) -> Check:
    def ok(v: Any) -> bool:
        return isinstance(v, dict) and set(v) >= set(schema) and all(
            check(v[k]) for k, (check, _) in schema.items()
        )  # fmt: skip

    return ok, "{" + ", ".join(f"{k}: {d}" for k, (_, d) in schema.items()) + "}"


STR: Check = (lambda v: isinstance(v, str), "a string")
COUNT: Check = (_count, "an integer ≥ 0")
NUMBER: Check = (_number, "a finite number")
SHA256: Check = (_sha256, "a SHA-256 hex digest")
EXPERT: Check = _record_of({
    "id": STR, "hash": SHA256, "step": COUNT, "tau_norm": NUMBER, "merged_norm": NUMBER,
    "lambda": _optional(NUMBER), "added_at": STR, "source": _optional(STR),
})  # fmt: skip
SCHEMA: dict[str, Check] = {
    "format": (lambda v: v == FORMAT, repr(FORMAT)),
    "version": (lambda v: v == VERSION, f"{VERSION} (this fedmerge's store version)"),
    "method": STR, "params": (lambda v: isinstance(v, dict), "a mapping"),
    "project": _optional(STR), "no_project": _optional(STR), "projectable": _list_of(STR),
    "base": _record_of({"file": ((lambda v: v == BASE_FILE), repr(BASE_FILE)),
                        "hash": SHA256, "source": _optional(STR)}),
    "generation": COUNT, "state_file": _optional(STR), "state_hash": _optional(SHA256),
    "step": COUNT, "tau_norms": _list_of(NUMBER), "acc_norm": NUMBER, "scale": NUMBER,
    "merged_norm": NUMBER, "lambda": _optional(NUMBER), "experts": _list_of(EXPERT),
    "created_at": STR, "updated_at": STR,
}  # fmt: skip


def _no_constants(name: str) -> float:
    raise ValueError(f"{name} is not allowed (values must be finite)")


def parse_manifest(text: str, file: object) -> dict[str, Any]:
    """JSON text -> a checked manifest (see :func:`check_manifest`)."""
    try:
        manifest = json.loads(text, parse_constant=_no_constants)
    except (ValueError, RecursionError) as exc:
        raise CheckpointError(f"{file}: unreadable manifest ({str(exc)[:120]})") from None
    if not isinstance(manifest, dict):
        raise CheckpointError(f"{file}: a manifest must be a JSON object")
    return check_manifest(manifest, file)


def check_manifest(manifest: dict[str, Any], file: object) -> dict[str, Any]:
    """Raise :class:`CheckpointError` naming ``file`` and the field unless ``manifest`` fits."""
    for name, (ok, what) in SCHEMA.items():
        if name not in manifest:
            raise CheckpointError(f"{file}: missing field {name!r}")
        if not ok(manifest[name]):
            raise CheckpointError(
                f"{file}: field {name!r} must be {what}, got {str(manifest[name])[:60]!r}"
            )
    step, generation = manifest["step"], manifest["generation"]
    if not len(manifest["tau_norms"]) == len(manifest["experts"]) == step:
        raise CheckpointError(f"{file}: field 'step' ({step}) disagrees with 'tau_norms' "
                              f"and 'experts' ({len(manifest['experts'])} records)")  # fmt: skip
    want = state_name(generation) if step else None
    if manifest["state_file"] != want or (manifest["state_hash"] is None) != (want is None):
        got = str(manifest["state_file"])[:60]
        raise CheckpointError(
            f"{file}: field 'state_file' must be {want!r} at generation {generation}, got {got!r}"
        )
    return manifest


def dump_manifest(manifest: dict[str, Any], file: object) -> str:
    """Checked manifest -> JSON text (NaN/Infinity refused rather than written)."""
    return json.dumps(check_manifest(manifest, file), indent=2, allow_nan=False)
