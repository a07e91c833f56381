"""Seconds per round: in process vs a real Flower deployment on loopback (SuperLink + 3 SuperNodes).

    nice -n 10 python benchmarks/flower_deploy.py                     # the two worker paths
    nice -n 10 python benchmarks/flower_deploy.py --paths worker+poll --trace /tmp/trace
    nice -n 10 python benchmarks/flower_deploy.py --paths clientapp --rounds 3   # before

The same work everywhere: gossip on a ring of 3, digits (IID), an MLP 64-1000-1000-10
(1.08M parameters, 4.3 MB payloads), ``train.steps`` SGD steps per round, torch on one
thread (``OMP_NUM_THREADS=1``). ``in-process``: the simulator's per-agent engine in this
process. The deployment paths start a fresh SuperLink (``--database``: in memory, Flower's
default, or ``file``: SQLite) and three SuperNodes, then ``flwr run . loopback``:

- ``worker+poll``: each SuperNode started through ``python -m
  fedmerge.runtimes.flower.supernode --poll-s 0.2`` (Flower's SuperNode with its idle poll
  at 0.2 s instead of 3 s, its waits on its ClientApp at 0.01 s, its object pulls retried
  after 0.01 s instead of 1 s) with ``--isolation process``, beside a long-lived agent
  worker (``python -m fedmerge.runtimes.flower.worker``) that keeps torch imported and the
  node's setup and agent in memory between messages;
- ``worker``: the same with ``flower-supernode`` itself;
- ``clientapp``: Flower's default ``--isolation subprocess``, one ``flwr-clientapp``
  process per message (imports torch and fedmerge, rebuilds the setup, reloads the agent).

Seconds per round: the median over rounds 2..R of each round's ``wall_s`` (round 1 carries
step 0 and the warm-up, shown apart); overhead: a path's seconds per round minus
in-process's. ``--repeats N`` runs every path N times, interleaved (in-process too).
``--trace DIR`` keeps each deployment's logs under DIR, with Flower's DEBUG logs (which add
their own cost), and prints where a step's time goes (:func:`breakdown`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
from datetime import datetime
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


def deployed(sets: list[str], path: str, timeout: float, database: str,
             trace: Path | None) -> tuple[float, float, list[dict]]:  # fmt: skip
    """(s/round, round 1's s, rows) of one fresh loopback deployment."""
    workers, poll = path != "clientapp", 0.2 if path == "worker+poll" else None
    env = {"OMP_NUM_THREADS": "1", **({"FLWR_LOG_LEVEL": "DEBUG"} if trace else {})}
    with tempfile.TemporaryDirectory(prefix="fedmerge-bench-") as tmp:
        folder = Path(tmp) if trace is None else Path(tempfile.mkdtemp(prefix=path, dir=trace))
        db = str(folder / "link.db") if database == "file" else None
        with Loopback(folder, workers=workers, poll_s=poll, database=db, env=env) as dep:
            dep.start()
            for i in range(3):
                dep.add_node(
                    f"node-{i}", f"partition-id={i} num-partitions=3 state-dir='{folder}/state'"
                )
            out = folder / "out"
            run_config = f"overrides='{' '.join(sets)}' out-dir='{out}' timeout={timeout}"
            dep.run(ROOT, run_config, timeout).wait(timeout=timeout * 8)
            metrics = out / "metrics.jsonl"
            if not metrics.exists():
                raise RuntimeError(f"no metrics; logs:\n{dep.tails()}")
        rows = [json.loads(x) for x in metrics.read_text().splitlines()]
        if trace:
            print(f"{path} (logs: {folder / 'logs'})")
            print(breakdown(folder / "logs"))
        return per_round(rows), rows[0]["wall_s"], rows


# ---------------------------------------------------------------- where a step's time goes
SN_EVENTS = {"Receiving:": "msg", "Received successfully": "objs", "Sending:": "send",
             "Sent successfully": "sent"}  # fmt: skip
STAMP = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}):\s+(.*)")
WORKER = re.compile(r"train\.step in [\d.]+ s \(pull ([\d.]+), app ([\d.]+), push ([\d.]+)\)")
RELAY = re.compile(r"(\d+) messages pushed in ([\d.]+) s, \d+ replies ([\d.]+) s later")
HOPS = [
    ("ServerApp push", "relay builds step k's messages, hashes and uploads them to the SuperLink"),
    ("SuperLink → SuperNode", "SuperNode's poll sees the message (after the relay starts)"),
    ("SuperNode pulls objects", "its inbox payloads from the SuperLink (waits for the upload)"),
    ("worker pulls", "from the SuperNode, after the SuperNode has them"),
    ("ClientApp", "merge, evaluate, train, publish, save the agent state"),
    ("worker pushes", "reply (payload + flat state) to the SuperNode"),
    ("SuperNode → SuperLink", "SuperNode sees the reply, uploads it to the SuperLink"),
    ("ServerApp pulls", "after the last node's upload: poll, download, decode, check"),
]


def _events(path: Path) -> list[tuple[datetime, str]]:
    out = []
    for line in re.sub(r"\x1b\[[0-9;]*m", "", path.read_text(errors="replace")).splitlines():
        if m := STAMP.search(line):
            out.append((datetime.strptime(m[1], "%Y-%m-%d %H:%M:%S,%f"), m[2]))
    return out


def breakdown(logs: Path) -> str:
    """A markdown table: the median seconds of each hop of a train step (steps 2..R; the
    node hops: mean over nodes), from the SuperNodes' DEBUG logs, the workers' per-task
    lines and the relay's per-step lines. Hops overlap a little: a receiver starts pulling
    while the sender still uploads."""
    relay = [(t, *map(float, m.groups())) for t, msg in _events(logs / "run.log")
             if (m := RELAY.search(msg))]  # fmt: skip
    steps = [(t.timestamp() - wait - push, push, t.timestamp()) for t, n, push, wait in relay
             if n == 3][1:]  # the first is the mapping query  # fmt: skip
    hops: list[list[float]] = [[] for _ in HOPS]
    for k, (start, push, end) in enumerate(steps[2:], start=2):
        nodes = []
        for i in range(3):
            ev = [(t.timestamp(), v) for t, msg in _events(logs / f"node-{i}.log")
                  for key, v in SN_EVENTS.items() if key in msg]  # fmt: skip
            when: dict[str, float] = {}
            for t, v in ev:  # the first of each event in this step
                if start <= t <= end:
                    when.setdefault(v, t)
            lines = _events(logs / f"node-{i}-worker.log")
            work = [tuple(map(float, m.groups())) for _, msg in lines if (m := WORKER.search(msg))]
            if len(when) < 4 or len(work) <= k:
                continue
            w_pull, app, w_push = work[k]
            done = when["send"]  # the SuperNode saw the reply right after the worker's push
            pulled = done - w_push - app
            nodes.append([when["msg"] - start, when["objs"] - when["msg"],
                          max(pulled - when["objs"], 0.0), app, w_push,
                          when["sent"] - done, when["sent"]])  # fmt: skip
        if not nodes:
            continue
        hops[0].append(push)
        for j in range(6):
            hops[j + 1].append(statistics.mean(n[j] for n in nodes))
        hops[7].append(end - max(n[6] for n in nodes))
    rows = [[name, f"{statistics.median(v):.2f}" if v else "—", what]
            for (name, what), v in zip(HOPS, hops, strict=True)]  # fmt: skip
    total = [e - s for s, _, e in steps[2:]]
    rows.append(
        [
            "step (relay push → all replies)",
            f"{statistics.median(total):.2f}" if total else "—",
            "measured, not summed",
        ]
    )
    return markdown(["hop", "median s", "what"], rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--paths", nargs="+", choices=PATHS[1:], default=["worker+poll", "worker"])
    ap.add_argument("--rounds", type=int, default=4, help="rounds per run (≥ 3)")
    ap.add_argument("--steps", type=int, default=2, help="SGD steps per round")
    ap.add_argument("--hidden", default="[1000,1000]", help="MLP hidden sizes")
    ap.add_argument("--timeout", type=float, default=300, help="seconds per step at most")
    ap.add_argument(
        "--database",
        choices=["memory", "file"],
        default="memory",
        help="the SuperLink's --database: in memory (default) or a SQLite file",
    )
    ap.add_argument("--repeats", type=int, default=1, help="runs of every path, interleaved")
    ap.add_argument(
        "--trace",
        type=Path,
        metavar="DIR",
        help="keep the logs (Flower DEBUG) under DIR and print each run's hops",
    )
    args = ap.parse_args()
    os.environ["OMP_NUM_THREADS"] = "1"
    sets = overrides(args.rounds, args.steps, args.hidden)
    if args.trace:
        args.trace.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[tuple[float, float, list[dict]]]] = {p: [] for p in PATHS}
    loads = []
    for _ in range(args.repeats):
        results["in-process"].append(in_process(sets))
        for path in args.paths:
            results[path].append(deployed(sets, path, args.timeout, args.database, args.trace))
            loads.append(os.getloadavg()[0])
    ref = results["in-process"][0][2]
    table = []
    for path, runs in results.items():
        if not runs:
            continue
        base = [b[0] for b in results["in-process"]]
        same = all(a["global_acc"] == b["global_acc"] for _, _, rows in runs
                   for a, b in zip(ref, rows, strict=True))  # fmt: skip
        table.append([path, ", ".join(f"{s:.2f}" for s, _, _ in runs),
                      ", ".join(f"{s - b:+.2f}" for (s, _, _), b in zip(runs, base, strict=True)),
                      ", ".join(f"{first:.1f}" for _, first, _ in runs),
                      "yes" if same else "NO"])  # fmt: skip
    print(f"gossip, ring of 3, MLP {args.hidden} ({params(sets):,} parameters), "
          f"{args.steps} SGD steps/round, {args.rounds} rounds, SuperLink database: "
          f"{args.database}; 1-min load average after each deployment: "
          f"{' '.join(f'{x:.1f}' for x in loads)}")  # fmt: skip
    print(markdown(["path", "s/round (each repeat)", "overhead s/round", "round 1 s",
                    "same accuracies"], table))  # fmt: skip


def params(sets: list[str]) -> int:
    from fedmerge.decentralized.setup import build_setup

    return sum(p.numel() for p in build_setup(default_config(sets)).model(0).parameters())


if __name__ == "__main__":
    main()
