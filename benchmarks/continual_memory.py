"""Continual store: is adding the 20th expert as cheap as adding the 2nd?

Builds a small-LM-shaped model (random weights; 102.5M parameters by default:
a 150000 × 512 token embedding, as large vocabularies make it in today's small
LMs, and 8 GPT-2-style blocks of qkv/proj/fc/proj Linear layers with biases
and LayerNorms: 32 projected 2-D weights, 25M parameters), a store over it,
and folds experts in one by one
(expert i = base + seeded noise, written to disk, added, deleted). The 2nd and
the 20th add each run in a fresh subprocess that reports its own peak RSS
(``getrusage``) and wall time; the fill-up adds in between run in this process.
OPCM's state is constant-size, so both peaks should agree within 10%.
Then a PEFT LoRA adapter of the same base (rank ``--adapter-rank`` on every
projected Linear weight) is added the same way, and its peak RSS is compared
with the last dense add: an adapter is read as θ = θ_0 + B@A·scaling one key
at a time, so its peak should not exceed the dense expert's by more than 10%.

With ``--fusionbench-python`` (a venv with fusion-bench installed) the same
base and two experts are also merged by FusionBench's ``OPCM`` in memory and
its time for one merge step is reported; fedmerge's in-memory step on the same
tensors is timed too, for a like-for-like comparison.

    python benchmarks/continual_memory.py --quick
    python benchmarks/continual_memory.py                # full size (minutes)
    python benchmarks/continual_memory.py --fusionbench-python /path/to/venv/bin/python
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fedmerge.checkpoint import (  # noqa: E402
    CheckpointWriter,
    TensorSpec,
    open_checkpoint,
    save_state_dict,
)
from fedmerge.continual.store import ContinualStore  # noqa: E402


def small_lm_specs(vocab: int, d: int, layers: int, ctx: int) -> dict[str, TensorSpec]:
    """Key -> spec of a GPT-2-shaped model with nn.Linear (out, in) weight layout."""
    f32 = torch.float32
    specs = {"wte.weight": TensorSpec(f32, (vocab, d)), "wpe.weight": TensorSpec(f32, (ctx, d)),
             "ln_f.weight": TensorSpec(f32, (d,)), "ln_f.bias": TensorSpec(f32, (d,))}  # fmt: skip
    for i in range(layers):
        for name, (out, inp) in {"attn.qkv": (3 * d, d), "attn.proj": (d, d),
                                 "mlp.fc": (4 * d, d), "mlp.proj": (d, 4 * d)}.items():  # fmt: skip
            specs[f"h.{i}.{name}.weight"] = TensorSpec(f32, (out, inp))
            specs[f"h.{i}.{name}.bias"] = TensorSpec(f32, (out,))
        for ln in ("ln_1", "ln_2"):
            specs[f"h.{i}.{ln}.weight"] = TensorSpec(f32, (d,))
            specs[f"h.{i}.{ln}.bias"] = TensorSpec(f32, (d,))
    return specs


def write_model(path: Path, specs: dict[str, TensorSpec], seed: int, base: Path | None) -> None:
    """Base: N(0, 0.02²) weights; expert: base + N(0, 0.002²) (streamed key by key)."""
    g = torch.Generator().manual_seed(seed)
    ref = open_checkpoint(base) if base else None
    with CheckpointWriter(path, specs) as w:
        for key, spec in specs.items():
            noise = torch.randn(spec.shape, generator=g)
            w.write(key, noise * 0.02 if ref is None else ref.get(key) + noise * 0.002)


def write_adapter(
    folder: Path, specs: dict[str, TensorSpec], projected: list[str], rank: int
) -> None:
    """A LoRA adapter (PEFT layout) with N(0, 0.01²) factors on every ``projected`` weight."""
    g = torch.Generator().manual_seed(1234)
    tensors = {}
    for key in projected:
        out, inp = specs[key].shape
        module = f"base_model.model.{key.removesuffix('.weight')}"
        tensors[f"{module}.lora_A.weight"] = torch.randn(rank, inp, generator=g) * 0.01
        tensors[f"{module}.lora_B.weight"] = torch.randn(out, rank, generator=g) * 0.01
    folder.mkdir(parents=True, exist_ok=True)
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank,
              "target_modules": sorted({k.split(".")[-2] for k in projected})}  # fmt: skip
    (folder / "adapter_config.json").write_text(json.dumps(config))
    save_state_dict(tensors, folder / "adapter_model.safetensors")


def peak_rss_kib() -> int:
    """This process's peak resident set size in KiB.

    Linux's VmHWM belongs to the process image, so it starts afresh at exec;
    ``ru_maxrss`` would carry over the parent's RSS at fork time.
    """
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def child_add(store: str, expert: str) -> None:
    """Run in a fresh process: one add, then report its time and this process's peak RSS."""
    rss_before = peak_rss_kib()
    start = time.perf_counter()
    ContinualStore(store).add(expert)
    seconds = time.perf_counter() - start
    peak = peak_rss_kib()
    print(json.dumps({"seconds": seconds, "peak_kib": peak, "import_kib": rss_before}))


def measured_add(store: Path, expert: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", str(store), str(expert)],
                         check=True, capture_output=True, text=True)  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def fusionbench_step(python: str, work: Path, base: Path, e1: Path, e2: Path) -> float:
    """Seconds of one FusionBench OPCM merge step (2 experts minus 1 expert, in memory)."""
    script = work / "fb_opcm.py"
    script.write_text(FB_SCRIPT)
    out = subprocess.run([python, str(script), str(base), str(e1), str(e2)],
                         check=True, capture_output=True, text=True)  # fmt: skip
    return float(out.stdout.strip().splitlines()[-1])


# Runs inside the FusionBench venv: builds nn.Linear/Embedding/LayerNorm modules from the keys.
FB_SCRIPT = r"""
import sys, time
from copy import deepcopy
import torch
from torch import nn
from safetensors.torch import load_file
from fusion_bench.modelpool import BaseModelPool
from fusion_bench.method.opcm.opcm_general import OPCM

def build(sd):
    root = nn.Module()
    for key, t in sd.items():
        leaf = key.rsplit(".", 1)[0]
        if not key.endswith(".weight"):
            continue
        parent = root
        parts = leaf.split(".")
        for p in parts[:-1]:
            if not hasattr(parent, p):
                parent.add_module(p, nn.Module())
            parent = getattr(parent, p)
        if leaf in ("wte", "wpe"):
            mod = nn.Embedding(*t.shape)
        elif t.ndim == 2:
            mod = nn.Linear(t.shape[1], t.shape[0], bias=f"{leaf}.bias" in sd)
        else:
            mod = nn.LayerNorm(t.shape[0])
        parent.add_module(parts[-1], mod)
    root.load_state_dict(sd)
    return root

models = [build(load_file(p)) for p in sys.argv[1:4]]
times = []
for n in (1, 2):
    pool = BaseModelPool({"_pretrained_": deepcopy(models[0]),
                          **{f"t{i}": deepcopy(models[i]) for i in range(1, n + 1)}})
    algo = OPCM(alpha=0.5, shuffle_order=False, save_on_every_step=False,
                evaluate_on_every_step=False, num_ray_actors=0)
    start = time.perf_counter()
    algo.run(pool)
    times.append(time.perf_counter() - start)
print(times[1] - times[0])
"""


def inmemory_step(base: Path, e1: Path, e2: Path) -> float:
    """Seconds of fedmerge's in-memory OPCM step 2 on the same tensors."""
    from fedmerge.checkpoint import load_state_dict
    from fedmerge.continual import make_merger

    m = make_merger("opcm", load_state_dict(base))
    m.add(load_state_dict(e1))
    expert = load_state_dict(e2)
    start = time.perf_counter()
    m.add(expert)
    m.merged()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="tiny model and 5 experts (seconds)")
    p.add_argument("--experts", type=int, default=20, help="the last add measured (default 20)")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--vocab", type=int, default=150000)
    p.add_argument("--adapter-rank", type=int, default=16, help="rank of the LoRA adapter added")
    p.add_argument("--fusionbench-python", help="python of a venv with fusion-bench installed")
    p.add_argument("--repeats", type=int, default=2, help="timings of the in-memory step")
    p.add_argument("--workdir", help="where to put the store and experts (default: a temp dir)")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child_add(*args.child)
    if args.quick:
        args.experts, args.layers, args.d_model, args.vocab = 5, 2, 64, 1000
    from rich.console import Console
    from rich.table import Table

    console = Console()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="fedmerge-continual-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    specs = small_lm_specs(args.vocab, args.d_model, args.layers, 1024)
    n_params = sum(s.nbytes for s in specs.values()) // 4
    base = work / "base.safetensors"
    write_model(base, specs, 0, None)
    store = work / "store"
    shutil.rmtree(store, ignore_errors=True)
    ContinualStore.init(store, base, "opcm")
    rows, kept = {}, {}
    with console.status("") as status:
        for i in range(1, args.experts + 1):
            status.update(f"expert {i}/{args.experts} ({n_params / 1e6:.1f}M parameters)")
            expert = work / f"expert_{i}.safetensors"
            write_model(expert, specs, i, base)
            if i in (2, args.experts):
                rows[i] = measured_add(store, expert)
            else:
                ContinualStore(store).add(expert)
            if i <= 2:
                kept[i] = expert
            else:
                expert.unlink()
        status.update(f"LoRA adapter, rank {args.adapter_rank}")
        projected = ContinualStore(store).manifest()["projectable"]
        write_adapter(work / "adapter", specs, projected, args.adapter_rank)
        rows["adapter"] = measured_add(store, work / "adapter")
    table = Table(title=f"fedmerge continual add, opcm, {n_params / 1e6:.1f}M float32 parameters")
    for col in ("expert", "wall time (s)", "peak RSS (MiB)", "RSS after imports (MiB)"):
        table.add_column(col, justify="right")
    for i, r in rows.items():
        table.add_row(str(i), f"{r['seconds']:.2f}", f"{r['peak_kib'] / 1024:.0f}",
                      f"{r['import_kib'] / 1024:.0f}")  # fmt: skip
    a, b = rows[2], rows[args.experts]
    ratio = b["peak_kib"] / a["peak_kib"]
    table.add_row("ratio", f"{b['seconds'] / a['seconds']:.2f}", f"{ratio:.3f}", "")
    console.print(table)
    model_mib = n_params * 4 / 2**20
    console.print(f"model size {model_mib:.0f} MiB; peaks within 10%: {abs(ratio - 1) <= 0.10}")
    lora = rows["adapter"]["peak_kib"] / b["peak_kib"]
    console.print(f"LoRA adapter (rank {args.adapter_rank}, step {args.experts + 1}) / dense "
                  f"expert (step {args.experts}) peak RSS = {lora:.3f}; "
                  f"within 10%: {lora <= 1.10}")  # fmt: skip
    # alternate the two implementations and keep each one's best: the machine may be shared
    ours, theirs = [], []
    for _ in range(args.repeats):
        ours.append(inmemory_step(base, kept[1], kept[2]))
        if args.fusionbench_python:
            theirs.append(fusionbench_step(args.fusionbench_python, work, base, *kept.values()))
    console.print(f"fedmerge in-memory OPCM step (same tensors): best of {args.repeats} "
                  f"{min(ours):.2f} s {[round(t, 2) for t in ours]}")  # fmt: skip
    if theirs:
        console.print(f"FusionBench 0.2.33 OPCM step (in memory): best of {args.repeats} "
                      f"{min(theirs):.2f} s {[round(t, 2) for t in theirs]}; "
                      f"fedmerge/FusionBench = {min(ours) / min(theirs):.2f}")  # fmt: skip
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
