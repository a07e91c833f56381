"""Sweeps: one base config, a grid of overrides, several seeds; one table and one plot.

A sweep file is YAML::

    name: gossip-vs-local
    base: default          # fedmerge simulate's embedded default, a config file, or a mapping
    set: [train.steps=2]   # optional overrides on the base
    grid:                  # every combination of these ...
      protocol.name: [gossip, local, centralized]
      topology: [ring-8, complete-8]
    cells:                 # ... and explicit cells
      - {label: lossy, set: [faults.message_loss=0.3]}
    seeds: [0, 1, 2]
    report: dimat/compare.py   # optional: a script whose report(out_dir) runs after the sweep

Each cell runs once per seed on its runtime (:func:`fedmerge.runtimes.run`); the table holds
the mean ± std over seeds of the final and best mean global accuracy, the final consensus
distance, MB sent per agent and wall time. With a ``cache`` folder every finished run is
written there at once (one JSON file named after a hash of its resolved config), and a run
whose file is already there is read back instead of run again: an interrupted sweep resumes.

>>> spec = {"grid": {"protocol.name": ["gossip", "local"], "rounds": [2]}}
>>> [c.label for c in expand(spec)]
['gossip · 2', 'local · 2']
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import statistics
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedmerge.atomic import atomic_write_text
from fedmerge.config import load_config
from fedmerge.errors import ConfigError
from fedmerge.report import csv_text, markdown, per_round, pyplot, save_png, summarize
from fedmerge.yamlio import parse_yaml, read_mapping

SWEEP_KEYS = {"name", "base", "set", "grid", "cells", "seeds", "report"}


@dataclass(frozen=True)
class Cell:
    """One configuration of the sweep: a label and its ``a.b=c`` overrides."""

    label: str
    sets: tuple[str, ...]


def load_sweep(path: str | Path) -> dict[str, Any]:
    """Read and check a sweep file (unknown top-level keys are errors naming the key)."""
    spec = read_mapping(path, "sweep")
    unknown = set(spec) - SWEEP_KEYS
    if unknown:
        raise ConfigError(
            f"sweep {path}: unknown key(s) {sorted(unknown)}; use {sorted(SWEEP_KEYS)}"
        )
    if "name" in spec and not is_folder_name(spec["name"]):
        raise ConfigError(f"sweep {path}: name must be a plain name of ≤ 128 characters "
                          f"without '/', '\\', control characters, '.' or '..' (it names the "
                          f"folder runs/<name>), got {str(spec['name'])[:80]!r}")  # fmt: skip
    if isinstance(spec.get("base"), str) and spec["base"] != "default":
        spec["base"] = str(Path(path).parent / spec["base"])
    if spec.get("report") is not None:
        spec["report"] = str(Path(path).parent / str(spec["report"]))
    return spec


def is_folder_name(name: object) -> bool:
    """A plain name (no path separator, '..' or control character): runs/<name> stays in runs/."""
    plain = isinstance(name, str) and re.fullmatch(r"[^/\\\x00-\x1f\x7f]{1,128}", name)
    return bool(plain) and name.strip(".") != ""


def is_sweep_file(path: str | Path) -> bool:
    """Whether ``path`` reads as a sweep file (a mapping with ``base``, ``grid`` or ``cells``)."""
    try:
        spec = read_mapping(path, "sweep")
    except ConfigError:
        return False
    return bool({"base", "grid", "cells"} & set(spec))


def _as_value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def expand(spec: Mapping[str, Any]) -> list[Cell]:
    """The cells: the grid's cartesian product (in file order), then the explicit cells."""
    grid = spec.get("grid") or {}
    if not isinstance(grid, Mapping) or any(not isinstance(v, list) for v in grid.values()):
        raise ConfigError("sweep grid: must map dotted fields to lists of values")
    cells = []
    for combo in itertools.product(*grid.values()) if grid else ():
        sets = tuple(f"{k}={_as_value(v)}" for k, v in zip(grid, combo, strict=True))
        cells.append(Cell(" · ".join(map(_as_value, combo)), sets))
    for i, c in enumerate(spec.get("cells") or []):
        if not isinstance(c, Mapping) or not isinstance(c.get("set", []), list):
            raise ConfigError(f"sweep cells[{i}]: need {{label: ..., set: [k=v, ...]}}")
        cells.append(Cell(str(c.get("label", f"cell {i}")), tuple(map(str, c.get("set", [])))))
    if not cells:
        raise ConfigError("sweep: needs a grid or cells")
    return cells


OnRun = Callable[[str, int, dict[str, Any], bool], None]
"""Called after every run with (cell label, seed, the run's result, whether it was resumed)."""


def run_sweep(
    spec: Mapping[str, Any], on_run: OnRun | None = None, cache: str | Path | None = None
) -> list[dict[str, Any]]:
    """Run every cell × seed; one result per cell with per-seed summaries and mean curves.
    With ``cache``, each finished run is saved there and a run saved before is not repeated."""
    from fedmerge.runtimes import run  # torch and scipy: only when a sweep runs

    base, common = spec.get("base"), [str(s) for s in spec.get("set") or []]
    base = None if base in (None, "default") else base
    seeds = spec.get("seeds") or [0]
    results = []
    for cell in expand(spec):
        runs = []
        for seed in seeds:
            cfg = load_config(base, [*common, *cell.sets, f"seed={seed}"])
            path = Path(cache) / f"{config_key(cfg.to_dict())}.json" if cache else None
            record = _saved_run(path)
            resumed = record is not None
            if record is None:
                rows, details = run(cfg)
                record = {
                    "seed": seed, "summary": summarize(rows, details), "curve": per_round(rows)
                }  # fmt: skip
                if path:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    atomic_write_text(path, json.dumps(record) + "\n")
            runs.append(record)
            if on_run:
                on_run(cell.label, seed, record, resumed)
        results.append({"label": cell.label, "sets": list(cell.sets), "runs": runs})
    return results


def config_key(config: Mapping[str, Any]) -> str:
    """A short stable hash of a resolved config (its JSON with sorted keys)."""
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _saved_run(path: Path | None) -> dict[str, Any] | None:
    """The run saved at ``path``, or None when there is none (or it is not a whole run)."""
    if path is None or not path.is_file():
        return None
    try:
        run = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    ok = isinstance(run, dict) and {"seed", "summary", "curve"} <= set(run)
    return run if ok else None


def _stat(results: Mapping[str, Any], key: str) -> tuple[float, float]:
    vals = [r["summary"][key] for r in results["runs"] if r["summary"][key] is not None]
    if not vals:
        return float("nan"), float("nan")
    return statistics.fmean(vals), statistics.pstdev(vals) if len(vals) > 1 else 0.0


def cell_fields(cell: Mapping[str, Any]) -> dict[str, Any]:
    """A result cell's ``a.b=c`` sets as ``{"a.b": value}``, values parsed as ``--set`` ones.

    >>> cell_fields({"sets": ["rounds=3", "protocol.name=dimat"]})
    {'rounds': 3, 'protocol.name': 'dimat'}
    """
    fields = {}
    for item in cell["sets"]:
        key, _, value = item.partition("=")
        fields[key] = parse_yaml(value, f"set {item!r}")
    return fields


def sweep_rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One flat row per cell: mean and std over seeds of the headline figures."""
    rows = []
    for res in results:
        s0 = res["runs"][0]["summary"]
        row = {"cell": res["label"], "seeds": len(res["runs"])}
        for key in ("final_global_acc", "best_global_acc", "consensus", "wall_s"):
            row[key], row[key + "_std"] = _stat(res, key)
        row["mb_sent_per_agent"] = s0["bytes_sent"] / 1e6 / max(s0["agents"], 1)
        rows.append(row)
    return rows


def sweep_table(name: str, rows: list[dict[str, Any]]):
    """A rich Table of :func:`sweep_rows` (± std only with more than one seed; names and
    labels are text, never markup)."""
    from rich.markup import escape
    from rich.table import Table

    seeds = max((r["seeds"] for r in rows), default=1)
    over = f"mean ± std over {seeds} seeds" if seeds > 1 else "one seed"
    caption = ("final, best: mean global test accuracy (↑ higher is better); disagree: mean "
               "‖θ_i − θ̄‖ (↓ lower is better); MB sent per agent; seconds per run")  # fmt: skip
    table = Table(title=f"sweep {escape(name)}: {over}", caption=caption)
    table.add_column("cell")
    for col in ("final ↑", "best ↑", "disagree ↓", "MB/agent", "s/run"):
        table.add_column(col, justify="right", no_wrap=True)

    def pm(key: str) -> str:
        return f"{r[key]:.3f}" + (f" ± {r[key + '_std']:.3f}" if seeds > 1 else "")

    for r in rows:
        table.add_row(escape(r["cell"]), pm("final_global_acc"), pm("best_global_acc"),
                      f"{r['consensus']:.3g}", f"{r['mb_sent_per_agent']:.2f}",
                      f"{r['wall_s']:.1f}")  # fmt: skip
    return table


def write_sweep(out: str | Path, name: str, results: list[dict[str, Any]]) -> list[dict]:
    """results.json (everything), table.csv, table.md and accuracy.png; returns the rows."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = sweep_rows(results)
    atomic_write_text(out / "results.json", json.dumps(results, indent=1) + "\n")
    atomic_write_text(out / "table.csv", csv_text(rows))
    cells = [
        [r["cell"], f"{r['final_global_acc']:.3f} ± {r['final_global_acc_std']:.3f}",
         f"{r['best_global_acc']:.3f} ± {r['best_global_acc_std']:.3f}", f"{r['consensus']:.3g}",
         f"{r['mb_sent_per_agent']:.2f}"]
        for r in rows
    ]  # fmt: skip
    headers = ["cell", "final global acc", "best global acc", "consensus", "MB/agent"]
    atomic_write_text(out / "table.md", markdown(headers, cells))
    _plot(out / "accuracy.png", name, results)
    return rows


def _plot(path: Path, name: str, results: list[dict[str, Any]]) -> None:
    fig, ax = pyplot().subplots(figsize=(8, 4.5))
    for res in results:
        curves = [[p["global_acc"] for p in run["curve"]] for run in res["runs"]]
        rounds = enumerate(zip(*curves, strict=False), 1)  # eval_every's skipped rounds: None
        pts = [(r, statistics.fmean(v)) for r, v in rounds if None not in v]
        if pts:
            ax.plot(*zip(*pts, strict=True), label=res["label"], lw=1.6)
    ax.set(title=f"{name}: mean global test accuracy (mean over seeds)", xlabel="round",
           ylabel="accuracy", ylim=(0, 1))  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    save_png(fig, path)


def run_report(spec: Mapping[str, Any], out: str | Path) -> dict[str, Path]:
    """Run the sweep's ``report`` script (its ``report(out_dir)``) on the written results."""
    if not spec.get("report"):
        return {}
    from fedmerge.recipe import load_script

    report = getattr(load_script(spec["report"]), "report", None)
    if not callable(report):
        raise ConfigError(f"sweep report {spec['report']}: defines no report(out_dir) function")
    return report(Path(out))
