"""Continual merging on digits tasks: does OPCM beat the continual baselines, in any order?

The offline analog of the OPCM paper's main experiment ("Merging Models on the Fly
Without Retraining", Tang et al. 2025): one pretrained body, one expert body per task
fine-tuned from it (:mod:`fedmerge.continual.experts`), the expert bodies merged
*sequentially* in ``orders`` random task orders with every continual method
(:func:`fedmerge.continual.make_merger`). After every step the merged body is scored
with each task's own head; the average over the tasks seen so far, the final average
and the backward transfer are reported per method as mean ± std over the orders, next
to the individual experts (upper reference) and the pretrained body (lower reference).

    python simulations/continual/run.py --config simulations/continual/digits.yaml
    fedmerge sweep simulations/continual/digits.yaml --set orders=2   # the same run

Writes to ``out``: ``steps.csv`` (one row per method × order × step, with the accuracy
on every task), ``summary.json``, ``table.md`` and ``accuracy_vs_step.png``.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from fedmerge.atomic import atomic_write_text
from fedmerge.config import POSITIVE, option
from fedmerge.continual import CONTINUAL_METHODS, make_merger
from fedmerge.continual.experts import (
    ExpertsConfig,
    Setup,
    evaluate,
    multitask_state,
    prepare,
    task_vector_cosines,
)
from fedmerge.continual.metrics import avg_seen, backward_transfer, mean_std
from fedmerge.errors import ConfigError
from fedmerge.recipe import Recipe
from fedmerge.report import Tick, csv_text, markdown, pyplot, rich_table, save_png, write_json

REFERENCES = ("individual", "multitask", "pretrained")  # pseudo-methods: experts and the
# multi-task body (upper), the base body (lower)


@dataclass
class ContinualConfig(ExpertsConfig):
    orders: int = option(10, "random task orders (seeded); mean ± std is over these",
                         check=POSITIVE)  # fmt: skip
    methods: dict = option(
        {name: entry.defaults() for name, entry in CONTINUAL_METHODS.items()},
        "continual method -> its parameters ({}: the method's defaults)",
    )
    multitask: bool = option(True, "train the multi-task reference (one body on all tasks)")
    ta_grid: list = option(
        [0.1, 0.2, 0.3, 0.5, 0.7, 1.0], "task arithmetic's λ grid: θ₀ + λ·Στ over all tasks",
        check=(lambda v: all(isinstance(x, int | float) and x > 0 for x in v), "must be > 0"),
    )  # fmt: skip
    out: str = option("runs/continual_digits", "output directory")

    def __post_init__(self) -> None:
        if not self.methods:
            raise ConfigError("methods: name at least one continual merge method")
        for name, params in self.methods.items():
            if not isinstance(params, dict | None):
                raise ConfigError(f"methods.{name}: parameters must be a mapping, got {params!r}")
            try:
                CONTINUAL_METHODS.resolve(name, params)
            except ConfigError as exc:
                raise ConfigError(f"methods.{name}: {exc}") from exc


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
class Result:
    config: ContinualConfig
    task_names: list[str]
    orders: list[list[int]]
    runs: list[Run]
    base_acc: np.ndarray  # (T,) pretrained body + task heads
    expert_acc: np.ndarray  # (T,) each expert on its own task
    ta_grid: dict[float, np.ndarray]  # λ → (T,) accuracy of θ₀ + λ·Στ over all tasks
    cosines: np.ndarray  # (T, T) cosines of the experts' task vectors
    seconds: dict[str, float] = field(default_factory=dict)


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


def run(cfg: ContinualConfig, tick: Tick) -> Result:
    """Prepare the experts, then merge them in every order with every method."""
    t0 = time.perf_counter()
    setup = prepare(cfg, tick)
    t1 = time.perf_counter()
    base_acc = evaluate(setup, setup.base)
    expert_acc = np.array([evaluate(setup, e)[k] for k, e in enumerate(setup.experts)])
    orders = task_orders(len(cfg.tasks), cfg.orders, cfg.seed)
    T = len(cfg.tasks)
    fixed = {"individual": expert_acc, "pretrained": base_acc}
    if cfg.multitask:
        fixed["multitask"] = evaluate(setup, multitask_state(setup, cfg.finetune, cfg.seed))
        tick("multi-task reference")
    taus = [{k: e[k] - setup.base[k] for k in setup.base} for e in setup.experts]
    grid = {float(lam): evaluate(setup, {k: setup.base[k] + lam * sum(t[k] for t in taus)
                                         for k in setup.base}) for lam in cfg.ta_grid}  # fmt: skip
    runs = []
    for i, order in enumerate(orders):
        for name, acc in fixed.items():
            runs.append(Run(name, i, order, np.tile(acc, (T, 1))))
        for method, params in cfg.methods.items():
            acc = merge_in_order(setup, method, params or {}, order, tick)
            runs.append(Run(method, i, order, acc))
    seconds = {"prepare": t1 - t0, "merge_and_evaluate": time.perf_counter() - t1}
    return Result(cfg, setup.family.names, orders, runs, base_acc, expert_acc, grid,
                  task_vector_cosines(setup), seconds)  # fmt: skip


def units(cfg: ContinualConfig) -> int:
    """How many ``tick`` calls :func:`run` makes."""
    return 1 + cfg.multitask + len(cfg.tasks) + cfg.orders * len(cfg.methods) * len(cfg.tasks)


# ----------------------------------------------------------------------------- report


def summarize(result: Result) -> dict[str, dict[str, Any]]:
    """Per method: final average accuracy, BWT and the per-step curve, mean/std over orders."""
    out = {}
    for method in dict.fromkeys(run.method for run in result.runs):
        Rs = [run.R for run in result.runs if run.method == method]
        curves = np.stack([avg_seen(R) for R in Rs])  # (orders, T)
        finals = curves[:, -1]
        bwts = [backward_transfer(R) for R in Rs]
        curve_mean, curve_std = mean_std(curves)
        out[method] = {
            "final_avg_acc_mean": float(finals.mean()),
            "final_avg_acc_std": float(mean_std(finals)[1]),
            "final_avg_acc_min": float(finals.min()),
            "final_avg_acc_max": float(finals.max()),
            "bwt_mean": float(np.mean(bwts)),
            "bwt_std": float(mean_std(bwts)[1]),
            "avg_acc_seen_mean": curve_mean.tolist(),  # per step
            "avg_acc_seen_std": curve_std.tolist(),
            "final_avg_acc_per_order": finals.tolist(),
        }
    return out


def step_rows(result: Result) -> list[dict[str, Any]]:
    """One CSV row per method × order × step, with the accuracy on every task."""
    rows = []
    for run_ in result.runs:
        curve = avg_seen(run_.R)
        for t, k in enumerate(run_.order):
            rows.append({
                "method": run_.method, "order": run_.order_index, "step": t + 1,
                "task_added": result.task_names[k], "avg_acc_seen": round(float(curve[t]), 6),
                "avg_acc_all": round(float(run_.acc[t].mean()), 6),
                **{f"acc_{n}": round(float(a), 6)
                   for n, a in zip(result.task_names, run_.acc[t], strict=True)},
            })  # fmt: skip
    return rows


def _pct(mean: float, std: float) -> str:
    return "–" if math.isnan(mean) else f"{100 * mean:.1f} ± {100 * std:.1f}"


HEADERS = ["method", "final avg acc %", "min–max over orders", "BWT %", "mean over steps %"]


def table_rows(stats: dict[str, dict[str, Any]]) -> list[list[str]]:
    """Per method: final avg accuracy, its range over orders, BWT, mean of the curve (in %)."""
    return [
        [method, _pct(s["final_avg_acc_mean"], s["final_avg_acc_std"]),
         f"{100 * s['final_avg_acc_min']:.1f}–{100 * s['final_avg_acc_max']:.1f}",
         "–" if method in REFERENCES else _pct(s["bwt_mean"], s["bwt_std"]),
         f"{100 * np.mean(s['avg_acc_seen_mean']):.1f}"]
        for method, s in stats.items()
    ]  # fmt: skip


def grid_rows(result: Result) -> list[list[str]]:
    """Task arithmetic over all tasks per λ: mean accuracy (%), and the best λ marked."""
    best = max(result.ta_grid, key=lambda lam: result.ta_grid[lam].mean())
    return [[f"{lam:g}" + (" (best)" if lam == best else ""), f"{100 * acc.mean():.1f}"]
            for lam, acc in result.ta_grid.items()]  # fmt: skip


def cosine_rows(result: Result) -> list[list[str]]:
    """The (T, T) task-vector cosine matrix, one row per task."""
    return [[name, *(f"{c:.2f}" for c in row)]
            for name, row in zip(result.task_names, result.cosines, strict=True)]  # fmt: skip


def markdown_tables(result: Result, stats: dict[str, dict[str, Any]]) -> str:
    """The summary table and the per-step curve as Markdown (what the docs show)."""
    steps = [
        [method] + [f"{100 * m:.1f}±{100 * d:.1f}"
                    for m, d in zip(s["avg_acc_seen_mean"], s["avg_acc_seen_std"], strict=True)]
        for method, s in stats.items()
    ]  # fmt: skip
    headers = ["method"] + [f"t={t}" for t in range(1, len(result.task_names) + 1)]
    note = "Average accuracy (%) on the tasks seen so far after step t, mean ± std over orders:"
    lam = "Task arithmetic θ₀ + λ·Στ over all tasks (order-free; λ chosen on test data):"
    cos = "Pairwise cosine of the experts' task vectors τ_t = θ_t − θ₀:"
    return (
        markdown(HEADERS, table_rows(stats))
        + f"\n{note}\n\n"
        + markdown(headers, steps)
        + f"\n{lam}\n\n"
        + markdown(["λ", "avg acc %"], grid_rows(result))
        + f"\n{cos}\n\n"
        + markdown(["task", *result.task_names], cosine_rows(result))
    )


def plot(result: Result, stats: dict[str, dict[str, Any]], path: Path) -> None:
    """Average accuracy on the tasks seen so far vs step, mean ± std over orders."""
    fig, ax = pyplot().subplots(figsize=(7, 4.5))
    steps = np.arange(1, len(result.task_names) + 1)
    for method, s in stats.items():
        mean, std = np.array(s["avg_acc_seen_mean"]), np.array(s["avg_acc_seen_std"])
        style = "--" if method in REFERENCES else "-o"
        (line,) = ax.plot(steps, 100 * mean, style, ms=3, label=method)
        ax.fill_between(steps, 100 * (mean - std), 100 * (mean + std), alpha=0.15,
                        color=line.get_color())  # fmt: skip
    ax.set(xlabel="step (experts merged)", ylabel="avg accuracy on tasks seen so far (%)",
           title=f"Continual merging, digits tasks ({result.config.orders} orders, mean ± std)",
           xticks=steps)  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, path, dpi=120)


def write(result: Result, out: Path) -> dict[str, Path]:
    """``steps.csv``, ``summary.json``, ``table.md`` and ``accuracy_vs_step.png``."""
    out.mkdir(parents=True, exist_ok=True)
    stats = summarize(result)
    names = result.task_names
    paths = {"csv": out / "steps.csv", "json": out / "summary.json", "table": out / "table.md",
             "plot": out / "accuracy_vs_step.png"}  # fmt: skip
    atomic_write_text(paths["csv"], csv_text(step_rows(result)))
    write_json(paths["json"], {
        "experiment": "continual merging on digits tasks",
        "config": dataclasses.asdict(result.config),
        "tasks": names,
        "orders": [[names[k] for k in order] for order in result.orders],
        "pretrained_acc": dict(zip(names, result.base_acc.tolist(), strict=True)),
        "expert_acc": dict(zip(names, result.expert_acc.tolist(), strict=True)),
        "task_arithmetic_grid": {str(k): float(v.mean()) for k, v in result.ta_grid.items()},
        "task_vector_cosines": result.cosines.round(6).tolist(),
        "methods": stats,
        "seconds": result.seconds,
    })  # fmt: skip
    atomic_write_text(paths["table"], markdown_tables(result, stats))
    plot(result, stats, paths["plot"])
    return paths


def show(result: Result, console: Console) -> None:
    """The summary table, then the curve (steps as rows, methods as columns)."""
    stats = summarize(result)
    title = (f"Continual merging of {len(result.task_names)} digits tasks, "
             f"{result.config.orders} task orders (mean ± std over orders)")  # fmt: skip
    caption = (
        "individual = each expert on its own task, multitask = one body trained on all "
        "tasks (upper); pretrained = base body (lower)"
    )
    console.print(rich_table(title, HEADERS, table_rows(stats), caption=caption))
    curve = [
        [str(t + 1)]
        + [f"{100 * s['avg_acc_seen_mean'][t]:.1f} ±{100 * s['avg_acc_seen_std'][t]:.1f}"
           for s in stats.values()]
        for t in range(len(result.task_names))
    ]  # fmt: skip
    title = "Average accuracy (%) on the tasks seen so far, after step t"
    console.print(rich_table(title, ["t", *stats], curve, left=0))
    console.print(rich_table("Task arithmetic θ₀ + λ·Στ, all tasks", ["λ", "avg acc %"],
                             grid_rows(result)))  # fmt: skip
    console.print(rich_table("Task-vector cosines", ["task", *result.task_names],
                             cosine_rows(result)))  # fmt: skip


RECIPE = Recipe(
    "continual", ContinualConfig, run=run, units=units, write=write, show=show, doc=__doc__
)

if __name__ == "__main__":
    raise SystemExit(RECIPE.main())
