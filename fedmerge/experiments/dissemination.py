"""Continual dissemination on digits tasks: experts appear at nodes, spread, and are folded.

The experts are the continual-merging experiment's (:mod:`fedmerge.experiments.continual_tasks`):
one pretrained MLP body, one body fine-tuned per digits task, each task with its own head.
Expert k appears at one node in one round, travels over the topology as a task-vector
payload (id + content hash) and every node folds it into its own continual merger (OPCM by
default) when it first arrives (:func:`fedmerge.decentralized.dissemination.disseminate`).
After every round each node's merged body is scored with each task's head; reported per
node and round:
experts held, accuracy on the tasks it holds and on every task that has appeared, and the
rounds until every node holds every expert next to the graph's diameter.

Run it (a few seconds on 2 CPU cores)::

    python -m fedmerge.experiments.dissemination --config simulations/dissemination_ring.yaml
    python -m fedmerge.experiments.dissemination --config simulations/dissemination_small_world.yaml
    python -m fedmerge.experiments.dissemination --set message_loss=0.3 --set forward=always

Outputs in ``--out`` (default: the config's ``out``): ``metrics.jsonl`` (one row per node per
round), ``summary.json``, ``dissemination.png`` (experts held vs round per node; accuracy vs
round).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Union

import numpy as np
import torch

from fedmerge.config import NON_NEGATIVE, POSITIVE, PROBABILITY, load_config, option
from fedmerge.continual import CONTINUAL_METHODS
from fedmerge.decentralized.dissemination import FORWARD, Arrival, DisseminationResult, disseminate
from fedmerge.errors import ConfigError, FedmergeError
from fedmerge.experiments.continual_config import DEFAULT_METHODS, ExperimentConfig
from fedmerge.experiments.continual_config import config_from_mapping as expert_config_from
from fedmerge.experiments.continual_tasks import Setup, Tick, evaluate, prepare
from fedmerge.topology import Topology, build_topology

NOT_EXPERT_FIELDS = ("orders", "methods", "out")  # continual-experiment fields with no use here


@dataclass
class DisseminationConfig:
    name: str = option("dissemination", "run name (shown in tables and plots)")
    seed: int = option(0, "seed of message loss and of random graphs")
    topology: Union[str, dict] = option(  # noqa: UP007 - get_type_hints needs it on 3.10
        "ring-8", "topology spec: preset, generator, YAML file or mapping (fedmerge topology)"
    )
    agents: int = option(0, "number of nodes (0: the topology's node count)", check=NON_NEGATIVE)
    rounds: int = option(12, "rounds to run", check=POSITIVE)
    experts: dict = option(
        {},
        "how the experts are built: the continual experiment's fields (seed, tasks, data, "
        "model, pretrain, probe, finetune; simulations/continual_digits.yaml)",
    )
    arrivals: dict = option(
        {},
        "task name -> {node, round}: where and when its expert appears (rounds from 1); "
        "empty: task k (0-based) appears at node ⌊k·n/T⌋ in round 1 + k·arrival_interval",
    )
    arrival_interval: int = option(1, "rounds between default arrivals", check=POSITIVE)
    method: str = option("opcm", "continual merger every node runs", choices=CONTINUAL_METHODS)
    params: dict = option({}, "the merger's parameters (default: the continual experiment's)")
    message_loss: float = option(0.0, "probability a payload is lost in transit", check=PROBABILITY)
    forward: str = option(
        "once",
        "once: a node forwards an expert the round after it first holds it; always: it "
        "re-sends every expert it holds every round (robust to loss, more bytes)",
        choices=FORWARD,
    )
    out: str = option("runs/dissemination", "output directory")


def load(path: str | None, overrides: Sequence[str] = ()) -> DisseminationConfig:
    """Read and validate a dissemination config (None: the defaults)."""
    cfg = load_config(path, overrides, schema=DisseminationConfig)
    expert_config(cfg)  # validate the experts section and the merger now, not after training
    try:
        CONTINUAL_METHODS[cfg.method](set(), **merger_params(cfg))
    except ConfigError as exc:
        raise ConfigError(f"params: {exc} (method {cfg.method})") from exc
    return cfg


def merger_params(cfg: DisseminationConfig) -> dict[str, Any]:
    """The merger's parameters: ``params``, or the continual experiment's defaults."""
    return cfg.params or dict(DEFAULT_METHODS.get(cfg.method, {}))


def expert_config(cfg: DisseminationConfig) -> ExperimentConfig:
    """The continual experiment's config that builds the experts."""
    extra = sorted(set(cfg.experts) & set(NOT_EXPERT_FIELDS))
    if extra:
        raise ConfigError(f"experts.{extra[0]}: not used by dissemination (set method/params)")
    try:
        return expert_config_from(cfg.experts)
    except ConfigError as exc:
        raise ConfigError(f"experts.{exc}") from exc


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


def run(cfg: DisseminationConfig, tick: Tick = lambda _: None) -> Outcome:
    """Build the experts, then disseminate them over the topology."""
    t0 = time.perf_counter()
    ecfg = expert_config(cfg)
    try:
        topo = build_topology(cfg.topology, n=cfg.agents or None, seed=cfg.seed)
    except ConfigError as exc:
        raise ConfigError(f"topology: {exc}") from exc
    arrivals = make_arrivals(cfg, ecfg.tasks, topo.n)
    setup = prepare(ecfg, tick)
    names = setup.family.names
    t1 = time.perf_counter()

    def score(state):
        return dict(zip(names, evaluate(setup, state).tolist(), strict=True))

    experts = dict(zip(names, setup.experts, strict=True))
    params = merger_params(cfg)
    result = disseminate(
        topo, setup.base, experts, arrivals, rounds=cfg.rounds, method=cfg.method,
        params=params, projectable=setup.projectable, message_loss=cfg.message_loss,
        forward=cfg.forward, seed=cfg.seed, evaluate=score,
        on_round=lambda rows: tick(f"round {rows[0]['round']}"),
    )  # fmt: skip
    expert_acc = {n: score(e)[n] for n, e in experts.items()}
    seconds = {"prepare": t1 - t0, "disseminate": time.perf_counter() - t1}
    return Outcome(cfg, setup, topo, result, expert_acc, score(setup.base), seconds)


def work_units(cfg: DisseminationConfig) -> int:
    """How many ``tick`` calls :func:`run` makes (for a progress bar)."""
    return 1 + len(expert_config(cfg).tasks) + cfg.rounds


def main(argv: Sequence[str] | None = None) -> int:
    from fedmerge.experiments.continual_report import progress_bar
    from fedmerge.experiments.dissemination_report import print_tables, write_outputs

    parser = argparse.ArgumentParser(
        prog="python -m fedmerge.experiments.dissemination",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="YAML config (default: the built-in defaults)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a field, e.g. --set message_loss=0.2")  # fmt: skip
    parser.add_argument("--out", help="output directory (overrides the config's 'out')")
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: extra threads only contend for the cores
    try:
        cfg = load(args.config, args.set)
        with progress_bar(work_units(cfg)) as tick:
            outcome = run(cfg, tick)
        paths = write_outputs(outcome, args.out or cfg.out)
    except FedmergeError as exc:
        print(f"dissemination: error: {exc}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(threads)
    print_tables(outcome)
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0


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
    final = [r for r in res.rows if r["round"] == cfg.rounds]
    final_acc = [r["acc_appeared"] for r in final if r["acc_appeared"] is not None]
    return {
        "experiment": "continual dissemination of digits-task experts",
        "config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__},
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


if __name__ == "__main__":
    raise SystemExit(main())
