"""PEFT LoRA adapters read as experts: θ = θ_base + ΔW, one key at a time.

An adapter directory holds ``adapter_config.json`` and ``adapter_model.safetensors``
whose keys are ``base_model.model.<module>.lora_A.weight`` (A: ``(r, in)``),
``...lora_B.weight`` (B: ``(out, r)``), optionally ``...lora_B.bias`` (``(out,)``,
``lora_bias``), ``...lora_embedding_A`` / ``...lora_embedding_B`` for embeddings,
and full tensors ``base_model.model.<param>`` for ``modules_to_save``, trained
biases and saved embedding layers (``<module>.base_layer.weight``, the value the
LoRA delta is added to). Per adapted weight, exactly as ``peft``'s ``merge_and_unload``::

    ΔW = transpose(B @ A) · scaling       scaling = lora_alpha / r  (lora_alpha / √r with rsLoRA)

where ``r`` and ``lora_alpha`` come from ``rank_pattern`` / ``alpha_pattern`` when a
pattern matches the module, and the product is transposed for ``fan_in_fan_out``
layers (GPT-2's ``Conv1D`` stores ``(in, out)``) and for embeddings. Full tensors
replace the base's value (their task vector is dense); ΔW, if any, adds to them. Biases get
``Δb = lora_B.bias · scaling``.

:class:`AdapterCheckpoint` is a :class:`~fedmerge.checkpoint.Checkpoint` with the
base's keys, shapes and dtypes: everything that reads checkpoints (``fedmerge
merge``, the continual store, the Python API) accepts an adapter unchanged, and
never holds more than one dense tensor of it. ``get_rows`` computes a row block
of ΔW from the matching rows of B (or columns of A), for chunked readers.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from fedmerge.checkpoint import Checkpoint, TensorSpec
from fedmerge.errors import CheckpointError, ValidationError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
MAX_CONFIG_BYTES = 10_000_000
# LoRA options whose effect is not a per-weight ΔW = B @ A (truthy value -> refused)
UNSUPPORTED = {
    "use_dora": "DoRA rescales columns by a learned magnitude",
    "layer_replication": "layer replication adds layers the base does not have",
    "trainable_token_indices": "trainable tokens are stored as sparse row deltas",
    "target_parameters": "LoRA on raw parameters (MoE experts) is not read yet",
    "alora_invocation_tokens": "activated LoRA only acts after its invocation tokens",
}
_LORA = re.compile(r"(.+)\.(lora_A\.weight|lora_B\.weight|lora_B\.bias|lora_embedding_[AB])")


def is_adapter_dir(path: str | os.PathLike) -> bool:
    """True if ``path`` is a directory holding a PEFT ``adapter_config.json``."""
    p = Path(path)
    return p.is_dir() and (p / CONFIG_NAME).is_file()


@dataclass(frozen=True)
class LoraConfig:
    """The fields of ``adapter_config.json`` that define ΔW."""

    r: int
    lora_alpha: float
    use_rslora: bool
    fan_in_fan_out: bool
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    base_model: str | None

    def rank_alpha(self, module: str) -> tuple[int, float]:
        """``(r, alpha)`` of ``module`` (its name in the model), patterns applied as peft does."""
        return (
            int(self.rank_pattern.get(_pattern_key(self.rank_pattern, module), self.r)),
            float(
                self.alpha_pattern.get(_pattern_key(self.alpha_pattern, module), self.lora_alpha)
            ),
        )

    def scaling(self, module: str) -> float:
        r, alpha = self.rank_alpha(module)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


def _pattern_key(patterns: dict, module: str) -> str:
    """peft's ``get_pattern_key``: the first pattern matching a dotted suffix of ``module``."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return module


def read_lora_config(folder: Path) -> LoraConfig:
    """Parse and check ``folder/adapter_config.json`` (LoRA only; clear error otherwise)."""
    file = folder / CONFIG_NAME
    try:
        if file.stat().st_size > MAX_CONFIG_BYTES:
            raise CheckpointError(f"{file}: larger than {MAX_CONFIG_BYTES} bytes")
        raw = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{file}: no such file") from None
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise CheckpointError(f"{file}: not valid JSON ({str(exc)[:80]})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{file}: must hold a JSON object")
    kind = raw.get("peft_type")
    if kind != "LORA":
        raise ValidationError(
            f"{file}: peft_type {kind!r} is not supported; only LoRA adapters ('LORA') are "
            "task vectors W + B@A (prefix/prompt tuning, IA3, ... are not)"
        )
    for field, why in UNSUPPORTED.items():
        if raw.get(field):
            raise ValidationError(f"{file}: {field!r} is set; not supported ({why})")
    try:
        cfg = LoraConfig(
            r=_positive(raw.get("r", 8), "r"),
            lora_alpha=float(raw.get("lora_alpha", 8)),
            use_rslora=bool(raw.get("use_rslora", False)),
            fan_in_fan_out=bool(raw.get("fan_in_fan_out", False)),
            rank_pattern={str(k): _positive(v, f"rank_pattern[{k!r}]")
                          for k, v in (raw.get("rank_pattern") or {}).items()},
            alpha_pattern={str(k): float(v) for k, v in (raw.get("alpha_pattern") or {}).items()},
            base_model=raw.get("base_model_name_or_path"),
        )  # fmt: skip
    except (TypeError, ValueError, AttributeError) as exc:
        raise ValidationError(f"{file}: bad LoRA field ({exc})") from None
    return cfg


def _positive(v: object, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ValueError(f"{name} must be a positive integer, got {v!r}")
    return v


@dataclass(frozen=True)
class LoraFactor:
    """One adapted base weight: ΔW = transpose(B @ A) · scaling (transposed if ``transpose``)."""

    a_key: str  # A: (r, in) in the adapter file
    b_key: str  # B: (out, r)
    scaling: float
    transpose: bool


class AdapterCheckpoint(Checkpoint):
    """A LoRA adapter over a base checkpoint, read lazily as θ = θ_base + ΔW.

    ``base`` is an open :class:`Checkpoint` (kept open by the caller) or a path
    (opened here, closed by :meth:`close`). Keys, shapes and dtypes are the base's.
    """

    def __init__(self, path: str | os.PathLike, base: Checkpoint | str | os.PathLike | None):
        self.path = Path(path)
        self.config = read_lora_config(self.path)
        weights = self.path / WEIGHTS_NAME
        if not weights.is_file():
            pickled = " (adapter_model.bin is pickle; convert it to safetensors)" if (
                self.path / "adapter_model.bin").exists() else ""  # fmt: skip
            raise CheckpointError(f"{weights}: no such file{pickled}")
        self._own_base = not isinstance(base, Checkpoint)
        self.base = (
            base if isinstance(base, Checkpoint) else _open_base(self.path, self.config, base)
        )
        self.file = Checkpoint(weights)
        self._specs = self.base.specs()
        self.factors: dict[str, LoraFactor] = {}  # base key -> its LoRA factors
        self.bias_deltas: dict[str, tuple[str, float]] = {}  # base key -> (lora_B.bias key, scale)
        self.full: dict[str, str] = {}  # base key -> adapter key of a full replacement
        try:
            self._resolve()
        except Exception:
            self.close()
            raise
        self.metadata = {**self.base.metadata, "fedmerge.adapter": str(self.path)}

    # ------------------------------------------------------------------ reading the file

    def _resolve(self) -> None:
        lora: dict[str, dict[str, str]] = {}  # module path -> {part: adapter key}
        full: dict[str, str] = {}  # param path -> adapter key
        for key in sorted(self.file.specs()):
            if not key.startswith(PREFIX):
                raise ValidationError(
                    f"{self.file.path}: key {key!r} does not start with {PREFIX!r}"
                )
            m = _LORA.fullmatch(key[len(PREFIX) :])
            if m:
                lora.setdefault(m.group(1), {})[m.group(2)] = key
            elif ".lora_" in key or "lora_magnitude_vector" in key:
                raise ValidationError(
                    f"{self.file.path}: {key!r} is not a LoRA A/B factor fedmerge reads"
                )
            else:  # a base layer's own value (saved embeddings) is the value under the LoRA
                full[key[len(PREFIX) :].replace(".base_layer.", ".")] = key
        if not lora and not full:
            raise ValidationError(f"{self.file.path}: the adapter holds no tensors")
        paths = {f"{mod}.weight": parts for mod, parts in lora.items()}
        rule = _prefix_rule([*paths, *full], set(self._specs), self.file.path, self.base.path)
        for path, parts in paths.items():
            self._add_module(path[: -len(".weight")], rule(path), parts)
        for path, key in full.items():
            self._add_full(rule(path), key)

    def _add_module(self, module: str, target: str, parts: dict[str, str]) -> None:
        file = self.file.path
        emb = "lora_embedding_A" in parts or "lora_embedding_B" in parts
        a_key = parts.get("lora_embedding_A" if emb else "lora_A.weight")
        b_key = parts.get("lora_embedding_B" if emb else "lora_B.weight")
        if a_key is None or b_key is None:
            raise ValidationError(
                f"{file}: {(a_key or b_key)!r} has no matching {'B' if a_key else 'A'} factor"
            )
        a, b = self.file.shape(a_key), self.file.shape(b_key)
        if len(a) != 2 or len(b) != 2:
            raise ValidationError(
                f"{file}: {a_key!r} is {len(a)}-D; only 2-D LoRA (Linear, Conv1D, Embedding) "
                "is supported"
            )
        r, _ = self.config.rank_alpha(module)  # patterns match the adapter's own module name
        if a[0] != r or b[1] != r:
            raise ValidationError(
                f"{file}: {a_key!r} {list(a)} and {b_key!r} {list(b)} do not have rank {r} "
                "(from adapter_config.json)"
            )
        shape = self._specs[target].shape
        product = (b[0], a[1])
        if emb:
            transpose = True
        elif product[0] != product[1]:
            transpose = product != shape
        else:
            transpose = self.config.fan_in_fan_out
        if (product[::-1] if transpose else product) != shape:
            how = "transposed (embedding)" if emb else "as is or transposed"
            raise ValidationError(
                f"{file}: {b_key!r} @ {a_key!r} gives {list(product)}, which does not fit "
                f"base {target!r} {list(shape)} {how}"
            )
        self.factors[target] = LoraFactor(a_key, b_key, self.config.scaling(module), transpose)
        if "lora_B.bias" in parts:
            bias = target[: -len("weight")] + "bias"
            bkey = parts["lora_B.bias"]
            if bias not in self._specs or self._specs[bias].shape != self.file.shape(bkey):
                raise ValidationError(
                    f"{file}: {bkey!r} {list(self.file.shape(bkey))} matches no bias "
                    f"of the base (looked for {bias!r})"
                )
            self.bias_deltas[bias] = (bkey, self.config.scaling(module))

    def _add_full(self, target: str, key: str) -> None:
        have, want = self.file.shape(key), self._specs[target].shape
        if have != want:
            raise ValidationError(
                f"{self.file.path}: {key!r} has shape {list(have)}, base {target!r}: {list(want)}"
            )
        self.full[target] = key

    # ------------------------------------------------------------------ tensors

    def delta_rows(self, key: str, start: int, stop: int) -> torch.Tensor | None:
        """Rows ``[start, stop)`` of ΔW (or Δb) of base ``key`` in float32; None if not adapted."""
        if key in self.factors:
            f = self.factors[key]
            a, b = self.file.get(f.a_key).float(), self.file.get(f.b_key).float()
            block = (b @ a[:, start:stop]).T if f.transpose else b[start:stop] @ a
            return block * f.scaling
        if key in self.bias_deltas:
            bkey, scaling = self.bias_deltas[key]
            return self.file.get(bkey).float()[start:stop] * scaling
        return None

    def get(self, key: str) -> torch.Tensor:
        """θ[key] = θ_base[key] + ΔW (or the adapter's full tensor), in the base's dtype."""
        spec = self._spec_of(key)
        return self.get_rows(key, 0, spec.shape[0] if spec.shape else 1)

    def get_rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` of θ[key] (dim 0; a 0-D tensor is returned whole)."""
        spec = self._spec_of(key)
        if key in self.full:
            t = self.file.get(self.full[key])
            base = (t[start:stop] if spec.shape else t).to(spec.dtype)
        else:
            base = self.base.get_rows(key, start, stop) if spec.shape else self.base.get(key)
        delta = self.delta_rows(key, start, stop)
        if delta is None:
            return base
        work = torch.float64 if spec.dtype == torch.float64 else torch.float32
        return (base.to(work) + delta.to(work)).to(spec.dtype)

    def _spec_of(self, key: str) -> TensorSpec:
        if key not in self._specs:
            raise ValidationError(f"{self.path}: no tensor named {key!r}")
        return self._specs[key]

    def adapted(self) -> list[str]:
        """Base keys this adapter changes."""
        return sorted({*self.factors, *self.bias_deltas, *self.full})

    def close(self) -> None:
        self.file.close()
        if self._own_base:
            self.base.close()

    def __repr__(self) -> str:
        n = len(self.factors)
        return f"AdapterCheckpoint({str(self.path)!r}, {n} LoRA modules over {self.base!r})"


def _open_base(adapter: Path, cfg: LoraConfig, base: str | os.PathLike | None) -> Checkpoint:
    if base is None:
        local = Path(cfg.base_model) if cfg.base_model else None
        if local is None or not local.is_dir():
            raise CheckpointError(
                f"{adapter}: a LoRA adapter is a delta; give its base model "
                f"(--base DIR, or base= in Python); base_model_name_or_path={cfg.base_model!r} "
                "is not a local directory"
            )
        base = local
    return Checkpoint(base)


def _prefix_rule(paths: list[str], base_keys: set[str], file: Path, base: Path):
    """The one way to map adapter parameter paths onto base keys: strip a prefix, add another.

    Covers a bare base under a ``*ForCausalLM`` adapter (strip ``model.``) and the
    reverse (add ``transformer.``). Errors when no rule maps every path, or when
    two different rules both do (ambiguous).
    """
    first = paths[0]
    strips = ["", *([first.split(".", 1)[0] + "."] if "." in first else [])]
    rules = set()
    for s in strips:
        tail = first[len(s) :]
        for k in base_keys:
            if k == tail or k.endswith("." + tail):
                rules.add((s, k[: len(k) - len(tail)]))
    good = [
        (s, p)
        for s, p in sorted(rules)
        if all(x.startswith(s) and p + x[len(s) :] in base_keys for x in paths)
    ]
    if not good:
        best = max(
            sorted(rules) or [("", "")],
            key=lambda sp: sum(
                sp[1] + x[len(sp[0]) :] in base_keys for x in paths if x.startswith(sp[0])
            ),
        )
        s, p = best
        bad = next(x for x in paths if not (x.startswith(s) and p + x[len(s) :] in base_keys))
        raise ValidationError(
            f"{file}: adapter key {PREFIX + bad!r} matches no tensor of the base {base}"
        )
    outcomes = {tuple(p + x[len(s) :] for x in paths): (s, p) for s, p in good}
    if len(outcomes) > 1:
        shown = " or ".join(f"{PREFIX + first!r} -> {m[0]!r}" for m in list(outcomes)[:2])
        raise ValidationError(f"{file}: ambiguous mapping onto the base {base}: {shown}")
    s, p = good[0]
    return lambda x: p + x[len(s) :]
