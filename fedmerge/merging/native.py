"""The fused merge loops (``loops.c``), compiled on first use and called through ctypes.

:mod:`fedmerge.merging.fused` and DARE's CPU masks (:mod:`~fedmerge.merging.dropmask`)
call these wrappers with flat numpy arrays (bfloat16 as its uint16 bit patterns,
:func:`array`). The first call in a process loads the shared library, compiling it
once per machine and source: ``cc`` (``$CC`` if set) with :data:`FLAGS`, into
``$FEDMERGE_NATIVE_DIR``, else ``$XDG_CACHE_HOME/fedmerge/native``, else
``~/.cache/fedmerge/native``, named by a hash of the source, the flags, the compiler and
the CPU's feature flags (``-march=native`` code runs only where it was built); written
atomically, so concurrent first calls are safe (where that directory cannot be written, a
private temporary one serves the process). Loading a built library costs about a
millisecond, where numba's start cost ~0.5 s of CPU in every process that ran a loop.

Where no library can be built (no compiler, or ``FEDMERGE_NATIVE=0``) :func:`library`
returns None after one warning that says why, and the engine merges with the torch
kernels: the same bits, more time.

No fast-math and ``-ffp-contract=off`` (no FMA contraction): each float operation is
the one the torch kernels do, in their order, so results are bit-identical
(``tests/test_merging_fused.py``).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from functools import cache
from pathlib import Path

import numpy as np
import torch

SOURCE = Path(__file__).with_name("loops.c")
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fno-strict-aliasing", "-std=c11",
         "-fPIC", "-shared")  # fmt: skip
log = logging.getLogger(__name__)

_P, _I64, _I32, _F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_float
_SRC = (_P, _P, _I64, _I64)  # sources (pointer array), their bf16 flags, K, m
SIGNATURES = {
    "keep_mask": ((_P, _I64, _I64, _I64, ctypes.c_uint64, _P), None),
    "mix_block": ((*_SRC, _P, _I64, _I64, _F32, _P, _F32, _F32, _P, _I32), ctypes.c_int),
    "ties_block": ((*_SRC, _P, _I64, _I64, _F32, _P, _P, _I32, _F32, _F32, _P, _I32), ctypes.c_int),
    "radix_count": ((*_SRC, _P, _I32, _P), None),
    "magnitude_runs": ((*_SRC, _P, _I64, _I64, _P), None),
    "bracket_count": ((*_SRC, _P, _P, _P, _I64, _P), None),
}


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return ""


def _cache_dir() -> Path:
    explicit = os.environ.get("FEDMERGE_NATIVE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fedmerge" / "native"


def _writable(target: Path) -> Path:
    """``target``, or its name in a private temporary directory where its own directory cannot
    be made or written (a read-only home): the loops are then built once per process."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        if os.access(target.parent, os.W_OK):
            return target
    except OSError:
        pass
    return Path(tempfile.mkdtemp(prefix="fedmerge-native-")) / target.name


def _build(compiler: str, target: Path) -> None:
    """Compile :data:`SOURCE` to ``target`` atomically (a private temporary name, then rename)."""
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run([compiler, *FLAGS, "-o", tmp, str(SOURCE)],
                              capture_output=True, text=True, timeout=120)  # fmt: skip
        if done.returncode:
            raise OSError(f"{compiler} failed: {done.stderr.strip()[-500:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@cache
def library() -> ctypes.CDLL | None:
    """The loaded loops, built first if needed; None (after one warning) where they cannot be."""
    if os.environ.get("FEDMERGE_NATIVE", "1") == "0":
        return None
    compiler = shutil.which(os.environ.get("CC", "cc"))
    try:
        if compiler is None:
            raise OSError("no C compiler (cc, or $CC) on PATH")
        parts = (SOURCE.read_bytes(), " ".join(FLAGS), compiler, _cpu_flags())
        key = b"\0".join(p if isinstance(p, bytes) else p.encode() for p in parts)
        digest = hashlib.sha256(key).hexdigest()[:16]
        target = _cache_dir() / f"loops-{digest}.so"
        if not target.exists():
            target = _writable(target)
            _build(compiler, target)
        lib = ctypes.CDLL(str(target))
        if target.parent != _cache_dir():  # a private build: mapped now, the file can go
            shutil.rmtree(target.parent, ignore_errors=True)
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("fused merge loops unavailable (%s): merging with the torch kernels", e)
        return None
    for name, (args, result) in SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, result
    return lib


def array(t: torch.Tensor) -> np.ndarray:
    """A flat numpy view of a contiguous CPU tensor (bfloat16 as its uint16 bit patterns)."""
    flat = t.detach().reshape(-1)
    if flat.dtype == torch.bfloat16:
        return flat.view(torch.int16).numpy().view(np.uint16)
    return flat.numpy()


def _ptr(a: np.ndarray, dtype: type | None = None, shape: tuple[int, ...] | None = None) -> int:
    """``a``'s data address, after checking what the C side assumes of it (the loops index
    raw memory: a wrong dtype or shape must fail here)."""
    if not a.flags.c_contiguous or (dtype is not None and a.dtype != dtype):
        raise TypeError(f"the fused loops need a contiguous {dtype or 'array'}, not {a.dtype}")
    if shape is not None and a.shape != shape:
        raise ValueError(f"the fused loops need shape {shape}, not {a.shape}")
    return a.__array_interface__["data"][0]


def _is_bf16(a: np.ndarray) -> int:
    if a.dtype == np.uint16:
        return 1
    if a.dtype == np.float32:
        return 0
    raise TypeError(f"the fused loops read bfloat16 (uint16) or float32, not {a.dtype}")


def _sources(base: np.ndarray, experts: Sequence[np.ndarray]) -> tuple:
    """The ``(src, bf16, K, m)`` arguments: θ_ref then the experts, all of ``base``'s length."""
    arrays = (base, *experts)
    if any(a.shape != base.shape for a in experts):
        raise ValueError("the fused loops need equal-length blocks")
    src = (ctypes.c_void_p * len(arrays))(*[_ptr(a) for a in arrays])
    flags = (ctypes.c_int32 * len(arrays))(*[_is_bf16(a) for a in arrays])
    return src, flags, len(experts), base.shape[0]


def _lib() -> ctypes.CDLL:
    lib = library()
    if lib is None:
        raise RuntimeError("the fused merge loops are not built (see the warning above)")
    return lib


def keep_mask(keys: np.ndarray, start: int, m: int, limit: int) -> np.ndarray:
    """DARE's masks ``(K, m)`` (bool) of entries start..start+m−1, ``keys`` ``(K,)`` uint64."""
    keys = np.ascontiguousarray(keys, np.uint64)
    out = np.empty((keys.shape[0], m), np.bool_)
    _lib().keep_mask(_ptr(keys, np.uint64), keys.shape[0], start, m, limit, _ptr(out))
    return out


def mix_block(base, experts, keys, first, drop, w, total, lam, out) -> bool:
    """θ_ref + λ·(Σ_k w_k τ'_k [÷ ``total`` when nonzero]) into ``out`` ``(m,)``; τ' = τ after
    DARE's ``drop`` = (keep limit, divisor), limit < 0: none. False if a value is not finite."""
    limit, density = drop
    k, m = len(experts), base.shape[0]
    ok = _lib().mix_block(*_sources(base, experts), _ptr(keys, np.uint64, (k,)), first, limit,
                          density, _ptr(w, np.float32, (k,)), total, lam, _ptr(out, None, (m,)),
                          _is_bf16(out))  # fmt: skip
    return bool(ok)


def ties_block(base, experts, keys, first, drop, thr, w, normalize, low, lam, out) -> bool:
    """TIES on one block into ``out`` ``(m,)``: DARE's ``drop`` (as :func:`mix_block`), trim
    at ``thr`` ``(K,)`` float32, weigh by ``w`` ``(K,)``, elect, disjoint merge (÷ the agreeing
    weights, at least ``low``, when ``normalize``), θ_ref + ``lam``·merged. False if a value
    is not finite."""
    limit, density = drop
    k, m = len(experts), base.shape[0]
    ok = _lib().ties_block(*_sources(base, experts), _ptr(keys, np.uint64, (k,)), first, limit,
                           density, _ptr(thr, np.float32, (k,)), _ptr(w, np.float32, (k,)),
                           normalize, low, lam, _ptr(out, None, (m,)), _is_bf16(out))  # fmt: skip
    if ok < 0:
        raise MemoryError("ties_block: no memory for a tile")
    return bool(ok)


def radix_count(base, experts, prefix: np.ndarray, level: int, hist: np.ndarray) -> None:
    """Add one 16-bit digit of |τ_k|'s float32 bit patterns to ``hist`` ``(K, 2^16)`` int64."""
    k = len(experts)
    _lib().radix_count(*_sources(base, experts), _ptr(prefix, np.int64, (k,)), level,
                       _ptr(hist, np.int64, (k, 1 << 16)))  # fmt: skip


def magnitude_runs(base, experts, starts: np.ndarray, run: int, out: np.ndarray) -> None:
    """The float32 bit patterns of |τ_k| over the runs ``[starts[r], starts[r] + run)`` (each
    within the block) into ``out`` ``(K, len(starts) · run)`` uint32."""
    m = base.shape[0]
    if len(starts) and (starts.min() < 0 or starts.max() + run > m):
        raise ValueError(f"magnitude_runs: runs of {run} from {starts} leave the block of {m}")
    shape = (len(experts), len(starts) * run)
    _lib().magnitude_runs(*_sources(base, experts), _ptr(starts, np.int64), len(starts), run,
                          _ptr(out, np.uint32, shape))  # fmt: skip


def bracket_count(base, experts, edges, counts, buf, stored) -> None:
    """Counts below lo, at lo, c and hi and inside (lo, c) of the bracket edges ``(K, 3)`` into
    ``counts`` ``(K, 5)``, the values inside (lo, hi) other than c into ``buf`` ``(K, cap)``
    (``stored`` ``(K,)``: how many each expert had; above cap where not all were kept)."""
    k = len(experts)
    if buf.ndim != 2 or buf.shape[0] != k:
        raise ValueError(f"bracket_count: buf must be ({k}, cap), not {buf.shape}")
    _lib().bracket_count(*_sources(base, experts), _ptr(edges, np.int64, (k, 3)),
                         _ptr(counts, np.int64, (k, 5)), _ptr(buf, np.uint32), buf.shape[1],
                         _ptr(stored, np.int64, (k,)))  # fmt: skip
