"""Compress an expert's task vector into one small file (ComPEFT ternary by default).

Writes C(θ_expert − θ_base) for every floating tensor as safetensors whose header
names the codec and its parameters. `fedmerge merge` and `fedmerge continual add`
accept the file as an expert (given the same base); integer tensors come from the
base. Codecs: ternary (ComPEFT: top-k entries as sign × one scale per tensor), topk,
quantize, lowrank, none (see --list).

examples:
  fedmerge compress --list
  fedmerge compress --list ternary
  fedmerge compress expert.safetensors --base base.safetensors -o expert.ternary.safetensors
  fedmerge compress expert/ --base base/ -o e.safetensors --codec ternary --param density=0.05
  fedmerge compress expert.safetensors --base base.safetensors -o e.q4.safetensors \\
      --codec quantize --param bits=4
  fedmerge merge ties --base base.safetensors e.safetensors other.safetensors -o merged.safetensors
"""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.table import Table

from fedmerge.commands.merge import registry_table
from fedmerge.errors import ConfigError

NAME = "compress"
HELP = "compress an expert's task vector (ComPEFT ternary, top-k, quantize, low rank)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("expert", nargs="?", help="fine-tuned checkpoint (file or sharded dir)")
    parser.add_argument("--list", nargs="?", const="", metavar="CODEC",
                        help="list codecs (or one codec's parameters), exit")  # fmt: skip
    parser.add_argument("--base", metavar="REF", help="reference checkpoint θ_base")
    parser.add_argument("-o", "--out", metavar="OUT", help="output .safetensors file")
    parser.add_argument("--codec", default="ternary", help="codec (default ternary; see --list)")
    parser.add_argument(
        "-p", "--param", action="append", metavar="K=V", help="codec parameter (repeatable)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of random codec choices")


def codec_table(codec: str | None = None) -> Table:
    """Every codec with its parameters' defaults, or one codec's parameters in full."""
    from fedmerge.codecs import CODECS

    hint = "fedmerge compress --list CODEC: its parameters in full"
    return registry_table(CODECS, codec, "codec", title="fedmerge codecs", caption=hint)


def run(args: argparse.Namespace) -> int:
    console = Console()
    if args.list is not None:
        console.print(codec_table(args.list or None))
        return 0
    given = {"EXPERT": args.expert, "--base": args.base, "-o/--out": args.out}
    missing = [flag for flag, value in given.items() if not value]
    if missing:
        raise ConfigError(f"{' and '.join(missing)} required")
    from fedmerge.codecs.expert import compress_checkpoint
    from fedmerge.registry import parse_assignments

    report = compress_checkpoint(args.expert, args.base, args.out, args.codec,
                                 parse_assignments(args.param), args.seed)  # fmt: skip
    table = Table(title=f"compressed with {report.codec}", show_header=False)
    table.add_row("parameters", ", ".join(f"{k}={v}" for k, v in report.params.items()) or "-")
    table.add_row("task vector", f"{report.dense_bytes:,} bytes (floating tensors, dense)")
    ratio = report.dense_bytes / report.file_bytes
    table.add_row("file", f"{report.file_bytes:,} bytes ({ratio:.1f}× smaller)")
    table.add_row("output", str(report.path))
    console.print(table)
    return 0
