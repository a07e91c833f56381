"""Seconds per round: in process vs a real Flower deployment on loopback (SuperLink + 3 SuperNodes).

    nice -n 10 python benchmarks/flower_deploy.py                     # the two worker paths
    nice -n 10 python benchmarks/flower_deploy.py --paths clientapp --rounds 3   # before

The same work everywhere: gossip on a ring of 3, digits (IID), an MLP 64-1000-1000-10
(1.07M parameters, 4.3 MB payloads), ``train.steps`` SGD steps per round, torch on one
thread (``OMP_NUM_THREADS=1``). ``in-process``: the simulator's per-agent engine in this
process. The deployment paths start a fresh SuperLink and three SuperNodes, then
``flwr run . loopback``:

- ``worker`` (now): each SuperNode runs with ``--isolation process`` beside a long-lived
  agent worker (``python -m fedmerge.runtimes.flower.worker``) that keeps torch imported and
  the node's setup and agent in memory between messages;
- ``worker+poll``: the same, the SuperNodes started through
  ``python -m fedmerge.runtimes.flower.supernode --poll-s 0.2`` (Flower's SuperNode polling
  its SuperLink every 0.2 s instead of 3 s while idle);
- ``clientapp`` (before): Flower's default ``--isolation subprocess``, one ``flwr-clientapp``
  process per message (imports torch and fedmerge, rebuilds the setup, reloads the agent).

Seconds per round: the median over rounds 2..R of each round's ``wall_s`` (round 1 carries
step 0 and the warm-up); overhead: a path's seconds per round minus in-process's. Round 1 (with the
nodes' warm-up) is shown apart.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fedmerge.config import default_config  # noqa: E402
from fedmerge.report.tables import markdown  # noqa: E402
from fedmerge.runtimes.flower.loopback import Loopback  # noqa: E402
from fedmerge.runtimes.local.simulator import Simulator  # noqa: E402

PATHS = ("in-process", "worker+poll", "worker", "clientapp")


def overrides(rounds: int, steps: int, hidden: str) -> list[str]:
    return ["topology=ring", "agents=3", f"rounds={rounds}", "data.partition=iid",
            f"model.options.hidden={hidden}", f"train.steps={steps}", "vectorize=never",
            "threads=1"]  # fmt: skip


def per_round(rows: list[dict]) -> float:
    walls = [r["wall_s"] for r in rows if r["agent"] == 0 and r["round"] > 1]
    return statistics.median(walls)


def in_process(sets: list[str]) -> tuple[float, float, list[dict]]:
    rows = Simulator(default_config(sets)).run()
    return per_round(rows), rows[0]["wall_s"], rows


def deployed(sets: list[str], path: str, timeout: float) -> tuple[float, float, list[dict]]:
    """(s/round, round 1's s, rows) of one fresh loopback deployment."""
    workers, poll = path != "clientapp", 0.2 if path == "worker+poll" else None
    with tempfile.TemporaryDirectory(prefix="fedmerge-bench-") as tmp, Loopback(
        Path(tmp), workers=workers, poll_s=poll, env={"OMP_NUM_THREADS": "1"}
    ) as dep:  # fmt: skip
        dep.start()
        for i in range(3):
            dep.add_node(f"node-{i}", f"partition-id={i} num-partitions=3 state-dir='{tmp}/state'")
        out = Path(tmp) / "out"
        run_config = f"overrides='{' '.join(sets)}' out-dir='{out}' timeout={timeout}"
        proc = dep.run(ROOT, run_config, timeout)
        proc.wait(timeout=timeout * 8)
        metrics = out / "metrics.jsonl"
        if not metrics.exists():
            raise RuntimeError(f"no metrics; logs:\n{dep.tails()}")
        rows = [json.loads(x) for x in metrics.read_text().splitlines()]
        return per_round(rows), rows[0]["wall_s"], rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--paths", nargs="+", choices=PATHS[1:], default=["worker+poll", "worker"])
    ap.add_argument("--rounds", type=int, default=4, help="rounds per run (≥ 2)")
    ap.add_argument("--steps", type=int, default=2, help="SGD steps per round")
    ap.add_argument("--hidden", default="[1000,1000]", help="MLP hidden sizes")
    ap.add_argument("--timeout", type=float, default=300, help="seconds per step at most")
    args = ap.parse_args()
    os.environ["OMP_NUM_THREADS"] = "1"
    sets = overrides(args.rounds, args.steps, args.hidden)
    results = {"in-process": in_process(sets)}
    for path in args.paths:
        results[path] = deployed(sets, path, args.timeout)
    base = results["in-process"][0]
    ref = results["in-process"][2]
    table = []
    for path, (s, first, rows) in results.items():
        same = all(a["global_acc"] == b["global_acc"] for a, b in zip(ref, rows, strict=True))
        table.append([path, f"{s:.2f}", f"{s - base:+.2f}", f"{s / base:.1f}×", f"{first:.1f}",
                      "yes" if same else "NO"])  # fmt: skip
    load = os.getloadavg()
    print(f"gossip, ring of 3, MLP {args.hidden} ({params(sets):,} parameters), "
          f"{args.steps} SGD steps/round, {args.rounds} rounds; load average "
          f"{load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")  # fmt: skip
    print(markdown(["path", "s/round", "overhead s/round", "× in-process", "round 1 s",
                    "same accuracies"], table))  # fmt: skip


def params(sets: list[str]) -> int:
    from fedmerge.decentralized.setup import build_setup

    return sum(p.numel() for p in build_setup(default_config(sets)).model(0).parameters())


if __name__ == "__main__":
    main()
