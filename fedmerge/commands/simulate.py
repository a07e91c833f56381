"""Simulate decentralized training: N agents train locally and merge with their neighbours.

With no CONFIG it runs the default (simulations/default.yaml: 8 agents on a ring, digits
split non-IID, class c on agent c mod 8, one shared init, 50 rounds of gossip averaging).
A CONFIG is a YAML file of fields (--fields lists them with their defaults; a field a file
leaves out takes the same default as the run without CONFIG); --set overrides any field by
its dotted name (the value is parsed as YAML). Unknown fields and bad values are errors
naming the field. A config is data, except model.name / data.name / train.loss of the form
pkg.module:function, which run that code: only modules listed in FEDMERGE_TRUSTED_MODULES
are imported (docs/reliability.md).

examples:
  fedmerge simulate                                   # the default
  fedmerge simulate --set protocol.name=local         # named "default protocol.name=local"
  fedmerge simulate simulations/default.yaml --set seed=3 --set topology=torus-4x4
  fedmerge simulate simulations/dimat.yaml            # DIMAT: align, then average
  fedmerge simulate simulations/flower.yaml           # on Flower's simulation engine
  fedmerge simulate simulations/torchdist.yaml        # on torch.distributed, 4 ranks
  fedmerge simulate --set faults.message_loss=0.2 --out runs/lossy
  fedmerge simulate --show-config                     # print the resolved config and stop

Every run writes to its own folder, runs/<name>-<date>-<time> (or --out DIR), and points
runs/latest at it: config.yaml (resolved), metrics.jsonl and .csv (one row per agent per
round: local_acc, global_acc, consensus, bytes_sent, bytes_received, rejected, wall_s, ...),
summary.json, accuracy.png and consensus.png. A sweep file goes to 'fedmerge sweep'.

Protocols: gossip (mixing-weighted averaging, D-PSGD), local (no communication),
centralized (one model on the union of the data), single_global_merge (sparse gossip, one
complete merge at the end), dimat / dimat_wm (align neighbours, then average), disseminate
(each agent's expert floods the graph; every node folds each one once, OPCM by default).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from fedmerge import report
from fedmerge.config import SimConfig, dump_config, field_docs, load_config
from fedmerge.errors import ConfigError
from fedmerge.report import Tick, per_round, round_table, summary_table, write_run
from fedmerge.runs import new_run_dir, run_name
from fedmerge.sweep import is_sweep_file

NAME = "simulate"
HELP = "run a decentralized training simulation (embedded default without CONFIG)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="YAML config (default: the embedded default)")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="K=V",
                        help="override a field, repeatable (e.g. --set train.lr=0.05)")  # fmt: skip
    parser.add_argument("--out", help="output directory (default: a new runs/<name>-<time>)")
    parser.add_argument("--runtime", help="where agents run: a registered runtime (see --fields; "
                        "default: the config's runtime, local)")  # fmt: skip
    parser.add_argument("--procs", type=int, default=0,
                        help="torchdist: local processes (default: one per agent)")  # fmt: skip
    parser.add_argument("--show-config", action="store_true",
                        help="print the resolved config and exit")  # fmt: skip
    parser.add_argument("--fields", action="store_true", help="list every config field and exit")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or tables")
    parser.add_argument("--verbose", action="store_true",
                        help="flower: let Flower's and Ray's own logs through")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    console = Console()
    if args.fields:
        for name, default, doc in field_docs():
            console.print(f"[bold]{name}[/bold] = {default!r}\n    {doc}", highlight=False)
        return 0
    if args.config and is_sweep_file(args.config):
        raise ConfigError(f"{args.config} is a sweep file: run 'fedmerge sweep {args.config}'")
    sets = list(args.sets) + ([f"runtime={args.runtime}"] if args.runtime else [])
    cfg = load_config(args.config, sets)
    cfg = dataclasses.replace(cfg, name=run_name(cfg.name, sets))
    if args.show_config:
        console.print(dump_config(cfg), end="", highlight=False)
        return 0
    start = time.perf_counter()
    rows, extra = simulate(cfg, progress=not args.quiet, procs=args.procs, verbose=args.verbose)
    extra["elapsed_s"] = round(time.perf_counter() - start, 3)
    out = Path(args.out) if args.out else new_run_dir(cfg.name)
    summary = write_run(out, cfg, rows, {**describe(cfg), **extra})
    if not args.quiet:
        console.print(round_table(rows, every=max(1, cfg.rounds // 10)))
        console.print(summary_table(summary))
    console.print(f"wrote {escape(str(out))}/ (config.yaml, metrics.jsonl/.csv, summary.json, "
                  "accuracy.png, consensus.png)", highlight=False)  # fmt: skip
    return 0


def describe(cfg: SimConfig) -> dict[str, Any]:
    """What ran, for the summary: topology, protocol, data and the accuracy of guessing."""
    import yaml

    from fedmerge.data.datasets import load_dataset

    classes = load_dataset(cfg.data.name, **cfg.data.options).num_classes
    topology = cfg.topology
    if not isinstance(topology, str):  # a mapping, shown as one line: {graph: ring, n: 6}
        topology = yaml.safe_dump(topology, default_flow_style=True, sort_keys=False).strip()
    return {
        "topology": topology,
        "protocol": cfg.protocol.name,
        "data": f"{cfg.data.name}, {cfg.data.partition} split",
        "chance_acc": 1 / classes,
    }


def simulate(
    cfg: SimConfig, *, progress: bool = True, procs: int = 0, verbose: bool = False
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Run ``cfg`` on its runtime; return the metrics rows and extra summary fields."""
    from fedmerge.runtimes import run

    options: dict[str, Any] = {"procs": procs} if cfg.runtime == "torchdist" and procs else {}
    if cfg.runtime == "flower" and verbose:
        options["verbose"] = True
    with report.progress(cfg.rounds, cfg.name, enabled=progress, status=True) as tick:
        return run(cfg, on_round=_round_status(tick), **options)


def _round_status(tick: Tick) -> Callable[[list[dict[str, Any]]], None]:
    """An ``on_round`` callback advancing the bar and showing the latest mean accuracy."""

    def on_round(rows: list[dict[str, Any]]) -> None:
        acc = per_round(rows)[-1]["global_acc"]
        tick(status="" if acc is None else f"global acc {acc:.3f}")

    return on_round
