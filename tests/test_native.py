"""The C loops' build and load (:mod:`fedmerge.merging.native`): built once per source and
machine into the cache and then only loaded, refused inputs the C side would
misread, and a merge that still works (with the torch kernels) where nothing can be built."""

import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from fedmerge.merging import merge, native

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(
    shutil.which(os.environ.get("CC", "cc")) is None, reason="no C compiler to build the loops"
)

SCRIPT = """
import logging, sys, torch
logging.basicConfig(level=logging.WARNING, format="%(message)s")
from fedmerge.merging import merge, native
lib = native.library()
base = {"w": torch.zeros(300, dtype=torch.bfloat16)}
experts = [{"w": torch.linspace(-1, 1, 300).to(torch.bfloat16) * (i + 1)} for i in range(3)]
out = merge("ties", base, experts, density=0.4)["w"]
print(lib is not None, "numba" in sys.modules, out.float().abs().sum().item())
"""


def run(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    full = {**os.environ, "PYTHONPATH": str(REPO), "FEDMERGE_NATIVE_DIR": str(tmp_path), **env}
    return subprocess.run([sys.executable, "-c", SCRIPT], env=full, capture_output=True,
                          text=True, check=True)  # fmt: skip


def test_built_once_into_the_cache_then_loaded_cheaply(tmp_path):
    first = run(tmp_path).stdout.split()
    built = list(tmp_path.glob("loops-*.so"))
    assert first[0] == "True" and len(built) == 1
    mtime = built[0].stat().st_mtime_ns
    again = run(tmp_path).stdout.split()
    assert again[0] == "True" and built[0].stat().st_mtime_ns == mtime  # not rebuilt
    assert again[1] == "False"  # no numba anywhere on the merge path
    assert len(list(tmp_path.iterdir())) == 1  # no temporary file left behind
    assert again[2] == first[2]


@pytest.mark.parametrize("env", [{"FEDMERGE_NATIVE": "0"}, {"CC": "false"},
                                 {"CC": "no-such-compiler"}])  # fmt: skip
def test_without_the_loops_the_torch_kernels_merge_the_same(tmp_path, env):
    """Switched off, a failing compiler, no compiler: one warning that says why (except when
    switched off), no library, and the same merged values as with the loops."""
    with_loops = run(tmp_path / "ok").stdout.split()
    done = run(tmp_path / "off", **env)
    without = done.stdout.split()
    assert without[0] == "False" and without[2] == with_loops[2]
    assert not list((tmp_path / "off").glob("*.so")) if (tmp_path / "off").exists() else True
    if "CC" in env:
        assert "fused merge loops unavailable" in done.stderr
        assert ("failed" if env["CC"] == "false" else "no C compiler") in done.stderr


def test_an_unwritable_cache_builds_into_a_private_directory(tmp_path):
    """A cache directory that cannot be made (here: below a regular file) does not cost the
    loops: they are built into a private temporary directory for the process."""
    (tmp_path / "file").write_text("not a directory")
    private = set(Path(tempfile.gettempdir()).glob("fedmerge-native-*"))
    done = run(tmp_path, FEDMERGE_NATIVE_DIR=str(tmp_path / "file" / "native"))
    assert done.stdout.split()[0] == "True" and "unavailable" not in done.stderr
    assert set(Path(tempfile.gettempdir()).glob("fedmerge-native-*")) == private  # removed


def test_a_library_built_for_other_flags_or_source_is_another_file(monkeypatch, tmp_path):
    """The cache name hashes the source, flags, compiler and CPU: a change builds anew."""
    monkeypatch.setenv("FEDMERGE_NATIVE_DIR", str(tmp_path))
    native.library.cache_clear()
    try:
        assert native.library() is not None
        monkeypatch.setattr(native, "FLAGS", (*native.FLAGS, "-DFEDMERGE_TEST_FLAG"))
        native.library.cache_clear()
        assert native.library() is not None
        assert len(list(tmp_path.glob("loops-*.so"))) == 2
    finally:
        native.library.cache_clear()


def test_inputs_the_c_side_would_misread_are_refused():
    base = np.zeros(8, np.float32)
    ok = (np.zeros(1, np.uint64), 0, (np.int64(-1), np.float32(0)))
    w, out = np.ones(1, np.float32), np.empty(8, np.float32)
    with pytest.raises(TypeError, match="float64"):
        native.mix_block(base.astype(np.float64), (base,), *ok, w, 0.0, 1.0, out)
    with pytest.raises(ValueError, match="equal-length"):
        native.mix_block(base, (base[:4],), *ok, w, 0.0, 1.0, out)
    with pytest.raises(ValueError, match=r"shape \(8,\)"):
        native.mix_block(base, (base,), *ok, w, 0.0, 1.0, out[:4])
    with pytest.raises(TypeError, match="float32"):
        native.mix_block(base, (base,), *ok, w.astype(np.float64), 0.0, 1.0, out)
    with pytest.raises(TypeError, match="contiguous"):
        native.mix_block(base, (np.zeros(16, np.float32)[::2],), *ok, w, 0.0, 1.0, out)
    with pytest.raises(ValueError, match=r"\(1, 65536\)"):
        native.radix_count(base, (base,), np.zeros(1, np.int64), 0, np.zeros((1, 10), np.int64))
    native.mix_block(base, (base + 1,), *ok, w, 0.0, 0.5, out)
    assert out.tolist() == [0.5] * 8


def test_a_non_finite_input_or_output_is_reported_not_hidden():
    base, nan = np.zeros(600, np.float32), np.ones(600, np.float32)
    nan[555] = np.nan
    args = (np.zeros(1, np.uint64), 0, (np.int64(-1), np.float32(0)), np.ones(1, np.float32))
    out = np.empty(600, np.float32)
    assert native.mix_block(base, (nan,), *args, 0.0, 1.0, out) is False
    assert native.mix_block(base, (np.ones(600, np.float32),), *args, 0.0, 1.0, out) is True
    big = np.full(600, 3e38, np.float32)  # finite inputs, an overflowing output
    assert native.mix_block(base, (big,), *args, 0.0, 10.0, out) is False


def test_a_merge_runs_the_loops_by_default_even_a_tiny_one(monkeypatch):
    """No crossover any more: starting the loops costs a process ~nothing."""
    calls, loop = [], native.mix_block
    monkeypatch.setattr(native, "mix_block", lambda *a: calls.append(1) or loop(*a))
    base = {"w": torch.zeros(4)}
    expert = {"w": torch.tensor([1.0, 2.0, 3.0, 4.0])}
    out = merge("task_arithmetic", base, [expert], **{"lambda": 1.0})
    assert out["w"].tolist() == [1.0, 2.0, 3.0, 4.0] and calls == [1]


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 flags")
def test_the_portable_loops_equal_the_avx512_ones(monkeypatch, tmp_path):
    """Built without AVX-512 (``-mno-avx512f``: the plain C every machine runs), the bracket
    counts and the TIES merge equal those of the default build (AVX-512 where the CPU has it)
    bit for bit, bf16 and fp32, with exact ties at the bracket's edges."""
    got = []
    for flags in ((), ("-mno-avx512f",)):
        gen = torch.Generator().manual_seed(3)  # the same inputs for both builds
        monkeypatch.setattr(native, "FLAGS", (*native.FLAGS, *flags))
        monkeypatch.setenv("FEDMERGE_NATIVE_DIR", str(tmp_path))
        native.library.cache_clear()
        runs = []
        for dtype in (torch.bfloat16, torch.float32):
            base = torch.randn(700, 300, generator=torch.Generator().manual_seed(4)).to(dtype)
            experts = [(base.float() + 0.01 * torch.randn(700, 300, generator=gen)).to(dtype)
                       for _ in range(3)]  # fmt: skip
            merged = merge("ties", {"w": base}, [{"w": e} for e in experts], density=0.3)["w"]
            b, ex = native.array(base), tuple(native.array(e) for e in experts)
            edges = np.tile(np.array([[0x3B000000, 0x3C000000, 0x3C800000]], np.int64), (3, 1))
            counts, stored = np.zeros((3, 5), np.int64), np.zeros(3, np.int64)
            buf = np.empty((3, 1 << 18), np.uint32)
            native.bracket_count(b, ex, edges, counts, buf, stored)
            inside = [np.sort(buf[k, : stored[k]]) for k in range(3)]
            runs.append((merged, counts, stored, inside))
        got.append(runs)
    native.library.cache_clear()
    assert len(list(tmp_path.glob("loops-*.so"))) == 2
    for (m1, c1, s1, i1), (m2, c2, s2, i2) in zip(*got, strict=True):
        assert torch.equal(m1.view(torch.uint8), m2.view(torch.uint8))
        assert np.array_equal(c1, c2) and np.array_equal(s1, s2) and (s1 > 0).all()
        assert all(np.array_equal(a, b) for a, b in zip(i1, i2, strict=True))
    c = got[0][0][1]
    assert (c[:, 1:4] > 0).any()  # ties at the edges really occur (bf16)


def test_every_exported_loop_has_a_signature_with_its_argument_count():
    """ctypes trusts ``SIGNATURES``: a missing argument would pass garbage to C. Each
    non-static function of loops.c is declared, with as many arguments as it takes."""
    import re

    source = native.SOURCE.read_text()
    found = {name: (kind, params) for kind, name, params in re.findall(
        r"^(int|void) (\w+)\(([^)]*)\)\s*{", source, flags=re.M)}  # fmt: skip
    assert found.keys() == native.SIGNATURES.keys()
    for name, (kind, params) in found.items():
        args, result = native.SIGNATURES[name]
        assert len(args) == params.count(",") + 1, name
        assert (result is None) == (kind == "void"), name
