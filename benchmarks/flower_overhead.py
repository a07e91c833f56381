"""Seconds per round and peak memory: Flower's simulation engine (Ray) vs the in-process simulator.

    python benchmarks/flower_overhead.py --suite          # issue 20's cases, ratios vs targets
    python benchmarks/flower_overhead.py                  # 4 agents, 6 rounds
    python benchmarks/flower_overhead.py --agents 10 100 --rounds 12 --eval-every 5
    python benchmarks/flower_overhead.py --agents 10 --hidden 1000 1000   # a 1.08M-parameter MLP
    python benchmarks/flower_overhead.py --agents 2 --rounds 3 --hidden 7000 7000  # 198 MB payloads

Same workload on every engine: gossip on a ring of N agents, digits (IID split), an MLP
64-hidden-10 (``--hidden 128``: 9,610 parameters; ``1000 1000``: 1,076,010), 2 SGD steps per
round (batch 32). Engines:

- ``per-agent``: fedmerge's in-process simulator, one Agent per node (``vectorize: never``);
- ``auto``: the simulator as a user gets it (``vectorize: auto``; the table says which
  engine it chose), both with ``metrics.eval_every`` = ``--eval-every`` (accuracy measured
  every k rounds and on the last);
- ``auto-eval1``: the same, measuring accuracies every round (``eval_every: 1``; it still
  evaluates more than Flower: accuracy after training as well as after merging, and the
  disagreement measure);
- ``flower``: the same agents as Flower ClientApps on Flower's simulation engine (Ray, 2 CPUs,
  1 per client), relayed by a ServerApp; every client evaluates every round.

fedmerge's engines run through the local runtime with the config's ``threads`` (default 1).
Each engine runs in a fresh child process; its peak memory is the largest summed RSS of the
child's process tree (Ray's GCS, raylet and workers included), sampled every 0.1 s.
Seconds per round: the mean wall time of rounds 2 … R−1 (round 1 warms up; Flower's last
step only merges and evaluates), from the simulator's ``wall_s`` and, for Flower, as the
relay measures it; Ray's start-up is shown separately.

CPU seconds per round (second table): the same rounds' user + system CPU time, of the child
process for fedmerge and of the child and all its descendants (driver, Ray's GCS, raylet,
workers) for Flower; on a loaded machine it moves far less than wall time.

Each engine runs ``--repeats`` times (default 3), interleaved (a, b, c, a, b, c, ...) so that
a change in machine load hits every engine alike; the tables show the median of the runs'
seconds per round and their spread (slowest / fastest run). The load average is printed
before and after each case. ``--suite`` runs the cases of issue 20 (``SUITE``) and checks
the targets: fedmerge (``auto``) ≥ 20× faster per round than Flower with the 10k-parameter
MLP at 10, 100 and 1,000 agents, ≥ 1× with the 1M-parameter MLP, spreads ≤ 1.5×.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

ENGINES = ("per-agent", "auto", "auto-eval1", "flower")
VECTORIZE = {"per-agent": "never", "auto": "auto", "auto-eval1": "auto"}


@dataclass(frozen=True)
class Case:
    """One row of the suite: ``rounds`` for fedmerge's engines, ``flower_rounds`` and
    ``flower_repeats`` for Flower (1,000 Ray clients take about a minute per round on two
    cores, so that case measures fewer), and the speed-up over Flower it must reach."""

    agents: int
    hidden: tuple[int, ...]
    rounds: int
    flower_rounds: int
    flower_repeats: int
    target: float


# fedmerge's rounds: enough that a run lasts seconds, not milliseconds (a 10-agent round is
# ~6 ms of CPU; over 10 rounds one scheduler stall on a busy machine decided a run's mean)
SUITE = (
    Case(10, (128,), 102, 8, 2, 20.0),
    Case(100, (128,), 32, 6, 2, 20.0),
    Case(1000, (128,), 12, 4, 1, 20.0),
    Case(10, (1000, 1000), 22, 6, 2, 1.0),
)
SPREAD_TARGET = 1.5


def workload(n: int, rounds: int, engine: str, hidden: list[int], eval_every: int):
    from fedmerge.config import default_config

    local = [] if engine == "flower" else [f"vectorize={VECTORIZE[engine]}"]
    if engine != "flower":
        local.append(f"metrics.eval_every={1 if engine == 'auto-eval1' else eval_every}")
    return default_config([
        f"agents={n}", "topology=ring", f"rounds={rounds}", "data.partition=iid",
        f"model.options.hidden={hidden}", "train.steps=2", *local,
    ])  # fmt: skip


def child(engine: str, n: int, rounds: int, hidden: list[int], eval_every: int) -> None:
    """Run one engine; print {"per_round", "cpu_round", "startup", "acc", "params", "path"}
    as JSON. ``cpu_round``: CPU seconds per round of this process and its descendants (Ray's
    processes for Flower), read when each round's rows arrive."""
    from fedmerge.decentralized.setup import build_setup

    cfg = workload(n, rounds, engine, hidden, eval_every)
    details: dict = {"path": "flower"}
    cpu: list[float] = []
    clock = (lambda: tree_stats(os.getpid())[1]) if engine == "flower" else time.process_time
    on_round = lambda rows: cpu.append(clock())  # noqa: E731
    start = time.perf_counter()
    if engine == "flower":
        from fedmerge.runtimes import flower

        rows = flower.run(cfg, num_cpus=2, client_cpus=1, on_round=on_round)
    else:
        from fedmerge.runtimes import local

        rows = local.run(cfg, details=details, on_round=on_round)
    total = time.perf_counter() - start
    walls = [r["wall_s"] for r in rows if r["agent"] == 0]
    last = [r["global_acc"] for r in rows if r["round"] == rounds]
    params = sum(p.numel() for p in build_setup(cfg).model(0).parameters())
    print(json.dumps({"per_round": statistics.mean(walls[1:-1]),
                      "cpu_round": (cpu[-2] - cpu[0]) / (len(cpu) - 2),
                      "startup": total - sum(walls), "acc": sum(last) / len(last),
                      "params": params, "path": details["path"]}))  # fmt: skip


def tree_stats(root: int) -> tuple[int, float]:
    """(summed RSS in bytes, summed user + system CPU seconds) of ``root`` and all its
    living descendants (from /proc)."""
    parents: dict[int, int] = {}
    stats: dict[int, tuple[int, float]] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            parents[int(entry.name)] = int(fields[1])
            cpu = (int(fields[11]) + int(fields[12])) / tick
            stats[int(entry.name)] = (int(fields[21]) * os.sysconf("SC_PAGE_SIZE"), cpu)
        except (OSError, ValueError, IndexError):
            continue
    rss, cpu, todo = 0, 0.0, [root]
    while todo:
        pid = todo.pop()
        got = stats.get(pid, (0, 0.0))
        rss, cpu = rss + got[0], cpu + got[1]
        todo += [c for c, p in parents.items() if p == pid]
    return rss, cpu


def measure(engine: str, n: int, rounds: int, hidden: list[int], eval_every: int) -> dict:
    """One run of ``engine`` with ``n`` agents in a fresh child process, plus its peak RSS."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    cmd = [sys.executable, __file__, "--child", engine, "--agents", str(n), "--rounds",
           str(rounds), "--eval-every", str(eval_every), "--hidden", *map(str, hidden)]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, tree_stats(proc.pid)[0])
        time.sleep(0.1)
    out = proc.stdout.read().decode().strip().splitlines()
    if proc.returncode or not out:
        raise SystemExit(f"{engine} with {n} agents failed (exit {proc.returncode})")
    return {**json.loads(out[-1]), "peak_mb": peak / 2**20}


def repeated(case: Case, engines: list[str], repeats: int, eval_every: int) -> dict[str, dict]:
    """Every engine ``repeats`` times (Flower ``case.flower_repeats`` at most), interleaved:
    per engine the median seconds per round over the runs, their spread (max / min), the
    number of runs and rounds, and the median run's other fields."""
    runs: dict[str, list[dict]] = {e: [] for e in engines}
    for k in range(repeats):
        for e in engines:
            if e == "flower" and k >= case.flower_repeats:
                continue
            rounds = case.flower_rounds if e == "flower" else case.rounds
            runs[e].append(measure(e, case.agents, rounds, list(case.hidden), eval_every))
    out = {}
    for e, rs in runs.items():
        secs = sorted(r["per_round"] for r in rs)
        cpus = sorted(r["cpu_round"] for r in rs)
        mid = sorted(rs, key=lambda r: r["per_round"])[len(rs) // 2]
        rounds = case.flower_rounds if e == "flower" else case.rounds
        out[e] = {**mid, "per_round": statistics.median(secs), "spread": secs[-1] / secs[0],
                  "cpu_round": statistics.median(cpus), "cpu_spread": cpus[-1] / cpus[0],
                  "runs": len(rs), "rounds": rounds}  # fmt: skip
    return out


def report(cases: list[Case], engines: list[str], repeats: int, eval_every: int) -> None:
    """Run the cases; print the wall-time and CPU-time tables, then each case's runs and
    ratios against the targets."""
    console = Console(width=220)
    results = []
    for case in cases:
        before = os.getloadavg()[0]
        res = repeated(case, engines, repeats, eval_every)
        results.append((case, res, f"{before:.1f}/{os.getloadavg()[0]:.1f}"))
        console.print("\n".join(checks(case, res)), style="dim")  # progress, repeated below
    for metric, spread, what in (("per_round", "spread", "wall seconds"),
                                 ("cpu_round", "cpu_spread", "CPU seconds")):  # fmt: skip
        console.print(cost_table(results, engines, eval_every, metric, spread, what))
    console.print(f"peak MB: {' / '.join(engines)}; load: 1-minute load average before/after")
    for case, res, _ in results:
        console.print("\n".join(checks(case, res)))


def cost_table(results, engines: list[str], eval_every: int, metric: str, spread: str,
               what: str) -> Table:  # fmt: skip
    """One table of ``metric`` per round (median of the runs × their spread) and ratios."""
    table = Table(title=f"gossip on a ring, 2 SGD steps per round, eval every {eval_every} "
                  f"(auto-eval1: every round): {what} per round, median of the runs "
                  "(× spread: slowest / fastest run)")  # fmt: skip
    ratio_cols = [f"flower / {e}" for e in engines if e != "flower" and "flower" in engines]
    for col in ("agents", "params", *engines, *ratio_cols, "auto chose", "Ray start s",
                "peak MB", "load"):  # fmt: skip
        table.add_column(col, justify="right")
    for case, res, load in results:
        sec = {e: res[e][metric] for e in engines}
        table.add_row(
            str(case.agents), f"{res[engines[0]]['params']:,}",
            *(f"{sec[e]:.4f} ×{res[e][spread]:.2f}" for e in engines),
            *(f"{sec['flower'] / sec[r.split(' / ')[1]]:.1f}×" for r in ratio_cols),
            res["auto"]["path"] if "auto" in res else "-",
            f"{res['flower']['startup']:.0f}" if "flower" in res else "-",
            "/".join(f"{res[e]['peak_mb']:.0f}" for e in engines), load,
        )  # fmt: skip
    return table


def checks(case: Case, res: dict[str, dict]) -> list[str]:
    """The case's runs, accuracies, speed-up over Flower and spreads against the targets."""
    tag = f"{case.agents} agents × {res[next(iter(res))]['params']:,} params"
    runs = ", ".join(f"{e} {r['runs']}×{r['rounds']}" for e, r in res.items())
    accs = ", ".join(f"{e} {r['acc']:.3f}" for e, r in res.items())
    out = [f"{tag}: runs × rounds: {runs}; final accuracy: {accs}"]
    for metric, spread, what in (("per_round", "spread", "wall"), ("cpu_round", "cpu_spread",
                                                                   "CPU")):  # fmt: skip
        if "flower" in res and "auto" in res:
            got = res["flower"][metric] / res["auto"][metric]
            ok = "met" if got >= case.target else f"MISSED by {case.target / got:.2f}×"
            out.append(f"{tag}: {what} flower / auto = {got:.1f}× (target ≥ {case.target:g}×)"
                       f": {ok}")  # fmt: skip
        for e in ("per-agent", "auto", "auto-eval1"):
            if e in res and res[e]["runs"] > 1:
                s = res[e][spread]
                ok = "met" if s <= SPREAD_TARGET else "MISSED"
                out.append(f"{tag}: {what} {e} spread {s:.2f}× (target ≤ {SPREAD_TARGET}×): {ok}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", action="store_true",
                        help="issue 20's cases (10/100/1,000 agents × 10k params, 10 × 1M) and "
                        "the targets; --agents/--rounds/--hidden are ignored")  # fmt: skip
    parser.add_argument("--agents", type=int, nargs="+", default=[4])
    parser.add_argument("--rounds", type=int, default=6, help="rounds (≥ 3) of every engine")
    parser.add_argument("--hidden", type=int, nargs="+", default=[128], help="MLP hidden sizes")
    parser.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES))
    parser.add_argument("--repeats", type=int, default=3, help="runs per engine, interleaved")
    parser.add_argument("--eval-every", type=int, default=5,
                        help="metrics.eval_every of per-agent and auto")  # fmt: skip
    parser.add_argument("--child", choices=ENGINES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.repeats < 1 or args.eval_every < 1 or args.rounds < 3:
        parser.error("--repeats and --eval-every must be >= 1, --rounds >= 3")
    if args.child:
        child(args.child, args.agents[0], args.rounds, args.hidden, args.eval_every)
        return
    cases = list(SUITE) if args.suite else [
        Case(n, tuple(args.hidden), args.rounds, args.rounds, args.repeats,
             20.0 if args.hidden == [128] else 1.0)
        for n in args.agents
    ]  # fmt: skip
    print(f"load average at start: {os.getloadavg()}; {os.cpu_count()} CPUs")
    report(cases, args.engines, args.repeats, args.eval_every)


if __name__ == "__main__":
    main()
