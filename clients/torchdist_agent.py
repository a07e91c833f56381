"""torchrun entry point: one fedmerge torch.distributed worker per process.

One host, four ranks (node i of the topology on rank i)::

    torchrun --nproc-per-node 4 -m clients.torchdist_agent CONFIG.yaml --out runs/td

Two hosts, two ranks each (run on both; HOST_A:29400 reachable from both)::

    torchrun --nnodes 2 --nproc-per-node 2 --rdzv-backend c10d \\
        --rdzv-endpoint HOST_A:29400 --rdzv-id fedmerge-1 \\
        -m clients.torchdist_agent CONFIG.yaml --set distributed.timeout_s=60 --out runs/td

Two hosts, each a deployed node with its own data and starting checkpoint (one rank each;
the node file names them, see docs/deployment.md)::

    torchrun --nnodes 2 --nproc-per-node 1 --node-rank 0 --master-addr HOST_A \\
        --master-port 29400 -m clients.torchdist_agent CONFIG.yaml --node-file node.yaml

With ``state_dir`` in the node files, add ``--max-restarts 3``: a killed node is started
again by torchrun and every rank resumes after the newest round all of them saved.

The leader (the lowest live rank) prints one line per round and writes the run's report
(config.yaml, metrics.jsonl, summary.json, plots) to ``--out`` (default ``runs/<name>``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from fedmerge.config import load_config
from fedmerge.decentralized.node import NODE_FILE_ENV
from fedmerge.errors import ConfigError, FedmergeError
from fedmerge.report import per_round, write_run
from fedmerge.runtimes.torchdist import exit_now, run_rank


def _print_round(rows: list[dict]) -> None:
    last = per_round(rows)[-1]
    acc = last["global_acc"]
    shown = "n/a" if acc is None else f"{acc:.3f}"
    print(f"round {last['round']}: global acc {shown}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="clients.torchdist_agent",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("config", help="simulation config (YAML), as for fedmerge simulate")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="K=V",
                        help="override a config field (repeatable), e.g. rounds=5")  # fmt: skip
    parser.add_argument("--out", help="report directory (default runs/<name>)")
    parser.add_argument(
        "--node-file",
        default=os.environ.get(NODE_FILE_ENV),
        help="this rank's node file ({rank} and {local_rank} are filled in; "
        "default $FEDMERGE_NODE_FILE; none: every rank builds the split)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    try:
        cfg = load_config(args.config, [*args.sets, "runtime=torchdist"])
        start = time.perf_counter()
        rows = run_rank(cfg, on_round=_print_round, node_file=args.node_file)
    except FedmergeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        exit_now(2 if isinstance(exc, ConfigError) else 1)
    if rows is not None:  # the leader
        out = Path(args.out or Path("runs") / cfg.name)
        extra = {"runtime": "torchdist", "elapsed_s": round(time.perf_counter() - start, 3)}
        write_run(out, cfg, rows, extra)
        print(f"wrote {out}/ (config.yaml, metrics.jsonl, summary.json, plots)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
