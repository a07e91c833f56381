"""Continual merging store: fold experts into a running merge as they arrive.

A store is a directory holding a copy of the base, the running merge state
(constant size, whatever the number of experts) and a JSON manifest. Every
change is atomic and writers are serialized by a lock.

Methods: opcm (default; --param alpha=0.5, zero_diagonal=true),
continual_task_arithmetic (scaling_factor=0.3), running_average,
continual_ties (scaling_factor=0.5, threshold=20, merge_func=sum),
magmax (scaling_factor=0.5).

examples:
  fedmerge continual init runs/store --base base.safetensors --method opcm --param alpha=0.5
  fedmerge continual add runs/store experts/task_a.safetensors
  fedmerge continual add runs/store experts/task_b/ --id task-b      # HF sharded directory
  fedmerge continual status runs/store
  fedmerge continual export runs/store --out merged.safetensors --dtype bfloat16

Over a Hugging Face model directory (docs/peft.md), experts may be PEFT LoRA
adapter directories, export -o DIR writes a directory transformers loads, and
export --as-adapter --rank R writes a LoRA adapter (truncated SVD):
  fedmerge continual init runs/store --base base/
  fedmerge continual add runs/store adapter_1/
  fedmerge continual export runs/store -o merged/
  fedmerge continual export runs/store -o merged_lora/ --as-adapter --rank 8

OPCM projects the weights of Linear layers only. In a bare checkpoint these
are the 2-D floating tensors whose name does not match
'embed|wte|wpe|lm_head|tok_|position'; --project REGEX replaces that rule
(exactly the 2-D keys matching REGEX) and --no-project REGEX removes keys.
"""

from __future__ import annotations

import argparse
import json

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from fedmerge.commands.merge import adapter_rank, add_adapter_arguments, svd_table
from fedmerge.registry import parse_assignments

NAME = "continual"
HELP = "continual merge store: init | add | export | status"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    init = sub.add_parser("init", help="create a store over a base checkpoint")
    init.add_argument("store", help="store directory (created)")
    init.add_argument("--base", required=True, help="base checkpoint (file or sharded dir)")
    init.add_argument("--method", default="opcm", help="continual method (default opcm; above)")
    init.add_argument("--param", action="append", default=[], metavar="K=V",
                      help="method parameter, repeatable (e.g. alpha=0.5)")  # fmt: skip
    init.add_argument("--project", metavar="REGEX",
                      help="project exactly the 2-D keys matching REGEX (opcm)")  # fmt: skip
    init.add_argument("--no-project", metavar="REGEX", help="never project keys matching REGEX")
    add = sub.add_parser("add", help="fold one expert checkpoint into the store")
    add.add_argument("store")
    add.add_argument("expert", help="expert checkpoint (file, sharded dir or LoRA adapter dir)")
    add.add_argument("--id", help="name recorded in the manifest (default: file name)")
    export = sub.add_parser("export", help="write the current merge as safetensors")
    export.add_argument("store")
    export.add_argument("-o", "--out", "--output", dest="out", required=True,
                        help="OUT.safetensors or a directory (as merge -o/--out)")  # fmt: skip
    export.add_argument("--dtype", help="cast floating tensors (float32, bfloat16, ...)")
    add_adapter_arguments(export)
    status = sub.add_parser("status", help="show steps, experts, norms and λ")
    status.add_argument("store")
    status.add_argument("--json", action="store_true", help="print the manifest as JSON")


def run(args: argparse.Namespace) -> int:
    from fedmerge.checkpoint import dtype_from_name
    from fedmerge.continual.store import ContinualStore

    console = Console()
    if args.action == "init":
        params = parse_assignments(args.param)
        store = ContinualStore.init(args.store, args.base, args.method, params, args.project,
                                    args.no_project)  # fmt: skip
        m = store.manifest()
        console.print(f"created {escape(args.store)}: {m['method']} {escape(str(m['params']))}, "
                      f"{len(m['projectable'])} projected keys")  # fmt: skip
    elif args.action == "add":
        with console.status(f"adding {escape(args.expert)}"):
            rec = ContinualStore(args.store).add(args.expert, args.id)
        lam = "" if rec["lambda"] is None else f", λ={rec['lambda']:.4f}"
        console.print(f"step {rec['step']}: added {escape(repr(rec['id']))} "
                      f"(‖τ‖={rec['tau_norm']:.4g}, "
                      f"‖θ−θ0‖={rec['merged_norm']:.4g}{lam})")  # fmt: skip
    elif args.action == "export" and adapter_rank(args) is not None:
        report = ContinualStore(args.store).export_adapter(args.out, args.rank, args.svd)
        console.print(svd_table(report))
        console.print(f"wrote {escape(args.out)} (adapter_config.json, adapter_model.safetensors)")
    elif args.action == "export":
        dtype = dtype_from_name(args.dtype) if args.dtype else None
        m = ContinualStore(args.store).export(args.out, dtype)
        what = f"{m['method']} merge of {m['step']} expert(s)"
        console.print(f"wrote {escape(str(args.out))}: {what}")
    else:
        m = ContinualStore(args.store).manifest()
        if args.json:
            print(json.dumps(m, indent=2))
        else:
            console.print(status_table(m))
    return 0


def status_table(m: dict) -> Table:
    """One row per expert: step, id, hash, time, ‖τ_i‖, ‖θ^(t) − θ_0‖, λ_t."""
    title = (f"{m['method']} {escape(str(m['params']))} · step {m['step']} · "
             f"{len(m['projectable'])} projected keys")  # fmt: skip
    table = Table(title=title)
    for col in ("step", "id", "sha256", "added (UTC)", "‖τ‖", "‖θ−θ0‖", "λ"):
        table.add_column(col, justify="right" if col.startswith(("‖", "λ", "step")) else "left")
    for rec in m["experts"]:
        lam = "–" if rec["lambda"] is None else f"{rec['lambda']:.4f}"
        when = rec["added_at"].replace("T", " ")[:19]
        table.add_row(str(rec["step"]), Text(rec["id"]), rec["hash"][:12], when,
                      f"{rec['tau_norm']:.4g}", f"{rec['merged_norm']:.4g}", lam)  # fmt: skip
    return table
