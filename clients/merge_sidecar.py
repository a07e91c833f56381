"""torchrun entry point: a merge sidecar beside an external trainer, one rank per node.

The trainer writes ``ckpt-<step>.safetensors`` into DIR (temp file, then rename); every
``--period-s`` seconds the sidecar gossips the newest one with its neighbours (the run
config's topology and protocol) and writes ``merged-<round>.safetensors`` + ``merged.json``
into DIR for the trainer to resume from (docs/deployment.md, "Merge sidecar")::

    torchrun --nnodes 3 --nproc-per-node 1 --node-rank K --master-addr HOST_A \\
        --master-port 29400 --max-restarts 3 \\
        -m clients.merge_sidecar run.yaml --watch DIR --state STATE --period-s 60
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from fedmerge.config import load_config
from fedmerge.errors import ConfigError, FedmergeError
from fedmerge.runtimes.torchdist import connect, exit_now
from fedmerge.runtimes.torchdist.sidecar import Sidecar, SidecarOptions


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="clients.merge_sidecar", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("config", help="run config (YAML): topology, protocol, rounds, seed")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="K=V",
                        help="override a config field (repeatable)")  # fmt: skip
    parser.add_argument("--watch", required=True, type=Path,
                        help="the trainer's directory (ckpt-<step>.safetensors)")  # fmt: skip
    parser.add_argument("--state", required=True, type=Path, help="the sidecar's state directory")
    parser.add_argument("--reference", type=Path,
                        help="base checkpoint: publish task vectors (default: θ)")  # fmt: skip
    parser.add_argument("--period-s", type=float, default=60.0, help="seconds between rounds")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    opts = SidecarOptions(args.watch, args.state, args.reference, args.period_s)
    try:
        cfg = load_config(args.config, [*args.sets, "runtime=torchdist"])
        store, rank, world = connect(cfg.distributed.timeout_s)
        sidecar = Sidecar(cfg, store, rank, world, opts)
        sidecar.run(lambda s: print(f"round {s['round']}: merged {s['source']} "
                                    f"({s['received']} bytes in)", flush=True))  # fmt: skip
    except FedmergeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        exit_now(2 if isinstance(exc, ConfigError) else 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
