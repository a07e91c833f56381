"""How fast and how lean is `fedmerge merge`? Compared with the I/O floor and with mergekit.

Builds seeded synthetic checkpoints shaped like a Llama model (a base and K
experts: 32,000 × hidden embedding and LM head, attention with grouped KV,
gated MLP, RMS norms; 75 tensors at the default size), then, each in a fresh
subprocess so that peak memory is its own:

* floor: read every input byte once (``read``) and write the output once through the
  page cache (fsync), what the issue that asked for this benchmark measured (page cache
  warmed first; run before and after the merges, the fastest run is the denominator);
* direct floor: the same reads, the output written as fedmerge writes its own (past
  the page cache, :mod:`fedmerge.directwrite`), which costs far less CPU: the stricter
  denominator, in its own column;
* loops start: loading the fused C loops (built into the cache beforehand) and their
  first call, the fixed CPU cost each merge pays inside its work (shown apart; numba's
  start, which it replaced, was ~0.5 s);
* fedmerge task_arithmetic, ties and dare_ties through the streaming engine;
* mergekit (``mergekit-pytorch``, the raw-checkpoint front end of mergekit-yaml)
  on the same files with the same method and parameters, when available.

Before timing, a throw-away process merges tiny in-memory tensors of each dtype with
every method, so the fused loops (``fedmerge/merging/loops.c``) are built (once per
machine; with ``--compare-with`` an older tree fills its own caches the same way): the
timed runs only load them.

Prints wall time, CPU time (user + system, whole process) and the CPU time of
the work itself (without Python start-up and imports), its ratio to the
floor's, peak RSS (``getrusage`` of the child: includes the memory-mapped input
pages a process touched) and peak anonymous memory, the heap (``RssAnon``
sampled from ``/proc/PID/status`` every 10 ms: the tensors a process really
allocates). Every child runs with ``OMP_NUM_THREADS`` = ``--threads`` and
``OMP_WAIT_POLICY=PASSIVE``.

    python benchmarks/merge_speed.py              # 4 experts × 99M (Llama-shaped), bf16 and fp32
    python benchmarks/merge_speed.py --quick      # 4 × 9M, a smoke test
    python benchmarks/merge_speed.py --huge --workdir /big/disk   # 4 × 853M bf16 (~10 GB)
    python benchmarks/merge_speed.py --mergekit-bin /path/venv/bin/mergekit-pytorch
    python benchmarks/merge_speed.py --compare-with /path/to/older/checkout  # before vs after
    python benchmarks/merge_speed.py --repeats 3  # each job 3 times, interleaved: medians
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TREE = os.environ.get("MERGE_SPEED_TREE", str(REPO))  # the fedmerge source a worker runs
sys.path.insert(0, TREE)

CHUNK = 64 << 20
START_JOB = "loops start (load + 1st call)"
FLOOR_JOB, DIRECT_JOB = "floor (read all + write)", "floor (read all + direct write)"


# ----------------------------------------------------------------------------- synthetic models


# name -> (vocab, hidden, layers, MLP width, KV width)
SIZES = {
    "quick": (8000, 256, 2, 688, 64),
    "llm": (32000, 1024, 8, 512, 256),  # 99.1M parameters, 75 tensors
    "huge": (32000, 2048, 16, 5632, 512),  # 853M (TinyLlama-like widths)
}


def model_specs(size: str, dtype):
    """Llama-shaped tensors: embedding and LM head, per layer q/k/v/o, gate/up/down, 2 norms."""
    from fedmerge.checkpoint import TensorSpec

    vocab, d, layers, mlp, kv = SIZES[size]
    shapes = {"model.embed_tokens.weight": (vocab, d), "lm_head.weight": (vocab, d),
              "model.norm.weight": (d,)}  # fmt: skip
    for i in range(layers):
        for name, shape in (("self_attn.q_proj", (d, d)), ("self_attn.k_proj", (kv, d)),
                            ("self_attn.v_proj", (kv, d)), ("self_attn.o_proj", (d, d)),
                            ("mlp.gate_proj", (mlp, d)), ("mlp.up_proj", (mlp, d)),
                            ("mlp.down_proj", (d, mlp)), ("input_layernorm", (d,)),
                            ("post_attention_layernorm", (d,))):  # fmt: skip
            shapes[f"model.layers.{i}.{name}.weight"] = shape
    return {k: TensorSpec(dtype, s) for k, s in shapes.items()}


def build(folder: Path, size: str, n_experts: int, dtype_name: str) -> list[Path]:
    """Write base.safetensors and expert{i}.safetensors (seeded), one key at a time."""
    import torch

    from fedmerge.checkpoint import CheckpointWriter, dtype_from_name

    dtype = dtype_from_name(dtype_name)
    specs = model_specs(size, dtype)
    paths = [folder / "base.safetensors"] + [
        folder / f"expert{i}.safetensors" for i in range(n_experts)
    ]
    with ExitStack() as stack:
        writers = [stack.enter_context(CheckpointWriter(p, specs)) for p in paths]
        for j, (key, spec) in enumerate(sorted(specs.items())):
            base = torch.randn(spec.shape, generator=torch.Generator().manual_seed(j))
            writers[0].write(key, base.to(dtype))
            for who in range(1, len(paths)):
                gen = torch.Generator().manual_seed(1000 * who + j)
                noise = torch.randn(spec.shape, generator=gen).mul_(0.01)
                writers[who].write(key, noise.add_(base).to(dtype))
    return paths


# ----------------------------------------------------------------------------- workers


def floor_worker(inputs: list[str], out: str, direct: bool = False) -> None:
    """Read every input byte once, write as many bytes as the output will have, fsync; the
    write through the page cache, or (``direct``) as fedmerge writes its output."""
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    for path in inputs:
        with open(path, "rb", buffering=0) as fh:
            while fh.readinto(view):
                pass
    size = os.path.getsize(inputs[0])
    if direct:
        from fedmerge.atomic import TempFile

        tmp = TempFile(out, direct=True)
        for start in range(0, size, CHUNK):
            tmp.write_at(view[: min(CHUNK, size - start)], start)
        tmp.commit()
    else:
        with open(out, "wb") as fh:
            while size > 0:
                size -= fh.write(view[: min(CHUNK, size)])
            fh.flush()
            os.fsync(fh.fileno())


PARAMS = {"task_arithmetic": {}, "ties": {"density": 0.2}, "dare_ties": {"density": 0.2}}


def warm_worker(args: argparse.Namespace) -> None:
    """Merge tiny tensors of the inputs' dtype with every method, the fused loops forced
    (an older tree ran them only on big merges): builds or compiles them into their cache,
    so the timed runs only load them."""
    import torch

    from fedmerge.checkpoint import open_checkpoint
    from fedmerge.merging import StateSource, plan_merge, run_plan

    with open_checkpoint(args.inputs[0]) as ck:
        dtype = ck.spec(ck.keys()[0]).dtype
    base = {"w": torch.zeros(512, 512, dtype=dtype)}
    experts = [
        {"w": torch.full((512, 512), float(i + 1), dtype=dtype)}
        for i in range(len(args.inputs) - 1)
    ]
    names = [f"input{i}" for i in range(len(args.inputs))]
    for method, params in PARAMS.items():
        src = [StateSource(s, n) for s, n in zip([base, *experts], names, strict=True)]
        plan = plan_merge(method, src[0], src[1:], names, params=params)
        plan.fused = True
        dict(run_plan(plan))


def start_worker(inputs: list[str]) -> None:
    """The loops' fixed cost in a merge process: loading them (built by the warm worker)
    and the first call of one, with the inputs' dtype and expert count."""
    import numpy as np

    from fedmerge.checkpoint import open_checkpoint
    from fedmerge.merging import native

    with open_checkpoint(inputs[0]) as ck:
        bf16 = str(ck.spec(ck.keys()[0]).dtype) == "torch.bfloat16"
    x = np.zeros(512, np.uint16 if bf16 else np.float32)
    k = len(inputs) - 1
    native.mix_block(x, (x,) * k, np.zeros(k, np.uint64), np.int64(0),
                         (np.int64(-1), np.float32(0)), np.ones(k, np.float32), np.float32(0),
                         np.float32(1), x.copy())  # fmt: skip


def run_worker(args: argparse.Namespace) -> None:
    """The floor, the loops' start, or a fedmerge merge as the CLI runs it; times the work
    after the imports (a merge's work includes loading the loops)."""
    if args.worker == "warm":
        return warm_worker(args)
    if not args.worker.startswith("floor"):
        import inspect

        import torch

        from fedmerge.merging import merge_checkpoints
        from fedmerge.merging.engine import keep_freed_memory

        keep_freed_memory()
        torch.set_num_threads(args.threads)  # an older tree has no threads parameter
        has_threads = "threads" in inspect.signature(merge_checkpoints).parameters
    start, cpu = time.perf_counter(), time.process_time()
    if args.worker.startswith("floor"):
        floor_worker(args.inputs, args.out, direct=args.worker == "floor-direct")
    elif args.worker == "start":
        start_worker(args.inputs)
    else:
        merge_checkpoints(args.worker, args.inputs[0], args.inputs[1:], args.out,
                          params=PARAMS[args.worker], progress=False,
                          **({"threads": args.threads} if has_threads else {}))  # fmt: skip
    work = {"work_s": time.perf_counter() - start, "work_cpu": time.process_time() - cpu}
    print(json.dumps(work))


# ----------------------------------------------------------------------------- measuring


def measure(cmd: list[str], env: dict | None = None) -> dict:
    """Run ``cmd``; wall and CPU time, peak RSS (rusage), peak heap (sampled RssAnon), its JSON."""
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
    last = lines[-1] if lines else {}
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime,
            "rss": usage.ru_maxrss * 1024, "anon": peak_anon[0],
            "work_s": last.get("work_s"), "work_cpu": last.get("work_cpu")}  # fmt: skip


def mergekit_cmd(binary: str, method: str, inputs: list[Path], out: Path, dtype: str,
                 threads: int) -> list[str]:  # fmt: skip
    """A mergekit-pytorch config equal to fedmerge's defaults used here."""
    import yaml

    params = {"lambda": 0.3} if method == "task_arithmetic" else {"lambda": 1.0}
    if method == "dare_ties":  # fedmerge's dare_ties default: the disjoint sum, ×1/density
        params |= {"normalize": False, "rescale": False}
    per_model = {"weight": 1.0, **PARAMS[method]}
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


def _cell(x: float | None, fmt: str) -> str:
    return "—" if x is None else format(x, fmt)


def add_rows(table, dtype: str, results: list[tuple[str, dict]]) -> None:
    """One row per job: the median of its runs (peak memory: the largest); ratios to the
    fastest run of each floor (CPU of the work; wall of the process: the page-cache floor);
    spread = slowest / fastest work CPU over the repeats. A floor's row is its fastest run."""
    runs: dict[str, list[dict]] = {}
    for name, r in results:
        runs.setdefault(name, []).append(r)
    fastest = {n: min(runs[n], key=lambda r: r["work_cpu"]) for n in (FLOOR_JOB, DIRECT_JOB)}
    floor, direct = fastest[FLOOR_JOB], fastest[DIRECT_JOB]
    for name, rs in runs.items():
        r = fastest[name] if name.startswith("floor") else {
            key: max(x[key] for x in rs) if key in ("rss", "anon") else _median(rs, key)
            for key in rs[0]}  # fmt: skip
        ratios = [r["work_cpu"] / f["work_cpu"] if r["work_cpu"] is not None else None
                  for f in (floor, direct)]  # fmt: skip
        cpus = [x["work_cpu"] for x in rs if x["work_cpu"] is not None]
        spread = max(cpus) / min(cpus) if len(cpus) > 1 and not name.startswith("floor") else None
        table.add_row(dtype, name, str(len(rs)), f"{r['wall_s']:.2f}", f"{r['cpu_s']:.2f}",
                      _cell(r["work_cpu"], ".2f"),
                      *(_cell(x, ".2f") + ("×" if x else "") for x in ratios),
                      _cell(spread, ".2f"), f"{r['wall_s'] / floor['wall_s']:.2f}×",
                      f"{r['rss'] / 2**20:.0f}", f"{r['anon'] / 2**20:.0f}")  # fmt: skip


def _median(rows: list[dict], key: str) -> float | None:
    values = sorted(x[key] for x in rows if x[key] is not None)
    return statistics.median(values) if values else None


def same_tensors(a: Path, b: Path) -> bool:
    """Do two checkpoints hold bit-identical tensors (metadata aside)?"""
    import torch

    from fedmerge.checkpoint import open_checkpoint

    with open_checkpoint(a) as x, open_checkpoint(b) as y:
        keys = x.keys()
        return keys == y.keys() and all(
            torch.equal(x.get(k).view(torch.uint8), y.get(k).view(torch.uint8)) for k in keys
        )


def run_dtype(args, console, folder: Path, dtype: str, env: dict) -> list[tuple[str, dict]]:
    """Build the checkpoints of one dtype, run every job ``--repeats`` times interleaved
    (floor first and last), clean up.

    With ``--compare-with`` each fedmerge merge also runs on that source tree and
    the two outputs are compared bit for bit (printed)."""
    folder.mkdir()
    with console.status(f"building {dtype} checkpoints"):
        inputs = build(folder, args.size, args.experts, dtype)
    me = [sys.executable, __file__, "--threads", str(args.threads), "--inputs", *map(str, inputs)]
    floor_out = folder / "floor.bin"
    jobs = [(FLOOR_JOB, [*me, "--worker", "floor", "--out", str(floor_out)], [floor_out], env),
            (DIRECT_JOB, [*me, "--worker", "floor-direct", "--out", str(floor_out)], [floor_out],
             env),
            (START_JOB, [*me, "--worker", "start"], [], env)]  # fmt: skip
    tree = str(args.compare_with)
    other = {**env, "MERGE_SPEED_TREE": tree, "PYTHONPATH": tree}
    for m in args.methods.split(","):
        out = folder / f"fm_{m}.safetensors"
        mine = (f"fedmerge {m}", [*me, "--worker", m, "--out", str(out)], [], env)
        if args.compare_with:
            old = folder / f"old_{m}.safetensors"
            jobs += [mine, (f"fedmerge@other {m}", [*me, "--worker", m, "--out", str(old)],
                            [out, old], other)]  # fmt: skip
        else:
            jobs.append((*mine[:2], [out], env))
        if args.mergekit_bin:
            out = folder / f"mk_{m}"
            cmd = mergekit_cmd(args.mergekit_bin, m, inputs, out, dtype, args.threads)
            jobs.append((f"mergekit {m}", cmd, [out], env))
    floor_worker(list(map(str, inputs)), str(floor_out))  # warm the page cache
    for tree_env in [env, *([other] if args.compare_with else [])]:  # and the loops' caches
        measure([*me, "--worker", "warm"], tree_env)
    results = []
    # every job in turn, --repeats times (so that load changes hit all alike); the floors
    # first and once more at the very end
    for name, cmd, done, job_env in [*jobs * args.repeats, *jobs[:2]]:
        with console.status(f"{dtype}: {name}"):
            results.append((name, measure(cmd, job_env)))
        if name.startswith("fedmerge@other"):
            same = same_tensors(*done)
            console.print(f"{dtype} {name.split()[-1]}: both trees' outputs bit-identical: {same}")
        for out in done:  # keep the disk free
            shutil.rmtree(out) if out.is_dir() else out.unlink()
    shutil.rmtree(folder)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--dtype", default="bfloat16,float32", help="comma-separated dtypes")
    parser.add_argument("--quick", action="store_true", help="4 × 9M parameters, a smoke test")
    parser.add_argument("--huge", action="store_true",
                        help="4 × 853M bf16 (needs ~9 GB free in --workdir)")  # fmt: skip
    parser.add_argument("--methods", default="task_arithmetic,ties,dare_ties")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch/OpenMP threads per process (default 1: on busy shared cores "
                        "more threads mostly wait)")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=1,
                        help="run the job list this many times, interleaved; rows show the "
                        "median (default 1)")  # fmt: skip
    parser.add_argument("--mergekit-bin", default=shutil.which("mergekit-pytorch"),
                        help="mergekit-pytorch executable (default: from PATH)")  # fmt: skip
    parser.add_argument("--workdir", help="where to build the checkpoints (default: a temp dir)")
    parser.add_argument("--compare-with", metavar="TREE",
                        help="also run fedmerge from this source tree (e.g. a git worktree of an "
                        "older commit) and compare the outputs bit for bit")  # fmt: skip
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--inputs", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return run_worker(args)
    args.size = "quick" if args.quick else "huge" if args.huge else "llm"
    if args.huge:
        args.dtype = "bfloat16"
    if args.repeats < 1:
        raise SystemExit(f"--repeats {args.repeats}: must be at least 1")
    if args.compare_with and not (Path(args.compare_with) / "fedmerge" / "__init__.py").is_file():
        raise SystemExit(f"--compare-with {args.compare_with}: no fedmerge package there")

    import torch
    from rich.console import Console
    from rich.table import Table

    specs = model_specs(args.size, torch.bfloat16)
    n_params = sum(math.prod(s.shape) for s in specs.values())
    need = (args.experts + 2) * sum(s.nbytes for s in specs.values())
    free = shutil.disk_usage(args.workdir or tempfile.gettempdir()).free
    if need > free:
        raise SystemExit(f"needs {need / 1e9:.1f} GB free, {free / 1e9:.1f} GB are")
    console = Console(width=max(Console().width, 170))
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "OMP_WAIT_POLICY": "PASSIVE",
           "PYTHONPATH": str(REPO)}  # fmt: skip
    load = os.getloadavg()
    table = Table(title=f"merge speed: {args.experts} experts + base × {n_params / 1e6:.1f}M "
                  f"params ({len(specs)} tensors), {args.threads} thread(s)")  # fmt: skip
    for col in ("dtype", "job", "runs", "wall s", "CPU s", "work CPU s", "work CPU / floor",
                "/ direct floor", "spread", "wall / floor", "peak RSS MiB",
                "peak heap MiB"):  # fmt: skip
        table.add_column(col, justify="left" if col in ("dtype", "job") else "right")
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for dtype in args.dtype.split(","):
            add_rows(table, dtype, run_dtype(args, console, Path(tmp) / dtype, dtype, env))
    console.print(table)
    after = os.getloadavg()
    loads = [" ".join(f"{x:.2f}" for x in v) for v in (load, after)]
    console.print(f"load average (1/5/15 min) before {loads[0]}, after {loads[1]}; "
                  f"{os.cpu_count()} CPUs")  # fmt: skip
    command = " ".join(argv if argv is not None else sys.argv[1:])
    console.print(f"python benchmarks/merge_speed.py {command}")


if __name__ == "__main__":
    main()
