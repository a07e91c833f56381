"""How fast and how lean is `fedmerge merge`? Compared with the I/O floor and with mergekit.

Builds seeded synthetic checkpoints (a base and K experts shaped like a small
transformer), then, each in a fresh subprocess so that peak memory is its own:

* floor: read every input byte once and write the output once (fsync), the
  least any merge of these files can do (page cache warmed first; run before and
  after the merges, the faster run is the denominator);
* fedmerge task_arithmetic and ties (scope tensor) through the streaming engine;
* mergekit (``mergekit-pytorch``, the raw-checkpoint front end of mergekit-yaml)
  on the same files with the same method and parameters, when available.

Prints wall time, the time of the work itself (without Python start-up and
imports), peak RSS (``getrusage`` of the child: includes the memory-mapped input
pages a process touched) and peak anonymous memory (sampled from
``/proc/PID/status`` every 10 ms: the tensors a process really allocates), and
the ratios to the floor.

    python benchmarks/merge_speed.py                 # 4 experts × 100M parameters, fp32 and bf16
    python benchmarks/merge_speed.py --quick         # 4 × 5M, for a smoke test
    python benchmarks/merge_speed.py --mergekit-bin /path/venv/bin/mergekit-pytorch
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CHUNK = 64 << 20


# ----------------------------------------------------------------------------- synthetic models


def model_specs(n_params: float, dtype):
    """Transformer-like shapes (embedding, attention, MLP, norms) totalling ≈ n_params."""
    from fedmerge.checkpoint import TensorSpec

    d = 1024 if n_params >= 5e7 else 256
    specs = {"embed.weight": TensorSpec(dtype, (8192, d))}
    per_layer = 12 * d * d + 2 * d
    for i in range(max(1, round((n_params - 8192 * d) / per_layer))):
        for name, shape in (("attn.q", (d, d)), ("attn.k", (d, d)), ("attn.v", (d, d)),
                            ("attn.o", (d, d)), ("mlp.up", (4 * d, d)), ("mlp.down", (d, 4 * d)),
                            ("ln1", (d,)), ("ln2", (d,))):  # fmt: skip
            specs[f"layers.{i}.{name}.weight"] = TensorSpec(dtype, shape)
    return specs


def build(folder: Path, n_params: float, n_experts: int, dtype_name: str) -> list[Path]:
    """Write base.safetensors and expert{i}.safetensors (seeded), one tensor at a time."""
    import torch

    from fedmerge.checkpoint import CheckpointWriter, dtype_from_name

    dtype = dtype_from_name(dtype_name)
    specs = model_specs(n_params, dtype)
    paths = [folder / "base.safetensors"] + [
        folder / f"expert{i}.safetensors" for i in range(n_experts)
    ]
    for who, path in enumerate(paths):
        with CheckpointWriter(path, specs) as w:
            for j, (key, spec) in enumerate(sorted(specs.items())):
                base = torch.randn(spec.shape, generator=torch.Generator().manual_seed(j))
                if who:
                    gen = torch.Generator().manual_seed(1000 * who + j)
                    base += 0.01 * torch.randn(spec.shape, generator=gen)
                w.write(key, base.to(dtype))
    return paths


# ----------------------------------------------------------------------------- workers


def floor_worker(inputs: list[str], out: str) -> None:
    """Read every input byte once, write as many bytes as the output will have, fsync."""
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    for path in inputs:
        with open(path, "rb", buffering=0) as fh:
            while fh.readinto(view):
                pass
    size = os.path.getsize(inputs[0])
    with open(out, "wb") as fh:
        while size > 0:
            size -= fh.write(view[: min(CHUNK, size)])
        fh.flush()
        os.fsync(fh.fileno())


def fedmerge_worker(method: str, inputs: list[str], out: str) -> None:
    from fedmerge.merging import merge_checkpoints
    from fedmerge.merging.engine import keep_freed_memory

    keep_freed_memory()  # as the CLI does
    params = {"density": 0.2} if method == "ties" else {}
    merge_checkpoints(method, inputs[0], inputs[1:], out, params=params, progress=False)


def run_worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    if args.worker == "floor":
        floor_worker(args.inputs, args.out)
    else:
        fedmerge_worker(args.worker, args.inputs, args.out)
    print(json.dumps({"work_s": time.perf_counter() - start}))


# ----------------------------------------------------------------------------- measuring


def measure(cmd: list[str], env: dict | None = None) -> dict:
    """Run ``cmd``; wall time, peak RSS (rusage), peak anonymous RSS (sampled), its JSON line."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    peak_anon = [0]

    def sample() -> None:
        status = Path(f"/proc/{proc.pid}/status")
        while proc.returncode is None:
            try:
                for line in status.read_text().splitlines():
                    if line.startswith("RssAnon:"):
                        peak_anon[0] = max(peak_anon[0], int(line.split()[1]) * 1024)
            except OSError:
                return
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    out, err = proc.stdout.read().decode(), proc.stderr.read().decode()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-2000:]}")
    lines = [json.loads(x) for x in out.splitlines() if x.startswith("{")]
    return {"wall_s": wall, "rss": usage.ru_maxrss * 1024, "anon": peak_anon[0],
            "work_s": lines[-1]["work_s"] if lines else None}  # fmt: skip


def mergekit_cmd(binary: str, method: str, inputs: list[Path], out: Path, dtype: str,
                 threads: int) -> list[str]:  # fmt: skip
    """A mergekit-pytorch config equal to fedmerge's defaults used here."""
    import yaml

    params = {"lambda": 0.3} if method == "task_arithmetic" else {"lambda": 1.0}
    per_model = {"weight": 1.0, **({"density": 0.2} if method == "ties" else {})}
    config = {
        "merge_method": method,
        "base_model": str(inputs[0]),
        "models": [{"model": str(p), "parameters": per_model} for p in inputs[1:]],
        "parameters": params,
        "dtype": "float32",  # compute in float32 like fedmerge
        "out_dtype": dtype,
    }
    cfg = out.with_suffix(".yaml")
    cfg.write_text(yaml.safe_dump(config))
    return [binary, str(cfg), str(out), "--quiet", "-j", str(threads)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=float, default=100e6, help="parameters per model")
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--dtype", default="float32,bfloat16", help="comma-separated dtypes")
    parser.add_argument("--quick", action="store_true", help="4 × 5M parameters")
    parser.add_argument("--methods", default="task_arithmetic,ties")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch threads per process (default 2; on busy shared cores 1 can "
                        "be faster: OpenMP barriers stall when a core is taken)")  # fmt: skip
    parser.add_argument("--mergekit-bin", default=shutil.which("mergekit-pytorch"),
                        help="mergekit-pytorch executable (default: from PATH)")  # fmt: skip
    parser.add_argument("--workdir", help="where to build the checkpoints (default: a temp dir)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--inputs", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return run_worker(args)
    if args.quick:
        args.params = 5e6

    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 130))
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(REPO)}
    table = Table(title=f"merge speed: {args.experts} experts × {args.params / 1e6:g}M params, "
                  f"{args.threads} threads")  # fmt: skip
    for col in ("dtype", "job", "wall s", "work s", "peak RSS MiB", "peak anon MiB",
                "work / floor", "wall / floor"):  # fmt: skip
        table.add_column(col, justify="left" if col in ("dtype", "job") else "right")
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for dtype in args.dtype.split(","):
            folder = Path(tmp) / dtype
            folder.mkdir()
            with console.status(f"building {dtype} checkpoints"):
                inputs = build(folder, args.params, args.experts, dtype)
            me = [sys.executable, __file__, "--threads", str(args.threads), "--inputs",
                  *map(str, inputs)]  # fmt: skip
            jobs = [("floor (read all + write)",
                     [*me, "--worker", "floor", "--out", str(folder / "floor.bin")])]  # fmt: skip
            for m in args.methods.split(","):
                out = str(folder / f"fm_{m}.safetensors")
                jobs.append((f"fedmerge {m}", [*me, "--worker", m, "--out", out]))
                if args.mergekit_bin:
                    out = folder / f"mk_{m}"
                    cmd = mergekit_cmd(args.mergekit_bin, m, inputs, out, dtype, args.threads)
                    jobs.append((f"mergekit {m}", cmd))
            floor_worker(list(map(str, inputs)), str(folder / "warm.bin"))  # warm the page cache
            results = []
            for name, cmd in [*jobs, jobs[0]]:  # the floor runs first and last
                with console.status(f"{dtype}: {name}"):
                    results.append((name, measure(cmd, env)))
                for f in folder.glob("mk_*"):
                    shutil.rmtree(f, ignore_errors=True) if f.is_dir() else None
            # the faster of the two floor runs: the conservative denominator
            floor = min((r for n, r in results if n.startswith("floor")), key=lambda r: r["work_s"])
            for name, r in results[:-1]:
                r = floor if name.startswith("floor") else r
                work = f"{r['work_s']:.2f}" if r["work_s"] is not None else "—"
                ratio = f"{r['work_s'] / floor['work_s']:.2f}×" if r["work_s"] else "—"
                table.add_row(dtype, name, f"{r['wall_s']:.2f}", work, f"{r['rss'] / 2**20:.0f}",
                              f"{r['anon'] / 2**20:.0f}", ratio,
                              f"{r['wall_s'] / floor['wall_s']:.2f}×")  # fmt: skip
            shutil.rmtree(folder)
    console.print(table)
    import torch

    size = sum(s.nbytes for s in model_specs(args.params, torch.float32).values()) / 2**20
    command = " ".join(argv if argv is not None else sys.argv[1:])
    console.print(f"{size:.0f} MiB per fp32 checkpoint; python benchmarks/merge_speed.py {command}")


if __name__ == "__main__":
    main()
