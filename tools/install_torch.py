"""Install torch into this interpreter's environment, the CPU build unless asked otherwise.

The Makefile runs it with the new virtual environment's Python::

    python tools/install_torch.py [--gpu] [--dry-run] [--index URL] [--spec torch==2.13.0]

1. ``--gpu``: ``pip install SPEC`` from the package index (its default build: CUDA on Linux).
2. otherwise, when ``--index`` (PyTorch's CPU wheel index) answers:
   ``pip install --index-url URL SPEC``, which only holds CPU builds;
3. otherwise the package index, but only after a dry run shows it selects no ``nvidia-*`` or
   ``triton`` wheel (PyPI's Linux torch is the CUDA build: then it stops and says what to do).

``--dry-run`` resolves without installing and prints one ``would install: NAME==VERSION ...``
line (the test suite checks that line for CUDA wheels). Exit status 3: a CUDA build would have
been installed without ``--gpu``.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import urllib.request

CPU_INDEX = "https://download.pytorch.org/whl/cpu"
CUDA_PREFIXES = ("nvidia-", "triton", "pytorch-triton")


def reachable(url: str, timeout: float = 10.0) -> bool:
    """Whether ``url`` answers an HTTP request within ``timeout`` seconds."""
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/", timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def pip_command(spec: str, index: str | None) -> list[str]:
    """The ``pip install`` command line: from ``index`` only, or the configured package index."""
    cmd = [sys.executable, "-m", "pip", "install", "--quiet"]
    return cmd + (["--index-url", index] if index else []) + [spec]


def selection(cmd: list[str]) -> list[str]:
    """``NAME==VERSION`` of every distribution ``cmd`` would install (a pip dry run)."""
    out = subprocess.run([*cmd, "--dry-run", "--report", "-"], check=True, text=True,
                         stdout=subprocess.PIPE).stdout  # fmt: skip
    report = json.loads(out[out.index("{") :])
    return [f"{d['metadata']['name']}=={d['metadata']['version']}" for d in report["install"]]


def cuda_wheels(names: list[str]) -> list[str]:
    """The entries of ``names`` that belong to a CUDA build (nvidia-* libraries, triton),
    compared by normalized name (``nvidia_cublas`` is ``nvidia-cublas``)."""
    return [n for n in names if re.sub(r"[-_.]+", "-", n.lower()).startswith(CUDA_PREFIXES)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default="torch==2.13.0", help="requirement (default %(default)s)")
    parser.add_argument("--index", default=CPU_INDEX, help="CPU wheel index (default %(default)s)")
    parser.add_argument("--gpu", action="store_true", help="the package index's default build")
    parser.add_argument("--dry-run", action="store_true", help="resolve and print, install nothing")
    args = parser.parse_args(argv)
    index = None if args.gpu or not reachable(args.index) else args.index
    if not args.gpu and index is None:
        print(f"install_torch: {args.index} is not reachable; trying the package index and "
              "refusing a CUDA build", file=sys.stderr)  # fmt: skip
    cmd = pip_command(args.spec, index)
    print("install_torch:", " ".join(cmd[1:]), file=sys.stderr)
    if args.dry_run or index is None:
        names = selection(cmd)
        print("would install:", " ".join(names))
        cuda = cuda_wheels(names)
        if cuda and not args.gpu:
            print(f"install_torch: the package index offers a CUDA build of {args.spec} "
                  f"({', '.join(cuda[:3])}, ...). Point --index / TORCH_INDEX at a CPU wheel "
                  "index, or ask for CUDA with `make install GPU=1`.", file=sys.stderr)  # fmt: skip
            return 3
    if not args.dry_run:
        subprocess.run(cmd, check=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
