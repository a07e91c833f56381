"""Continual dissemination on digits tasks: experts appear at nodes, spread, and are folded.

The experts are the continual recipe's (:mod:`fedmerge.continual.experts`): one
pretrained MLP body, one body fine-tuned per digits task, each task with its own head.
Expert k appears at one node in one round, travels over the topology as a task-vector
payload (id + content hash) and every node folds it into its own continual merger (OPCM
by default) when it first arrives (:func:`fedmerge.disseminate`). After every round each
node's merged body is scored with each task's head; reported per node and round: experts
held, accuracy on the tasks it holds and on every task that has appeared, and the rounds
until every node holds every expert next to the graph's diameter.

    fedmerge sweep simulations/dissemination/ring.yaml
    python simulations/dissemination/run.py --config simulations/dissemination/small_world.yaml
    fedmerge sweep simulations/dissemination/ring.yaml --set message_loss=0.3 --set forward=always

Writes to ``out``: ``metrics.jsonl`` (one row per node per round), ``summary.json`` and
``dissemination.png`` (experts held vs round per node; accuracy vs round).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from fedmerge import Arrival, DisseminationResult, disseminate
from fedmerge.config import NON_NEGATIVE, POSITIVE, PROBABILITY, option
from fedmerge.continual.experts import ExpertsConfig, Setup, evaluate, prepare
from fedmerge.errors import ConfigError
from fedmerge.recipe import Recipe
from fedmerge.report import Tick, pyplot, rich_table, save_png, write_json, write_jsonl
from fedmerge.topology import Topology, build_topology


@dataclass
class DisseminationConfig:
    name: str = option("dissemination", "run name (shown in tables and plots)")
    seed: int = option(0, "seed of message loss and of random graphs")
    topology: str | dict = option(
        "ring-8", "topology spec: preset, generator, YAML file or mapping (fedmerge topology)"
    )
    agents: int = option(0, "number of nodes (0: the topology's node count)", check=NON_NEGATIVE)
    rounds: int = option(12, "rounds to run", check=POSITIVE)
    experts: ExpertsConfig = field(default_factory=ExpertsConfig)
    arrivals: dict = option(
        {},
        "task name -> {node, round}: where and when its expert appears (rounds from 1); "
        "empty: task k (0-based) appears at node ⌊k·n/T⌋ in round 1 + k·arrival_interval",
    )
    arrival_interval: int = option(1, "rounds between default arrivals", check=POSITIVE)
    method: str = option("opcm", "continual merger every node runs", params="params",
                         registry="fedmerge.continual.methods:CONTINUAL_METHODS")  # fmt: skip
    params: dict = option({}, "the merger's parameters ({}: the method's defaults)")
    message_loss: float = option(0.0, "probability a payload is lost in transit", check=PROBABILITY)
    forward: str = option(
        "once",
        "once: a node forwards an expert the round after it first holds it; always: it "
        "re-sends every expert it holds every round (robust to loss, more bytes)",
        choices=("once", "always"),
    )
    codec: str = option("none", "how experts travel: encoded once with this codec (ternary: "
                        "ComPEFT), forwarded as those bytes", params="codec_params",
                        registry="fedmerge.codecs.registry:CODECS")  # fmt: skip
    codec_params: dict = option({}, "the codec's parameters (fedmerge compress --list)")
    out: str = option("runs/dissemination", "output directory")


def make_arrivals(cfg: DisseminationConfig, tasks: Sequence[str], n: int) -> list[Arrival]:
    """The configured arrivals, or the default spread (see ``arrivals``)."""
    if not cfg.arrivals:
        T = len(tasks)
        return [Arrival(t, k * n // T, 1 + k * cfg.arrival_interval) for k, t in enumerate(tasks)]
    out = []
    for task, where in cfg.arrivals.items():
        if not isinstance(where, dict) or set(where) != {"node", "round"}:
            raise ConfigError(f"arrivals.{task}: expected {{node: N, round: R}}, got {where!r}")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in where.values()):
            raise ConfigError(f"arrivals.{task}: node and round must be integers, got {where!r}")
        out.append(Arrival(str(task), where["node"], where["round"]))
    missing = sorted(set(tasks) - {a.expert for a in out})
    if missing:
        raise ConfigError(f"arrivals: no arrival for expert {missing[0]!r}")
    return out


@dataclass
class Outcome:
    """A finished run: the config, the experts' setup, topology and dissemination result."""

    config: DisseminationConfig
    setup: Setup
    topology: Topology
    result: DisseminationResult
    expert_acc: dict[str, float]  # each expert on its own task (upper reference)
    base_acc: dict[str, float]  # the pretrained body (lower reference)
    seconds: dict[str, float]


def run(cfg: DisseminationConfig, tick: Tick) -> Outcome:
    """Build the experts, then disseminate them over the topology."""
    t0 = time.perf_counter()
    try:
        topo = build_topology(cfg.topology, n=cfg.agents or None, seed=cfg.seed)
    except ConfigError as exc:
        raise ConfigError(f"topology: {exc}") from exc
    arrivals = make_arrivals(cfg, cfg.experts.tasks, topo.n)
    setup = prepare(cfg.experts, tick)
    names = setup.family.names
    t1 = time.perf_counter()

    def score(state):
        return dict(zip(names, evaluate(setup, state).tolist(), strict=True))

    experts = dict(zip(names, setup.experts, strict=True))
    result = disseminate(
        topo, setup.base, experts, arrivals, rounds=cfg.rounds, method=cfg.method,
        params=cfg.params, projectable=setup.projectable, message_loss=cfg.message_loss,
        forward=cfg.forward, seed=cfg.seed, evaluate=score, codec=cfg.codec,
        codec_params=cfg.codec_params,
        on_round=lambda rows: tick(f"round {rows[0]['round']}"),
    )  # fmt: skip
    expert_acc = {n: score(e)[n] for n, e in experts.items()}
    seconds = {"prepare": t1 - t0, "disseminate": time.perf_counter() - t1}
    return Outcome(cfg, setup, topo, result, expert_acc, score(setup.base), seconds)


def units(cfg: DisseminationConfig) -> int:
    """How many ``tick`` calls :func:`run` makes."""
    return 1 + len(cfg.experts.tasks) + cfg.rounds


# ----------------------------------------------------------------------------- report


def node_matrix(result: DisseminationResult, key: str) -> np.ndarray:
    """``(rounds, n)`` array of row field ``key`` (NaN where None)."""
    rounds = max(r["round"] for r in result.rows)
    out = np.full((rounds, len(result.nodes)), np.nan)
    for r in result.rows:
        if r[key] is not None:
            out[r["round"] - 1, r["node"]] = r[key]
    return out


def summary(outcome: Outcome) -> dict[str, Any]:
    """What ``summary.json`` holds (accuracies are fractions)."""
    res, cfg = outcome.result, outcome.config
    final = [r["acc_appeared"] for r in res.rows if r["round"] == cfg.rounds]
    final_acc = [a for a in final if a is not None]
    return {
        "experiment": "continual dissemination of digits-task experts",
        "config": dataclasses.asdict(cfg),
        "topology": outcome.topology.name,
        "nodes": outcome.topology.n,
        "diameter": res.diameter,
        "complete_round": res.complete_round,
        "arrivals": [a.__dict__ for a in res.arrivals],
        "spread_rounds": res.spread_rounds(),
        "eccentricity": res.eccentricity,
        "folds_per_node": [n.merger.step for n in res.nodes],
        "duplicates_per_node": [n.duplicates for n in res.nodes],
        "rejected_per_node": [len(n.rejected) for n in res.nodes],
        "merge_order_per_node": [n.order for n in res.nodes],
        "final_acc_mean": float(np.mean(final_acc)) if final_acc else None,
        "final_acc_min": float(np.min(final_acc)) if final_acc else None,
        "final_acc_max": float(np.max(final_acc)) if final_acc else None,
        "expert_acc": outcome.expert_acc,
        "pretrained_acc": outcome.base_acc,
        "experts_known": node_matrix(res, "experts_known").tolist(),
        "acc_known": node_matrix(res, "acc_known").tolist(),
        "bytes_sent_total": int(sum(r["bytes_sent"] for r in res.rows)),
        "seconds": outcome.seconds,
    }


def _pct(x: float | None) -> str:
    return "–" if x is None or np.isnan(x) else f"{100 * x:.1f}"


def round_rows(outcome: Outcome) -> list[list[str]]:
    """Per round: experts appeared, held (min/mean over nodes), nodes holding all, accuracy."""
    res, n = outcome.result, outcome.topology.n
    known = node_matrix(res, "experts_known")
    acc_known, acc_seen = node_matrix(res, "acc_known"), node_matrix(res, "acc_appeared")
    cells = []
    for t in range(known.shape[0]):
        rows = [r for r in res.rows if r["round"] == t + 1]
        cells.append([
            str(t + 1), str(rows[0]["experts_appeared"]), f"{known[t].min():.0f}",
            f"{known[t].mean():.1f}", f"{int((known[t] == len(res.arrivals)).sum())}/{n}",
            _pct(np.nanmean(acc_known[t])), _pct(np.nanmean(acc_seen[t])),
            f"{_pct(np.nanmin(acc_seen[t]))}–{_pct(np.nanmax(acc_seen[t]))}",
            f"{sum(r['bytes_sent'] for r in rows) / 1e6:.2f}",
        ])  # fmt: skip
    return cells


def show(outcome: Outcome, console: Console) -> None:
    """The per-round table, the per-expert spread table and the fold counts."""
    res, cfg = outcome.result, outcome.config
    title = (
        f"Continual dissemination ({cfg.method}) on {outcome.topology.name}, "
        f"n={outcome.topology.n}, diameter {res.diameter}, message loss {cfg.message_loss:g}"
    )
    caption = ("held: experts a node holds; all: nodes holding every expert; acc held: mean "
               "over nodes of the accuracy on the tasks each holds; acc appeared: on every task "
               "that has appeared anywhere (range: min–max over nodes)")  # fmt: skip
    headers = ["round", "appeared", "held min", "held mean", "all", "acc held %",
               "acc appeared %", "range", "MB sent"]  # fmt: skip
    console.print(rich_table(title, headers, round_rows(outcome), left=0, caption=caption))
    spread = res.spread_rounds()
    cells = [
        [a.expert, str(a.node), str(a.round), str(spread[a.expert] or "never"),
         str(res.eccentricity[a.expert]), _pct(outcome.expert_acc[a.expert]),
         _pct(outcome.base_acc[a.expert])]
        for a in res.arrivals
    ]  # fmt: skip
    title = (
        f"Rounds until every node holds each expert (diameter {res.diameter}; "
        f"all experts everywhere in round {res.complete_round or '–'})"
    )
    headers = ["expert", "node", "round", "rounds to all", "ecc(node)", "expert acc %",
               "pretrained %"]  # fmt: skip
    console.print(rich_table(title, headers, cells, left=0))
    folds = [n.merger.step for n in res.nodes]
    dups = sum(n.duplicates for n in res.nodes)
    console.print(f"folds per node: {folds}; duplicates skipped: {dups}")


def plot(outcome: Outcome, path: Path) -> None:
    """Left: experts held vs round, one line per node. Right: accuracy vs round (mean, range)."""
    res = outcome.result
    known = node_matrix(res, "experts_known")
    rounds = np.arange(1, known.shape[0] + 1)
    fig, (ax1, ax2) = pyplot().subplots(1, 2, figsize=(11, 4.2))
    for i in range(known.shape[1]):
        ax1.step(rounds, known[:, i] + 0.03 * (i - known.shape[1] / 2), where="mid", lw=1,
                 alpha=0.8, label=f"node {i}" if known.shape[1] <= 10 else None)  # fmt: skip
    appeared = [sum(a.round <= r for a in res.arrivals) for r in rounds]
    ax1.plot(rounds, appeared, "k--", lw=1.5, label="appeared")
    ax1.set(
        xlabel="round",
        ylabel="experts held",
        title=f"{outcome.topology.name}: experts held per node (diameter {res.diameter})",
    )
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=7, ncol=2)
    for key, label in (("acc_known", "tasks held"), ("acc_appeared", "tasks appeared")):
        acc = 100 * node_matrix(res, key)
        valid = ~np.isnan(acc).all(axis=1)
        (line,) = ax2.plot(rounds[valid], np.nanmean(acc[valid], 1), "-o", ms=3,
                           label=f"on {label} (mean over nodes)")  # fmt: skip
        ax2.fill_between(rounds[valid], np.nanmin(acc[valid], 1), np.nanmax(acc[valid], 1),
                         alpha=0.15, color=line.get_color())  # fmt: skip
    ax2.axhline(100 * np.mean(list(outcome.expert_acc.values())), ls="--", c="g", lw=1,
                label="experts on own task")  # fmt: skip
    ax2.axhline(100 * np.mean(list(outcome.base_acc.values())), ls=":", c="r", lw=1,
                label="pretrained body")  # fmt: skip
    ax2.set(
        xlabel="round",
        ylabel="accuracy (%)",
        title=f"{outcome.config.method}: accuracy (band: min–max over nodes)",
    )
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    save_png(fig, path)


def write(outcome: Outcome, out: Path) -> dict[str, Path]:
    """``metrics.jsonl``, ``summary.json`` and ``dissemination.png``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"metrics": out / "metrics.jsonl", "summary": out / "summary.json",
             "plot": out / "dissemination.png"}  # fmt: skip
    write_jsonl(paths["metrics"], outcome.result.rows)
    write_json(paths["summary"], summary(outcome))
    plot(outcome, paths["plot"])
    return paths


RECIPE = Recipe(
    "dissemination", DisseminationConfig, run=run, units=units, write=write, show=show, doc=__doc__
)

if __name__ == "__main__":
    raise SystemExit(RECIPE.main())
