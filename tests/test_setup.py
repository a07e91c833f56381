"""The Makefile's set-up: the Python check comes first, torch is never a CUDA build unless asked,
``make run`` installs no dev tools."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import install_torch  # noqa: E402

needs_make = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def make(*args: str, **env: str) -> subprocess.CompletedProcess:
    """``make ARGS`` as a newcomer's shell runs it: no PYTHONPATH, PYTHONHOME or active venv
    (Ray, run earlier in the same pytest process, leaves PYTHONPATH pointing into .venv, so
    pip in a "clean" venv would see torch as installed)."""
    leaked = {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"}
    clean = {k: v for k, v in os.environ.items() if k not in leaked}
    return subprocess.run(["make", "--no-print-directory", "-C", str(ROOT), *args],
                          capture_output=True, text=True, env={**clean, **env})  # fmt: skip


@needs_make
def test_python_check_fires_before_anything_is_installed(tmp_path):
    log = tmp_path / "calls.log"
    fake = tmp_path / "python3.10"
    fake.write_text(f'#!/bin/sh\necho "$*" >> {log}\necho "3 10"\n')
    fake.chmod(0o755)
    venv = tmp_path / "venv"
    result = make("run", f"PY={fake}", f"VENV={venv}")
    assert result.returncode != 0
    assert "fedmerge needs Python >= 3.11" in result.stderr and "Python 3.10" in result.stderr
    assert log.read_text().splitlines() == ["-c import sys; print(*sys.version_info[:2])"]
    assert not venv.exists()  # no venv, no pip, no torch


@needs_make
def test_run_installs_runtime_only_and_test_installs_dev(tmp_path):
    run = make("-n", "run", f"VENV={tmp_path / 'v'}").stdout
    test = make("-n", "test", f"VENV={tmp_path / 'v'}").stdout
    assert "pip install --quiet -e .\n" in run and "[dev]" not in run
    assert "-e '.[dev]'" in test and "pytest -q\n" in test
    assert "install_torch.py" in run  # torch comes from the CPU-first installer


def test_cuda_wheels_are_recognized():
    names = ["torch==2.13.0", "nvidia-cublas-cu12==12.8", "triton==3.5", "sympy==1.14",
             "NVIDIA_cudnn_cu12==9.1"]  # fmt: skip
    assert install_torch.cuda_wheels(names) == ["nvidia-cublas-cu12==12.8", "triton==3.5",
                                                "NVIDIA_cudnn_cu12==9.1"]  # fmt: skip
    cmd = install_torch.pip_command("torch==2.13.0", install_torch.CPU_INDEX)
    assert cmd[-3:] == ["--index-url", install_torch.CPU_INDEX, "torch==2.13.0"]


def dry_run_in_clean_venv(tmp_path, index: str) -> subprocess.CompletedProcess:
    """``make torch`` with ``TORCH_DRY_RUN=1`` in a fresh virtual environment."""
    return make("torch", f"VENV={tmp_path / 'venv'}", "TORCH_DRY_RUN=1", f"TORCH_INDEX={index}",
                f"PY={sys.executable}")  # fmt: skip


def selected(result: subprocess.CompletedProcess) -> list[str]:
    line = next(x for x in result.stdout.splitlines() if x.startswith("would install:"))
    return line.split()[2:]


@pytest.mark.slow
@needs_make
def test_cpu_index_install_selects_no_cuda_wheel(tmp_path):
    if not install_torch.reachable(install_torch.CPU_INDEX):
        pytest.skip(f"{install_torch.CPU_INDEX} is not reachable from this machine")
    result = dry_run_in_clean_venv(tmp_path, install_torch.CPU_INDEX)
    assert result.returncode == 0, result.stderr
    names = selected(result)
    assert any(n.startswith("torch==") for n in names)
    assert install_torch.cuda_wheels(names) == []


@pytest.mark.slow
@needs_make
def test_unreachable_cpu_index_falls_back_but_never_to_cuda(tmp_path):
    result = dry_run_in_clean_venv(tmp_path, "http://127.0.0.1:9/whl/cpu")
    assert "is not reachable; trying the package index" in result.stderr
    if result.returncode == 0:  # the package index offers a CPU build (a local wheel, macOS, ...)
        names = selected(result)
        assert any(n.startswith("torch==") for n in names), (names, result.stderr[-2000:])
        assert install_torch.cuda_wheels(names) == []
    else:  # it offers only CUDA: refused, with what to do
        assert "offers a CUDA build" in result.stderr and "GPU=1" in result.stderr


def fake_wheel(folder: Path, name: str, requires: tuple[str, ...] = ()) -> None:
    """A minimal wheel ``name-1.0`` whose metadata requires ``requires`` (enough for pip to
    resolve it in a dry run)."""
    import zipfile

    info = f"{name}-1.0.dist-info"
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n"
    meta += "".join(f"Requires-Dist: {r}\n" for r in requires)
    wheel = "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    with zipfile.ZipFile(folder / f"{name}-1.0-py3-none-any.whl", "w") as z:
        z.writestr(f"{info}/METADATA", meta)
        z.writestr(f"{info}/WHEEL", wheel)
        z.writestr(f"{info}/RECORD", "")


@pytest.mark.parametrize("cuda", [False, True])
def test_package_index_fallback_refuses_a_cuda_build(tmp_path, cuda):
    """The CPU index unreachable, an index whose torch pulls nvidia-* wheels is refused (exit 3,
    saying what to do); one without them is used."""
    fake_wheel(tmp_path, "nvidia_cublas_fake")
    fake_wheel(tmp_path, "faketorch", ("nvidia-cublas-fake",) if cuda else ())
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(tmp_path),
           "PIP_CONSTRAINT": ""}  # fmt: skip
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "install_torch.py"), "--spec", "faketorch==1.0",
         "--index", "http://127.0.0.1:9/whl/cpu", "--dry-run"],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert "is not reachable; trying the package index" in result.stderr
    if cuda:
        assert result.returncode == 3
        assert "offers a CUDA build of faketorch==1.0 (nvidia_cublas_fake==1.0" in result.stderr
        assert "make install GPU=1" in result.stderr
    else:
        assert result.returncode == 0, result.stderr
        assert selected(result) == ["faketorch==1.0"]
