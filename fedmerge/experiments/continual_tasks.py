"""Continual merging on digits tasks: does OPCM beat the continual baselines, in any order?

The offline analog of the OPCM paper's main experiment ("Merging Models on the
Fly Without Retraining", Tang et al. 2025): one pretrained body, one expert
body per task fine-tuned from it (see :mod:`fedmerge.experiments.multihead`),
the expert bodies merged *sequentially* in ``orders`` random task orders with
every continual method (:func:`fedmerge.continual.make_merger`). After every
step the merged body is evaluated with each task's own head; the average over
the tasks seen so far, the final average and the backward transfer are
reported per method as mean ± std over the orders, next to the individual
experts (upper reference) and the pretrained body (lower reference).

Run it (about 30 s on 2 CPU cores)::

    python -m fedmerge.experiments.continual_tasks --config simulations/continual_digits.yaml
    python -m fedmerge.experiments.continual_tasks --set orders=2 --set tasks=[rot90,invert]

Outputs in ``--out`` (default ``runs/continual_digits``): ``steps.csv`` (one row
per method × order × step, with the accuracy on every task), ``summary.json``,
``accuracy_vs_step.png`` and ``table.md``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from fedmerge.continual import linear_keys_from_module, make_merger
from fedmerge.data.tasks import TASK_NAMES, TaskFamily, make_task_family
from fedmerge.errors import FedmergeError
from fedmerge.experiments.continual_config import ExperimentConfig, load_config
from fedmerge.experiments.multihead import (
    accuracy,
    clone_state,
    finetune_expert,
    fit_probe,
    make_body,
    pretrain_body,
)
from fedmerge.statedict import StateDict

REFERENCES = ("individual", "pretrained")  # pseudo-methods: experts (upper), base body (lower)
Tick = Callable[[str], None]  # progress callback: advance by one unit of work, with a label


@dataclass
class Setup:
    """The pretrained body, every task's head and expert body (task order = ``family.tasks``)."""

    family: TaskFamily
    body: nn.Module  # evaluation scaffold; its weights are overwritten per evaluation
    base: StateDict
    experts: list[StateDict]
    heads: list[nn.Module]
    projectable: set[str]  # the body's nn.Linear weights (OPCM projects these)


@dataclass
class Run:
    """One method in one task order. ``acc[t, k]``: accuracy on task ``k`` (family order)
    after step ``t`` (``t + 1`` experts merged), for every task, seen or not."""

    method: str
    order_index: int
    order: list[int]
    acc: np.ndarray  # (T, T)

    @property
    def R(self) -> np.ndarray:
        """The accuracy matrix in order positions: ``R[t, j]`` = accuracy on ``order[j]``."""
        return self.acc[:, self.order]


@dataclass
class ExperimentResult:
    config: ExperimentConfig
    task_names: list[str]
    orders: list[list[int]]
    runs: list[Run]
    base_acc: np.ndarray  # (T,) pretrained body + task heads
    expert_acc: np.ndarray  # (T,) each expert on its own task
    seconds: dict[str, float] = field(default_factory=dict)


def prepare(cfg: ExperimentConfig, tick: Tick = lambda _: None) -> Setup:
    """Build the tasks, pretrain the body, fit each task's head and fine-tune its expert."""
    family = make_task_family(
        cfg.tasks, cfg.seed, cfg.data.test_fraction, cfg.data.pretrain_fraction
    )
    torch.manual_seed(cfg.seed)
    body = make_body(64, cfg.model.hidden, cfg.model.features, cfg.model.layernorm)
    pretrain_body(body, family.X_pretrain, family.y_pretrain, cfg.pretrain, cfg.seed)
    tick("pretrained body")
    experts, heads = [], []
    for task in family.tasks:
        seed = cfg.seed * 1000 + TASK_NAMES.index(task.name) + 1  # same expert in any task list
        head = fit_probe(body, task.X_train, task.y_train, cfg.probe, seed)
        expert, head = finetune_expert(
            body, head, task.X_train, task.y_train, cfg.finetune, seed, cfg.finetune.train_head
        )
        experts.append(expert)
        heads.append(head)
        tick(f"expert {task.name}")
    return Setup(family, body, clone_state(body), experts, heads, linear_keys_from_module(body))


def evaluate(setup: Setup, state: StateDict) -> np.ndarray:
    """``(T,)`` test accuracy of body weights ``state`` with each task's own head."""
    setup.body.load_state_dict(state)
    return np.array(
        [
            accuracy(setup.body, head, task.X_test, task.y_test)
            for task, head in zip(setup.family.tasks, setup.heads, strict=True)
        ]
    )


def task_orders(num_tasks: int, num_orders: int, seed: int) -> list[list[int]]:
    """``num_orders`` seeded random permutations of ``range(num_tasks)``."""
    rng = np.random.default_rng(seed)
    return [rng.permutation(num_tasks).tolist() for _ in range(num_orders)]


def merge_in_order(
    setup: Setup, method: str, params: dict, order: Sequence[int], tick: Tick
) -> np.ndarray:
    """Fold the experts into ``method``'s merger in ``order``; ``(T, T)`` accuracies per step."""
    merger = make_merger(method, setup.base, projectable=setup.projectable, **params)
    rows = []
    for k in order:
        merger.add(setup.experts[k])
        rows.append(evaluate(setup, merger.merged()))
        tick(f"{method}: +{setup.family.tasks[k].name}")
    return np.stack(rows)


def run_experiment(cfg: ExperimentConfig, tick: Tick = lambda _: None) -> ExperimentResult:
    """Prepare the experts, then merge them in every order with every method."""
    t0 = time.perf_counter()
    setup = prepare(cfg, tick)
    t1 = time.perf_counter()
    base_acc = evaluate(setup, setup.base)
    expert_acc = np.array([evaluate(setup, e)[k] for k, e in enumerate(setup.experts)])
    orders = task_orders(len(cfg.tasks), cfg.orders, cfg.seed)
    T = len(cfg.tasks)
    runs = []
    for i, order in enumerate(orders):
        runs.append(Run("individual", i, order, np.tile(expert_acc, (T, 1))))
        runs.append(Run("pretrained", i, order, np.tile(base_acc, (T, 1))))
        for method, params in cfg.methods.items():
            runs.append(Run(method, i, order, merge_in_order(setup, method, params, order, tick)))
    seconds = {"prepare": t1 - t0, "merge_and_evaluate": time.perf_counter() - t1}
    return ExperimentResult(cfg, setup.family.names, orders, runs, base_acc, expert_acc, seconds)


def work_units(cfg: ExperimentConfig) -> int:
    """How many ``tick`` calls :func:`run_experiment` makes (for a progress bar)."""
    T = len(cfg.tasks)
    return 1 + T + cfg.orders * len(cfg.methods) * T


def main(argv: Sequence[str] | None = None) -> int:
    from fedmerge.experiments.continual_report import print_table, progress_bar, write_outputs

    parser = argparse.ArgumentParser(
        prog="python -m fedmerge.experiments.continual_tasks",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="YAML config (default: the built-in defaults)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set orders=3",
    )
    parser.add_argument("--out", help="output directory (overrides the config's 'out')")
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the models are tiny: extra threads only contend for the cores
    try:
        cfg = load_config(args.config, args.set)
        with progress_bar(work_units(cfg)) as tick:
            result = run_experiment(cfg, tick)
        paths = write_outputs(result, args.out or cfg.out)
    except FedmergeError as exc:
        print(f"continual_tasks: error: {exc}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(threads)
    print_table(result)
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
