"""Run a merge method key by key, over in-memory state dicts or lazily opened checkpoints.

For each floating-point key the engine reads the reference and every expert's
tensor (one key at a time; a big tensor in row blocks of about
``chunk_elements`` elements, sliced from the memory-mapped files), forms
τ_k = θ_k − θ_ref in float32 (float64 stays float64), calls the method's
kernel on each block and casts the result to the output dtype. A method that
needs a statistic of the whole tensor (TIES's and breadcrumbs' magnitude
thresholds, DARE's L1 norms) gathers it in a streaming pass over the blocks
first (see :mod:`fedmerge.merging.tensorpass`), so the result equals the
whole-tensor computation bit for bit. On the CPU, a method with a fused form
(:mod:`fedmerge.merging.fused`: one C loop per element instead of the
kernel's torch passes, same bits) merges bfloat16/float32 keys that way
wherever its loops could be built (:func:`fedmerge.merging.native.library`).
Integer and bool tensors (counters, masks) are copied from the reference: they
are not parameters one can interpolate. Everything that can be checked without
reading tensor data (method, parameters, weights, keys, shapes, dtypes) is
checked before the output is opened; non-finite values are found while
streaming, and the atomic writer then leaves no output behind.

>>> import torch
>>> base = {"w": torch.zeros(3), "steps": torch.tensor(5)}
>>> experts = [{"w": torch.tensor([1.0, -2.0, 3.0]), "steps": torch.tensor(9)}]
>>> out = merge("task_arithmetic", base, experts, **{"lambda": 0.5})
>>> out["w"].tolist(), int(out["steps"])
([0.5, -1.0, 1.5], 5)
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from fedmerge.checkpoint import (
    DEFAULT_SHARD_BYTES,
    CheckpointWriter,
    TensorSpec,
    check_output,
    open_checkpoint,
)
from fedmerge.codecs.expert import open_expert
from fedmerge.errors import ConfigError, ValidationError
from fedmerge.hf.modeldir import copy_model_files, is_model_dir, writes_directory
from fedmerge.merging import fused as _fused
from fedmerge.merging import methods as _methods  # noqa: F401  (registers the methods)
from fedmerge.merging import native
from fedmerge.merging.dropmask import stream_key
from fedmerge.merging.methods import KeyContext
from fedmerge.merging.registry import Method, get_method
from fedmerge.statedict import StateDict, check_same_specs, is_mergeable
from fedmerge.threads import torch_threads

PROGRESS_MIN_ELEMENTS = 10_000_000  # smaller merges finish before a bar is worth drawing

ProgressFactory = Callable[[float, str], AbstractContextManager[Callable[..., None]]]
"""How a caller draws progress: ``factory(total, description)`` is a context that yields
``tick(advance=n)`` (the CLI passes :func:`fedmerge.report.progress`); None: no bar."""
# elements per expert in one block: K × 1M float32 task vectors (16 MB for K = 4) plus a few
# temporaries of that size; big enough that per-block overhead is small, small enough to stay lean
DEFAULT_CHUNK_ELEMENTS = 1 << 20


class Source(Protocol):
    """Anything with named tensors: a :class:`~fedmerge.checkpoint.Checkpoint` or a state dict.

    A source may also offer ``get_rows(key, start, stop)`` (rows start:stop of
    dim 0); the engine then reads big tensors block by block, else whole.
    """

    def specs(self) -> dict[str, TensorSpec]: ...
    def get(self, key: str) -> torch.Tensor: ...


class StateSource:
    """A :class:`Source` over an in-memory state dict."""

    def __init__(self, state: Mapping[str, torch.Tensor], name: str):
        self.state, self.name = state, name

    def specs(self) -> dict[str, TensorSpec]:
        return {k: TensorSpec.of(v) for k, v in self.state.items()}

    def get(self, key: str) -> torch.Tensor:
        return self.state[key]

    def get_rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        return self.state[key][start:stop]


@dataclass
class MergePlan:
    """A validated merge: method, parameters, weights and inputs; nothing read yet."""

    method: Method
    params: dict[str, Any]
    weights: torch.Tensor  # (K,) float64
    base: Source
    experts: list[Source]
    fishers: list[Source]
    names: list[str]  # base, experts..., fishers... (for messages and metadata)
    in_specs: dict[str, TensorSpec]  # the base's
    out_specs: dict[str, TensorSpec]
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS
    # a method's fused CPU form: True wherever it applies, False never (the torch kernels)
    fused: bool = True

    @property
    def mergeable(self) -> list[str]:
        return [k for k in sorted(self.in_specs) if is_mergeable(self.in_specs[k])]

    @property
    def uses_fused(self) -> bool:
        """Whether to run the method's fused form where it applies: ``fused``, the method has
        one and its loops are built."""
        return bool(self.fused and self.method.fused and native.library())


def plan_merge(
    method: str,
    base: Source,
    experts: Sequence[Source],
    names: Sequence[str],
    weights: Sequence[float] | None = None,
    params: Mapping[str, Any] | None = None,
    fishers: Sequence[Source] = (),
    dtype: torch.dtype | None = None,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> MergePlan:
    """Check method, parameters, weights and every input's keys/shapes/dtypes against the base.

    ``names`` labels base, experts and Fisher inputs in that order (file paths
    for checkpoints) and appears in every error message. Tensors bigger than
    ``chunk_elements`` are merged in row blocks of about that many elements.
    """
    m = get_method(method)
    resolved = m.resolve(params)
    if not experts:
        raise ConfigError(f"method {method!r}: give at least one expert")
    w = _check_weights(m, weights, len(experts))
    if m.needs_fisher and len(fishers) != len(experts):
        raise ConfigError(
            f"method {method!r} needs one Fisher file per expert: "
            f"{len(experts)} expert(s), {len(fishers)} Fisher file(s)"
        )
    if fishers and not m.needs_fisher:
        raise ConfigError(f"method {method!r} takes no Fisher files")
    if dtype is not None and not dtype.is_floating_point:
        raise ConfigError(f"output dtype must be floating point, got {dtype}")
    if chunk_elements < 1:
        raise ConfigError(f"chunk_elements must be >= 1, got {chunk_elements}")
    specs = base.specs()
    for name, src in zip(names[1 : 1 + len(experts)], experts, strict=True):
        check_same_specs(specs, src.specs(), source=name)
    floats = {k: s for k, s in specs.items() if is_mergeable(s)}
    for name, src in zip(names[1 + len(experts) :], fishers, strict=True):
        got = src.specs()
        check_same_specs(floats, {k: got[k] for k in floats if k in got}, name, check_dtype=False)
        bad = [k for k in floats if not got[k].dtype.is_floating_point]
        if bad:
            raise ValidationError(f"{name}: Fisher entry {bad[0]!r} is not floating point")
    out_specs = {
        k: TensorSpec(dtype, s.shape) if dtype is not None and is_mergeable(s) else s
        for k, s in specs.items()
    }
    return MergePlan(m, resolved, w, base, list(experts), list(fishers), list(names), specs,
                     out_specs, chunk_elements)  # fmt: skip


def _check_weights(m: Method, weights: Sequence[float] | None, k: int) -> torch.Tensor:
    if weights is None:
        return torch.ones(k, dtype=torch.float64)
    w = [float(x) for x in weights]
    if len(w) != k:
        raise ConfigError(f"got {len(w)} weight(s) for {k} expert(s)")
    if not all(math.isfinite(x) for x in w):
        raise ConfigError(f"weights must be finite, got {w}")
    if m.nonnegative_weights and (min(w) < 0 or sum(w) <= 0):
        raise ConfigError(f"method {m.name!r} needs weights >= 0 with a positive sum, got {w}")
    return torch.tensor(w, dtype=torch.float64)


Rows = tuple[int, int] | None  # rows start:stop of dim 0, or None for the whole tensor


def blocks(plan: MergePlan, key: str) -> list[Rows]:
    """The row blocks of ``key``: ``plan.chunk_elements`` elements (at least one row) each.

    One block (None) when the tensor fits in one, is 0-d, or some input cannot
    read rows (a :class:`Source` without ``get_rows``).
    """
    shape = plan.out_specs[key].shape
    row = math.prod(shape[1:])
    step = max(1, plan.chunk_elements // max(1, row))
    sources = [plan.base, *plan.experts, *plan.fishers]
    if not shape or step >= shape[0] or not all(hasattr(s, "get_rows") for s in sources):
        return [None]
    return [(r, min(r + step, shape[0])) for r in range(0, shape[0], step)]


def _read(src: Source, key: str, rows: Rows) -> torch.Tensor:
    return src.get(key) if rows is None else src.get_rows(key, *rows)


def _load(
    plan: MergePlan, key: str, rows: Rows = None, check: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """The flattened reference ``(m,)`` and task vectors ``(K, m)`` of a block of ``key``.

    ``check``: raise on non-finite values (the pre-passes skip it: the merge
    pass reads the same values and checks them before anything is written).
    """
    raw = _read(plan.base, key, rows)
    work = torch.float64 if raw.dtype == torch.float64 else torch.float32
    if check:
        _finite(raw, key, plan.names[0])
    base = raw.reshape(-1).to(work)
    tau = torch.empty(len(plan.experts), base.numel(), dtype=work)
    for i, src in enumerate(plan.experts):
        tau[i].copy_(_read(src, key, rows).reshape(-1))
    tau.sub_(base)  # one broadcast subtraction: cheaper than K mixed-dtype ones
    if check and not _all_finite(tau):  # finite base and experts give a finite τ; find the culprit
        for i, src in enumerate(plan.experts):
            _finite(_read(src, key, rows), key, plan.names[1 + i])
        raise ValidationError(f"{key!r}: task vector overflows {work} (θ − θ_ref is too large)")
    return base, tau


def _all_finite(t: torch.Tensor) -> bool:
    """True if ``t`` has no NaN/Inf.

    A NaN or Inf makes the sum non-finite, so a finite sum proves every value
    finite (a sum is ~3× cheaper than min/max, ~30× than isfinite); only a
    non-finite sum (which finite values can reach by overflow) needs min/max,
    which propagate NaN.
    """
    if t.numel() == 0 or math.isfinite(t.sum()):
        return True
    lo, hi = torch.aminmax(t)
    return math.isfinite(lo) and math.isfinite(hi)


def _finite(t: torch.Tensor, key: str, name: str) -> None:
    if not _all_finite(t):
        raise _non_finite(key, name)


def _non_finite(key: str, name: str) -> ValidationError:
    return ValidationError(f"{name}: {key!r} has non-finite values (NaN or Inf)")


def _stream_keys(plan: MergePlan, key: str) -> list[int]:
    """Every expert's DARE stream key for ``key`` (none for methods without a seed)."""
    if "seed" not in plan.params:
        return []
    return [stream_key(plan.params["seed"], i, key) for i in range(len(plan.experts))]


def _fisher(plan: MergePlan, key: str, rows: Rows) -> torch.Tensor | None:
    """The Fisher diagonals ``(K, m)`` of a block of ``key`` (None without Fisher inputs)."""
    if not plan.fishers:
        return None
    first = 1 + len(plan.experts)
    out = []
    for name, src in zip(plan.names[first:], plan.fishers, strict=True):
        f = _read(src, key, rows).reshape(-1).to(torch.float32)
        if not _all_finite(f) or f.numel() and float(f.min()) < 0:
            raise ValidationError(f"{name}: Fisher {key!r} has negative or non-finite values")
        out.append(f)
    return torch.stack(out)


def merge_key(plan: MergePlan, key: str, thresholds: torch.Tensor | None = None) -> torch.Tensor:
    """The merged tensor of one key, in the output dtype and shape, computed block by block.

    A method's ``tensor_pass`` first streams the blocks for the statistics its
    kernel needs of the whole tensor; the kernel then runs on each block.
    """
    spec = plan.out_specs[key]
    if not is_mergeable(spec):
        return plan.base.get(key).clone()  # never alias a caller's tensor
    parts = blocks(plan, key)
    out = _merge_fused(plan, key, parts, thresholds)
    if out is not None:
        return out.reshape(spec.shape)
    numel = math.prod(spec.shape)
    ctx = KeyContext(key, _stream_keys(plan, key), thresholds=thresholds, numel=numel)
    make_pass = plan.method.tensor_pass
    work = torch.float64 if plan.in_specs[key].dtype == torch.float64 else torch.float32
    tensor_pass = make_pass(plan.params, ctx, len(plan.experts), work) if (
        make_pass and len(parts) > 1) else None  # fmt: skip
    p = 0
    while tensor_pass and p < tensor_pass.passes:  # a pass may lower ``passes``
        ctx.start = 0
        for rows in parts:
            tau = _load(plan, key, rows, check=False)[1]
            tensor_pass.observe(p, tau)
            ctx.start += tau.shape[1]
        tensor_pass.end_pass(p)
        p += 1
    out = torch.empty(numel, dtype=spec.dtype)
    start = 0
    for rows in parts:
        base, tau = _load(plan, key, rows)
        ctx.fisher, ctx.start = _fisher(plan, key, rows), start
        merged = plan.method.kernel(base, tau, plan.weights, ctx, plan.params)
        block = out[start : start + merged.numel()].copy_(merged)
        _finite(block, key, f"merged output ({spec.dtype})")
        start += merged.numel()
    return out.reshape(spec.shape)


def _merge_fused(
    plan: MergePlan, key: str, parts: list[Rows], thresholds: torch.Tensor | None
) -> torch.Tensor | None:
    """The merged key ``(numel,)`` by the method's fused form, or None where none applies
    (no form, not CPU, a dtype it does not read or write, parameters it leaves to torch).

    A block with a non-finite value is read again the torch way, which names the
    input (or else the output) as the torch path does.
    """
    form, spec = plan.method.fused, plan.out_specs[key]
    dtypes = (plan.in_specs[key].dtype, spec.dtype)
    if not (plan.uses_fused and all(d in _fused.DTYPES for d in dtypes)):
        return None

    def read(rows: Rows) -> _fused.Block:
        return _read(plan.base, key, rows), [_read(e, key, rows) for e in plan.experts]

    out = torch.empty(math.prod(spec.shape), dtype=spec.dtype)
    call = _fused.FusedCall(read, parts, out, plan.weights, plan.params, thresholds,
                            _stream_keys(plan, key))  # fmt: skip
    try:
        bad = form(call)
    except _fused.NotOnCPU:  # found on the first block read, before anything is written
        return None
    if bad is NotImplemented:
        return None
    if bad is not None:
        _load(plan, key, parts[bad])  # raises for a non-finite input
        raise _non_finite(key, f"merged output ({spec.dtype})")
    return out


def run_plan(
    plan: MergePlan, progress: ProgressFactory | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(key, merged tensor)`` in sorted key order, one key in memory at a time.

    A method with a pre-pass (``ties`` with ``scope: global``) first streams
    its passes over the task vectors, block by block.
    """
    keys = sorted(plan.out_specs)
    prepass = plan.method.prepass(plan.params, len(plan.experts)) if plan.method.prepass else None
    n_passes = prepass.passes if prepass else 0
    with _progress_bar(plan, progress, n_passes) as bar:
        p = 0
        while p < (prepass.passes if prepass else 0):  # a pass may lower ``passes``
            for key in plan.mergeable:
                for rows in blocks(plan, key):
                    prepass.observe(p, _load(plan, key, rows, check=False)[1])
                bar(key)
            prepass.end_pass(p)
            p += 1
        thresholds = prepass.thresholds if prepass else None
        for key in keys:
            yield key, merge_key(plan, key, thresholds)
            bar(key)


@contextmanager
def _progress_bar(
    plan: MergePlan, progress: ProgressFactory | None, prepasses: int
) -> Iterator[Callable[[str], None]]:
    """Yield ``advance(key)``; ``progress`` draws a bar only for big merges on a terminal."""
    numel = {k: max(1, math.prod(s.shape)) for k, s in plan.out_specs.items()}
    size = sum(numel.values())
    total = size + prepasses * sum(numel[k] for k in plan.mergeable)
    if not (progress and size >= PROGRESS_MIN_ELEMENTS and sys.stderr.isatty()):
        yield lambda key: None
        return
    with progress(total, f"merge {plan.method.name}") as tick:
        yield lambda key: tick(advance=numel[key])


# ----------------------------------------------------------------------------- public API


def merge(
    method: str,
    base: Mapping[str, torch.Tensor],
    experts: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float] | None = None,
    fisher: Sequence[Mapping[str, torch.Tensor]] = (),
    dtype: torch.dtype | None = None,
    **params: Any,
) -> StateDict:
    """Merge in-memory state dicts with a registered method (see ``fedmerge merge --list``).

    ``base`` is the reference θ_ref, ``experts`` the fine-tuned θ_k (same keys,
    shapes, dtypes), ``weights`` one per expert (default 1), ``fisher`` one
    diagonal-Fisher state dict per expert (method ``fisher`` only). Keyword
    arguments are the method's parameters (``**{"lambda": 0.5}`` for λ).
    """
    names = ["base", *(f"expert {i}" for i in range(len(experts)))]
    names += [f"fisher {i}" for i in range(len(fisher))]
    plan = plan_merge(
        method,
        StateSource(base, "base"),
        [StateSource(e, n) for e, n in zip(experts, names[1 : 1 + len(experts)], strict=True)],
        names,
        weights,
        params,
        [StateSource(f, n) for f, n in zip(fisher, names[1 + len(experts) :], strict=True)],
        dtype,
    )
    return dict(run_plan(plan))


@dataclass
class MergeReport:
    """What :func:`merge_checkpoints` did."""

    method: str
    params: dict[str, Any]
    weights: list[float]
    keys: int
    merged_keys: int
    elements: int
    files: list[Path]
    seconds: float
    threads: int


def merge_checkpoints(
    method: str,
    base_path: str | os.PathLike,
    expert_paths: Sequence[str | os.PathLike],
    out_path: str | os.PathLike,
    weights: Sequence[float] | None = None,
    params: Mapping[str, Any] | None = None,
    fisher_paths: Sequence[str | os.PathLike] = (),
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: ProgressFactory | None = None,
    threads: int | None = None,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> MergeReport:
    """Merge safetensors checkpoints (files or HF sharded dirs) into ``out_path``, streaming.

    Inputs are read from their memory maps in row blocks of about
    ``chunk_elements`` elements: working memory is a few blocks of K task
    vectors plus one merged tensor in the output dtype, whatever the model
    size. The output is written key by key and appears atomically, sharded
    with an index when larger than ``max_shard_bytes``. ``threads`` torch
    threads do the work (default: the physical cores; recorded in the output's
    metadata). ``progress`` (e.g. :func:`fedmerge.report.progress`) draws a bar when
    the merge is large and stderr is a terminal.
    """
    start = time.perf_counter()
    inputs = [Path(base_path), *map(Path, expert_paths), *map(Path, fisher_paths)]
    out = Path(out_path)
    named = {"base": base_path, **{f"expert {i + 1}": p for i, p in enumerate(expert_paths)}}
    check_output(out, named | {f"fisher {i + 1}": p for i, p in enumerate(fisher_paths)})
    with ExitStack() as stack:
        n_threads = stack.enter_context(torch_threads(threads))
        # experts may be compressed files or LoRA adapter directories, read over the base:
        cks = [stack.enter_context(open_checkpoint(inputs[0]))]
        cks += [stack.enter_context(open_expert(p, base=cks[0])) for p in inputs[1:]]
        k = len(expert_paths)
        plan = plan_merge(
            method, cks[0], cks[1 : 1 + k], [str(p) for p in inputs], weights, params,
            cks[1 + k :], dtype, chunk_elements,
        )  # fmt: skip
        metadata = {
            "format": "pt",  # what transformers expects of a safetensors file
            "fedmerge.method": method,
            "fedmerge.params": json.dumps(plan.params, sort_keys=True),
            "fedmerge.weights": json.dumps(plan.weights.tolist()),
            "fedmerge.threads": str(n_threads),
            "fedmerge.base": _describe(inputs[0]),
            "fedmerge.experts": json.dumps([_describe(p) for p in inputs[1 : 1 + k]]),
        }
        if fisher_paths:
            metadata["fedmerge.fisher"] = json.dumps([_describe(p) for p in inputs[1 + k :]])
        writer = CheckpointWriter(out, plan.out_specs, metadata, max_shard_bytes)
        with writer:
            for key, tensor in run_plan(plan, progress):
                writer.write(key, tensor)
    if is_model_dir(inputs[0]) and writes_directory(out):  # a directory transformers loads
        copy_model_files(inputs[0], out)
    return MergeReport(
        method,
        plan.params,
        plan.weights.tolist(),
        len(plan.out_specs),
        len(plan.mergeable),
        sum(math.prod(s.shape) for s in plan.out_specs.values()),
        [*writer.files, *([writer.index_path] if writer.index_path else [])],
        time.perf_counter() - start,
        n_threads,
    )


def keep_freed_memory() -> bool:
    """Let glibc keep freed memory for reuse instead of returning it to the OS (process-wide).

    Every block allocates tensors of K × ``chunk_elements`` and every key one
    output tensor; by default glibc serves such blocks with fresh ``mmap`` s
    whose first touch costs a page fault per 4 KiB, which made a merge 2-5×
    slower than its arithmetic. The CLI calls this once; the cost is that freed
    memory stays with the process (bounded by the per-key peak). Returns False
    where not glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold, m_mmap_max = -1, -3, -4
    return bool(
        libc.mallopt(m_mmap_max, 0)
        & libc.mallopt(m_mmap_threshold, 1 << 30)
        & libc.mallopt(m_trim_threshold, 2**31 - 1)  # C int: the largest value
    )


def _describe(path: Path) -> str:
    """``name (bytes)`` of an input: enough to tell inputs apart without re-reading them."""
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
    return f"{path.name} ({sum(f.stat().st_size for f in files)} bytes)"
