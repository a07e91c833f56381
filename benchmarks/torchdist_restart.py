"""torchrun restart and resume: how long a killed node takes to be back, and what is lost.

A ring of 3 deployed nodes (``export_split`` node directories with a ``state_dir``), 5 rounds
of gossip, ``torchrun --max-restarts 1``. Rank 1 SIGKILLs itself at the first training step
of round ``--kill-round`` (``tests.torchdist_faults:sigkill_cross_entropy``); torchrun starts
the ranks again and every rank resumes at the newest round all saved. Two layouts: one
torchrun with 3 workers (one host), three torchruns with one worker each (three "hosts",
static rendezvous, ``on_peer_failure: abort``). Printed per layout:

  cold start   launch → round 1 saved by every rank (process start, imports, setup): the
               baseline, measured in the same run
  rejoin       kill → the killed round saved again by every rank
  ratio        rejoin / cold start
  redone       completed rounds done again (newest saved round of any rank − resumed round)

    python benchmarks/torchdist_restart.py
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fedmerge.config import load_config  # noqa: E402
from fedmerge.decentralized.nodedirs import export_split  # noqa: E402

STEPS = 3  # training steps per round


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(tmp: Path, hosts: int, kill_round: int) -> tuple[float, str, dict]:
    """Run the restart scenario; returns (launch time, every torchrun's stderr, the mtimes
    of every round.json seen while it ran)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
           "FEDMERGE_TRUSTED_MODULES": "tests", "FEDMERGE_TEST_KILL_RANK": "1",
           "FEDMERGE_TEST_KILL_MARK": str(tmp / "killed.json"),
           "FEDMERGE_TEST_KILL_STEP": str(STEPS * (kill_round - 1) + 1)}  # fmt: skip
    base = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node",
            str(3 // hosts), "--max-restarts", "1"]  # fmt: skip
    if hosts > 1:
        base += ["--nnodes", str(hosts), "--master-addr", "127.0.0.1",
                 "--master-port", str(free_port())]  # fmt: skip
    agent = ["-m", "clients.torchdist_agent", str(tmp / "run.yaml"), "--out", str(tmp / "o"),
             "--node-file", str(tmp / "nodes" / "node-{rank}" / "node.yaml")]  # fmt: skip
    start = time.time()  # the saved files' mtimes are on the same clock
    logs = [(tmp / f"torchrun-{k}.log").open("w") for k in range(hosts)]
    procs = [subprocess.Popen([*base, *(["--node-rank", str(k)] if hosts > 1 else []), *agent],
                              cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=logs[k])
             for k in range(hosts)]  # fmt: skip
    seen: dict[tuple[str, str], set[float]] = {}  # (node, round) → mtimes of its round.json
    while any(p.poll() is None for p in procs):
        for mark in tmp.glob("nodes/node-*/state/round-*/round.json"):
            with contextlib.suppress(FileNotFoundError):  # pruned meanwhile
                seen.setdefault((mark.parts[-4], mark.parts[-2]), set()).add(mark.stat().st_mtime)
        time.sleep(0.05)
    for f in logs:
        f.close()
    errors = "".join((tmp / f"torchrun-{k}.log").read_text() for k in range(hosts))
    if any(p.returncode for p in procs):
        raise SystemExit(f"torchrun failed:\n{errors[-3000:]}")
    return start, errors, seen


def saved_at(seen: dict, r: int, after: float) -> float:
    """When every node had saved round r after time ``after`` (first such round.json)."""
    name = f"round-{r:06d}"
    return max(min(t for t in times if t > after) for (_, g), times in seen.items() if g == name)


def scenario(hosts: int, policy: str, kill_round: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="fedmerge-restart-") as name:
        tmp = Path(name)
        run = tmp / "run.yaml"
        run.write_text(
            f"topology: {{graph: ring, n: 3}}\nrounds: 5\nvectorize: never\ntrain: {{steps: "
            f"{STEPS}, loss: 'tests.torchdist_faults:sigkill_cross_entropy'}}\nprotocol: "
            f"{{name: gossip}}\ndistributed: {{timeout_s: 60, on_peer_failure: {policy}}}\n"
        )
        os.environ["FEDMERGE_TRUSTED_MODULES"] = "tests"
        export_split(load_config(run, ["runtime=torchdist"]), tmp / "nodes")
        start, errors, seen = launch(tmp, hosts, kill_round)
        killed = json.loads((tmp / "killed.json").read_text())["time"]
        held = [int(m[1]) for m in re.finditer(r"its newest saved round: (\d+)", errors)]
        resumed = {int(m[1]) for m in re.finditer(r"resumed after round (\d+)", errors)}
        return {
            "layout": f"{hosts} torchrun(s) × {3 // hosts} rank(s), {policy}",
            "cold start s": saved_at(seen, 1, start) - start,
            "rejoin s": saved_at(seen, kill_round, killed) - killed,
            "resumed after": sorted(resumed),
            "redone": max(held) - min(resumed),
        }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--kill-round", type=int, default=4, choices=range(2, 6),
                        help="the round rank 1 dies in (default 4)")  # fmt: skip
    args = parser.parse_args()
    rows = [scenario(1, "continue", args.kill_round), scenario(3, "abort", args.kill_round)]
    print("| layout | cold start s | rejoin s | ratio | resumed after round | rounds redone |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        cold, rejoin = r["cold start s"], r["rejoin s"]
        print(f"| {r['layout']} | {cold:.1f} | {rejoin:.1f} | {rejoin / cold:.2f} | "
              f"{r['resumed after']} | {r['redone']} |")  # fmt: skip


if __name__ == "__main__":
    main()
