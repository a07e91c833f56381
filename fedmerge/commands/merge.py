"""Merge fine-tuned checkpoints into one, in one shot, streaming key by key.

Every expert is read as a task vector τ_k = θ_k − θ_ref against the reference
given with --base; the method combines the τ_k per tensor and the result
θ_ref + τ_merged is written as safetensors (sharded with an index when larger
than --max-shard-size). Inputs are .safetensors files or Hugging Face sharded
directories. Integer and bool tensors are copied from the reference.
Everything is validated (method, parameters, keys, shapes, dtypes, NaN/Inf);
on an error nothing is written.

examples:
  fedmerge merge --list                  # every method, what it does, its parameters
  fedmerge merge --list ties             # one method's parameters: default, range, meaning
  fedmerge merge ties --base ref.safetensors a.safetensors b.safetensors -o out.safetensors
  fedmerge merge ties --base ref/ a/ b/ c/ -o merged/ --param density=0.2 --param scope=global
  fedmerge merge task_arithmetic --base ref.safetensors a.safetensors b.safetensors \\
      -o out.safetensors --param lambda=0.4 --weights 1,0.5 --dtype bfloat16
  fedmerge merge dare_ties --base ref.safetensors a.safetensors b.safetensors -o out.safetensors \\
      --param density=0.3 --param seed=7
  fedmerge merge fisher --base ref.safetensors a.safetensors b.safetensors \\
      --fisher fa.safetensors fb.safetensors -o out.safetensors

Hugging Face and PEFT (docs/peft.md): with --base a model directory (config.json +
safetensors), experts may be LoRA adapter directories (adapter_config.json +
adapter_model.safetensors, read as base + B@A·scaling) and -o DIR writes a model
directory transformers loads (config and tokenizer files copied from the base);
--as-adapter --rank R writes a PEFT LoRA adapter instead (truncated SVD):
  fedmerge merge ties --base base/ adapter_1/ adapter_2/ -o merged/
  fedmerge merge task_arithmetic --base base/ adapter_1/ adapter_2/ -o merged_lora/ \\
      --as-adapter --rank 8
"""

from __future__ import annotations

import argparse
import os
import re
from functools import partial
from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fedmerge.errors import ConfigError

if TYPE_CHECKING:
    from fedmerge.hf.refactor import AdapterReport

NAME = "merge"
EXTRA_POSITIONALS = "experts"  # experts may also follow the options
HELP = "one-shot merge of checkpoints (average, task_arithmetic, ties, dare, ...)"

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """``2GB`` -> 2·10⁹ bytes (decimal like Hugging Face; ``GiB`` is binary)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).upper() if match else None
    if unit not in _UNITS or float(match.group(1)) <= 0:
        raise ConfigError(f"--max-shard-size: expected a size like 2GB or 500MiB, got {text!r}")
    return int(float(match.group(1)) * _UNITS[unit])


def parse_weights(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise ConfigError(
            f"--weights: expected numbers separated by commas, got {text!r}"
        ) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("method", nargs="?", help="merge method (see --list)")
    parser.add_argument("experts", nargs="*", metavar="EXPERT", help="fine-tuned checkpoints")
    parser.add_argument("--list", action="store_true",
                        help="list the methods (with METHOD: its parameters) and exit")  # fmt: skip
    parser.add_argument("--base", metavar="REF", help="reference checkpoint θ_ref")
    parser.add_argument("-o", "--out", metavar="OUT", help="output .safetensors file or directory")
    parser.add_argument(
        "-p", "--param", action="append", metavar="K=V", help="method parameter (repeatable)"
    )
    parser.add_argument("--weights", metavar="W1,W2,...", help="one weight per expert (default 1)")
    parser.add_argument("--fisher", nargs="+", metavar="FISHER", default=[],
                        help="diagonal Fisher per expert (method fisher)")  # fmt: skip
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16", "float64"],
        help="output dtype of merged tensors (default: the reference's)",
    )
    parser.add_argument("--max-shard-size", metavar="SIZE",
                        help="shard the output above this size (default 4GiB)")  # fmt: skip
    parser.add_argument("--no-progress", action="store_true", help="never draw a progress bar")
    parser.add_argument("--threads", type=int, metavar="N",
                        help="torch threads (default: physical cores; 1 is often fastest on "
                        "a busy machine)")  # fmt: skip
    add_adapter_arguments(parser)


def add_adapter_arguments(parser: argparse.ArgumentParser) -> None:
    """``--as-adapter --rank R --svd exact|lowrank`` (merge and continual export)."""
    parser.add_argument("--as-adapter", action="store_true",
                        help="write a PEFT LoRA adapter (base: an HF model directory)")  # fmt: skip
    parser.add_argument("--rank", type=int, metavar="R", help="LoRA rank of --as-adapter")
    parser.add_argument("--svd", choices=("exact", "lowrank"), default="exact",
                        help="exact, or randomized torch.svd_lowrank (big layers)")  # fmt: skip


def adapter_rank(args: argparse.Namespace) -> int | None:
    """The rank asked for with --as-adapter (None without it); --rank alone is an error."""
    if args.as_adapter and args.rank is None:
        raise ConfigError("--as-adapter needs --rank R")
    if args.rank is not None and not args.as_adapter:
        raise ConfigError("--rank only applies with --as-adapter")
    return args.rank if args.as_adapter else None


def svd_table(report: AdapterReport) -> Table:
    """One row per LoRA module: shape, rank and relative Frobenius error of the SVD."""
    table = Table(title=f"LoRA adapter: {len(report.rows)} modules (relative error ‖ΔW − BA‖/‖ΔW‖)")
    for col in ("module", "ΔW shape", "rank", "rel. error"):
        table.add_column(col, justify="left" if col == "module" else "right", overflow="fold")
    for module, shape, rank, err in report.rows:
        table.add_row(escape(module), "×".join(map(str, shape)), str(rank), f"{err:.2e}")
    if report.modules_to_save:
        saved = escape(", ".join(report.modules_to_save))
        table.caption = f"stored in full (modules_to_save): {saved}"
    return table


def method_table(method: str | None = None) -> Table:
    """Without ``method``: one row per method, what it does and its parameters' defaults.
    With it: that method's parameters, one row each (default, range, meaning)."""
    from fedmerge.merging import METHODS

    hint = "fedmerge merge --list METHOD: its parameters in full"
    return registry_table(METHODS, method, "method", title="fedmerge merge methods", caption=hint)


def registry_table(registry, name: str | None, column: str, *, title: str, caption: str) -> Table:
    """``--list`` of a registry (merge methods, codecs): one row per entry, or with ``name``
    one row per parameter of that entry (default, range, meaning)."""
    if name is None:
        table = Table(title=title, caption=caption)
        table.add_column(column, style="bold", no_wrap=True)
        table.add_column("what it does · parameters (defaults)")
        for key in sorted(registry):
            e = registry[key]
            params = ", ".join(f"{p.name}={p.default!r}" for p in e.params) or "none"
            table.add_row(key, f"{e.doc}\n[dim]{params}[/]")
        return table
    m = registry.lookup(name)
    table = Table(title=f"{name}: {m.doc}", caption=getattr(m, "reference", ""))
    for col in ("parameter", "default", "range", "meaning"):
        table.add_column(col, overflow="fold")
    for p in m.params:
        table.add_row(p.name, repr(p.default), p.range_text(), p.doc)
    return table


def run(args: argparse.Namespace) -> int:
    console = Console()
    if args.list:
        console.print(method_table(args.method))
        return 0
    if not args.method:
        raise ConfigError("give a METHOD (see 'fedmerge merge --list')")
    missing = [flag for flag, value in (("--base", args.base), ("-o/--out", args.out)) if not value]
    if missing:
        raise ConfigError(f"{' and '.join(missing)} required")
    if not args.experts:
        raise ConfigError("give at least one EXPERT checkpoint")
    if args.threads is not None and args.threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {args.threads}")
    # OpenMP reads this when torch loads: idle threads then sleep instead of spinning on cores
    # that other processes need (2× slower merges on a busy machine otherwise)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from fedmerge.checkpoint import DEFAULT_SHARD_BYTES, dtype_from_name
    from fedmerge.merging import merge_checkpoints
    from fedmerge.merging.engine import keep_freed_memory
    from fedmerge.registry import parse_assignments
    from fedmerge.report import progress

    keep_freed_memory()
    shard = parse_size(args.max_shard_size) if args.max_shard_size else DEFAULT_SHARD_BYTES
    rank = adapter_rank(args)
    bar = None if args.no_progress else partial(progress, percent=True)
    if rank is not None:
        from fedmerge.hf.merge import merge_to_adapter

        made = merge_to_adapter(
            args.method, args.base, args.experts, args.out, rank, args.svd,
            parse_weights(args.weights), parse_assignments(args.param), bar,
        )  # fmt: skip
        console.print(svd_table(made))
        console.print(f"wrote {escape(args.out)} (adapter_config.json, adapter_model.safetensors)")
        return 0
    report = merge_checkpoints(
        args.method,
        args.base,
        args.experts,
        args.out,
        weights=parse_weights(args.weights),
        params=parse_assignments(args.param),
        fisher_paths=args.fisher,
        dtype=dtype_from_name(args.dtype) if args.dtype else None,
        max_shard_bytes=shard,
        progress=bar,
        threads=args.threads,
    )
    table = Table(title=f"merged with {report.method}", show_header=False)
    params = ", ".join(f"{k}={v}" for k, v in report.params.items()) or "-"
    table.add_row("parameters", escape(params))
    table.add_row("weights", ", ".join(f"{w:g}" for w in report.weights))
    table.add_row("tensors", f"{report.merged_keys} merged, {report.keys - report.merged_keys} "
                  "copied from the reference")  # fmt: skip
    table.add_row("elements", f"{report.elements:,}")
    table.add_row("output", escape("\n".join(str(f) for f in report.files)))
    table.add_row("time", f"{report.seconds:.2f} s on {report.threads} thread(s)")
    console.print(table)
    return 0
