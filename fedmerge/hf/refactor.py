"""Write a merged model back as a PEFT LoRA adapter, re-factorized by truncated SVD.

For every 2-D weight that differs from the base and belongs to a ``Linear``,
``Conv1D`` or ``Embedding`` layer (types read from the base's model class), the
difference D (``(out, in)``; transposed for Conv1D and embeddings, as peft
stores them) is factorized as D ≈ B @ A with B = U_r·√S_r ``(out, r)`` and
A = √S_r·V_rᵀ ``(r, in)``, r = min(rank, out, in), and ``lora_alpha = r`` so
that scaling is 1. The SVD is exact (``torch.linalg.svd`` in float64) or
randomized (``torch.svd_lowrank``). The relative Frobenius error
‖D − B A‖_F / ‖D‖_F of every module is measured and stored in the adapter's
safetensors metadata (``fedmerge.svd_errors``, JSON). Changed biases of
adapted layers become ``lora_B.bias`` (``lora_bias``); any other changed
tensor makes its module a ``modules_to_save`` entry, stored in full.

Reads the merge one key at a time and holds only the factors (the adapter's
own size) and the changed small tensors.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fedmerge.atomic import atomic_write_text
from fedmerge.checkpoint import Checkpoint, save_state_dict
from fedmerge.errors import ConfigError, ValidationError
from fedmerge.hf.adapter import CONFIG_NAME, PREFIX, WEIGHTS_NAME
from fedmerge.hf.modeldir import module_kinds

SVD_METHODS = ("exact", "lowrank")


@dataclass
class AdapterReport:
    """What :func:`write_adapter` wrote: one row per factorized module."""

    rows: list[tuple[str, tuple[int, int], int, float]] = field(default_factory=list)
    # (module, ΔW shape as stored in the base, rank, relative Frobenius error)
    modules_to_save: list[str] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)


def factorize(
    d: torch.Tensor, rank: int, svd: str = "exact", niter: int = 4, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(B (out, r), A (r, in), ‖d − B A‖_F / ‖d‖_F)`` with r = min(rank, out, in), float32."""
    if svd not in SVD_METHODS:
        raise ConfigError(f"svd must be one of {SVD_METHODS}, got {svd!r}")
    r = min(rank, *d.shape)
    m = d.double()
    if svd == "exact":
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        u, s, vh = u[:, :r], s[:r], vh[:r]
    else:
        torch.manual_seed(seed)
        u, s, v = torch.svd_lowrank(m, q=min(r + 8, *d.shape), niter=niter)
        u, s, vh = u[:, :r], s[:r], v[:, :r].T
    root = s.sqrt()
    b, a = u * root, root[:, None] * vh
    norm = float(m.norm())
    err = float((m - b @ a).norm()) / norm if norm else 0.0
    return b.float().contiguous(), a.float().contiguous(), err


def write_adapter(
    out: str | os.PathLike,
    base: Checkpoint,
    merged: Iterable[tuple[str, torch.Tensor]],
    model_dir: str | os.PathLike,
    rank: int,
    svd: str = "exact",
    base_name: str | None = None,
    metadata: Mapping[str, str] | None = None,
) -> AdapterReport:
    """Write ``merged − base`` as a PEFT LoRA adapter directory ``out`` (atomic files).

    ``merged`` yields ``(key, θ[key])`` over the base's keys; ``model_dir`` holds
    the base's ``config.json`` (layer types); ``base_name`` goes into
    ``base_model_name_or_path`` (default ``model_dir``).
    """
    if rank < 1:
        raise ConfigError(f"--rank must be a positive integer, got {rank}")
    kinds = module_kinds(model_dir)
    report, tensors, ranks = AdapterReport(), {}, {}
    changed: dict[str, torch.Tensor] = {}  # key -> Δ of tensors that are not LoRA weights
    for key, theta in merged:
        if not theta.dtype.is_floating_point:
            continue
        ref = base.get(key)
        delta = theta.double() - ref.double()
        if not bool(delta.any()):
            continue
        module = key.rsplit(".", 1)[0]
        kind = kinds.get(module, "other")
        if not (key.endswith(".weight") and delta.ndim == 2 and kind != "other"):
            changed[key] = delta
            continue
        b, a, err = factorize(delta if kind == "linear" else delta.T, rank, svd)
        a_name, b_name = ("lora_embedding_A", "lora_embedding_B") if kind == "embedding" else (
            "lora_A.weight", "lora_B.weight")  # fmt: skip
        tensors[f"{PREFIX}{module}.{a_name}"] = a
        tensors[f"{PREFIX}{module}.{b_name}"] = b
        ranks[module] = a.shape[0]
        report.rows.append((module, tuple(delta.shape), a.shape[0], err))
    lora_bias = _place_changed(changed, ranks, base, kinds, tensors, report)
    errors = {m: e for m, _, _, e in report.rows}
    meta = {"format": "pt", "fedmerge.svd": svd, "fedmerge.rank": str(rank),
            "fedmerge.svd_errors": json.dumps(errors), **dict(metadata or {})}  # fmt: skip
    out = Path(out)
    save_state_dict(tensors, out / WEIGHTS_NAME, meta)
    config = _config(ranks, rank, kinds, lora_bias, report.modules_to_save,
                     base_name or str(model_dir))  # fmt: skip
    atomic_write_text(out / CONFIG_NAME, json.dumps(config, indent=2))
    report.files = [out / CONFIG_NAME, out / WEIGHTS_NAME]
    return report


def _place_changed(changed, ranks, base, kinds, tensors, report) -> bool:
    """Biases of LoRA layers -> ``lora_B.bias``; other changes -> ``modules_to_save``.

    Returns whether ``lora_bias`` is needed (then every LoRA layer gets a bias entry).
    """
    biases = {k[: -len(".bias")]: d for k, d in changed.items()
              if k.endswith(".bias") and k[: -len(".bias")] in ranks}  # fmt: skip
    for module in sorted({k.rsplit(".", 1)[0] for k in changed} - set(biases)):
        inner = [m for m in ranks if m.startswith(module + ".") or m == module]
        if inner or kinds.get(module) is None:
            raise ValidationError(
                f"{module!r}: its change cannot be written as LoRA + modules_to_save "
                f"(holds LoRA layer {inner[0]!r})"
                if inner
                else f"{module!r} is not a module"
            )
        report.modules_to_save.append(module)
        for key in (k for k in sorted(base.specs()) if k.startswith(module + ".")):
            value = base.get(key)
            if key in changed:
                value = (value.double() + changed[key]).to(value.dtype)
            tensors[PREFIX + key] = value
    if not biases:
        return False
    for module in ranks:
        if f"{module}.bias" not in base:
            raise ValidationError(
                f"{module!r} has no bias, but other LoRA layers' biases changed (lora_bias)"
            )
        delta = biases.get(module)
        bias = delta.float() if delta is not None else torch.zeros(base.shape(f"{module}.bias"))
        tensors[f"{PREFIX}{module}.lora_B.bias"] = bias
    return True


def _config(ranks, rank, kinds, lora_bias, modules_to_save, base_name) -> dict:
    """adapter_config.json of a plain LoRA with scaling 1 on every module."""
    if not ranks and not modules_to_save:
        raise ValidationError("the merge equals the base: there is no adapter to write")
    pattern = {re.escape(m): r for m, r in ranks.items() if r != rank}
    fan_in_fan_out = bool(ranks) and all(kinds[m] == "conv1d" for m in ranks)
    return {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_name,
        "r": rank, "lora_alpha": rank, "rank_pattern": pattern, "alpha_pattern": dict(pattern),
        "target_modules": sorted(ranks), "modules_to_save": modules_to_save or None,
        "fan_in_fan_out": fan_in_fan_out, "use_rslora": False, "use_dora": False,
        "bias": "none", "lora_bias": lora_bias, "lora_dropout": 0.0,
        "init_lora_weights": True, "inference_mode": True,
    }  # fmt: skip
