"""The robustness table (rules × attacks × attackers × data) from a ``fedmerge sweep`` result.

``fedmerge sweep simulations/robustness_table.yaml`` runs every cell × seed and writes
``results.json``; this reads it back and writes, next to it:

- ``robustness.md``: per data split and rule, the honest agents' final global accuracy (%)
  clean and under each attack with 1 and 3 attackers, mean ± std over seeds (in brackets:
  the worst honest node, mean over seeds); then, per split, attack and attacker count, the
  best rule's distance to the clean run of plain averaging, next to the attackers-cut-off
  reference (``silent``) and the issue's target (1 attacker: 3 points IID, 5 Dirichlet);
- ``robustness.png``: one panel per split and attacker count, a bar per rule and attack.

    fedmerge sweep simulations/robustness_table.yaml --out DIR   # runs this at the end
    python simulations/robustness_report.py DIR                  # again, on its own
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from fedmerge.atomic import atomic_write_text
from fedmerge.errors import ConfigError
from fedmerge.report import markdown, pyplot, save_png
from fedmerge.sweep import cell_fields

ATTACKS = {"sign_flip": "sign flip", "noise": "noise", "alie": "ALIE", "ipm": "IPM"}
TARGET = {"iid": 3.0, "dirichlet": 5.0}  # points below clean allowed with 1 attacker
Key = tuple[str, str, int, str]  # (partition, attack | clean | silent, attackers, rule)


def _rule(fields: dict[str, Any]) -> str:
    protocol = fields.get("protocol") or {}
    name = protocol.get("aggregation") or fields.get("protocol.aggregation", "mean")
    screen = protocol.get("clip_screen") or fields.get("protocol.clip_screen", 0)
    return f"clip, screen {screen:g}" if screen else str(name)


def _attack(fields: dict[str, Any]) -> tuple[str, int]:
    byz = fields.get("faults.byzantine") or {}
    count = int(fields.get("faults.byzantine.count", byz.get("count", 0)))
    attack = byz.get("attack") or fields.get("faults.byzantine.attack", "sign_flip")
    return ("clean", 0) if count == 0 else (str(attack), count)


def load(results_dir: Path) -> dict[Key, list[dict[str, float]]]:
    """(partition, attack, attackers, rule) → each seed's run summary."""
    path = results_dir / "results.json"
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read sweep results: {exc}") from exc
    runs: dict[Key, list[dict[str, float]]] = defaultdict(list)
    for cell in results:
        fields = cell_fields(cell)
        attack, count = _attack(fields)
        key = (str(fields.get("data.partition", "iid")), attack, count, _rule(fields))
        runs[key] += [r["summary"] for r in cell["runs"]]
    return runs


def _pct(runs: list[dict[str, float]], key: str = "final_global_acc") -> list[float]:
    return [100 * r[key] for r in runs if r.get(key) is not None]


def cell_text(runs: list[dict[str, float]] | None) -> str:
    """``mean ± std (worst)`` in %, or ``–``."""
    if not runs:
        return "–"
    acc, worst = _pct(runs), _pct(runs, "worst_global_acc")
    std = f" ± {statistics.stdev(acc):.1f}" if len(acc) > 1 else ""
    return f"{statistics.fmean(acc):.1f}{std} ({statistics.fmean(worst):.0f})"


def _points(x: float) -> str:
    """A difference in points, one decimal, never "-0.0"."""
    return f"{round(x, 1) + 0.0:.1f}"


def _mean(runs: list[dict[str, float]] | None) -> float:
    return statistics.fmean(_pct(runs)) if runs else float("nan")


def tables(runs: dict[Key, list[dict[str, float]]]) -> str:
    """The two Markdown tables of robustness.md."""
    parts = list(dict.fromkeys(k[0] for k in runs))
    rules = list(dict.fromkeys(k[3] for k in runs if k[1] in ATTACKS))
    counts = sorted({k[2] for k in runs if k[1] in ATTACKS})
    headers = ["data", "rule", "clean"] + [f"{c}: {a}" for c in counts for a in ATTACKS.values()]
    rows = [[p, r, cell_text(runs.get((p, "clean", 0, r)))]
            + [cell_text(runs.get((p, a, c, r))) for c in counts for a in ATTACKS]
            for p in parts for r in rules]  # fmt: skip
    gaps = []
    for p in parts:
        clean = _mean(runs.get((p, "clean", 0, "mean")))
        for c in counts:
            silent = _mean(runs.get((p, "silent", c, "mean")))
            for a, name in ATTACKS.items():
                scored = {r: _mean(runs.get((p, a, c, r))) for r in rules}
                best = max(scored, key=scored.__getitem__)
                target = f"≤ {TARGET[p]:g}" if c == 1 and p in TARGET else ""
                gaps.append([p, str(c), name, best, f"{scored[best]:.1f}", f"{clean:.1f}",
                             _points(clean - scored[best]), _points(clean - silent),
                             target])  # fmt: skip
    gap_headers = ["data", "attackers", "attack", "best rule", "its acc", "clean (mean)",
                   "gap to clean", "gap, attackers cut off", "target gap"]  # fmt: skip
    return "\n".join([markdown(headers, rows), markdown(gap_headers, gaps),
                      markdown(*maximin(runs, parts, rules, counts))])  # fmt: skip


def maximin(
    runs: dict[Key, list[dict[str, float]]], parts: list[str], rules: list[str], counts: list[int]
) -> tuple[list[str], list[list[str]]]:
    """(headers, rows): per split and attacker count, the one rule whose worst attack
    is best, and its distance to clean plain averaging under that attack."""
    rows = []
    for p in parts:
        clean = _mean(runs.get((p, "clean", 0, "mean")))
        for c in counts:
            worst = {r: min(ATTACKS, key=lambda a, r=r: _mean(runs.get((p, a, c, r))))
                     for r in rules}  # fmt: skip
            best = max(rules, key=lambda r: _mean(runs.get((p, worst[r], c, r))))
            acc = _mean(runs.get((p, worst[best], c, best)))
            rows.append([p, str(c), best, ATTACKS[worst[best]], f"{acc:.1f}",
                         _points(clean - acc)])  # fmt: skip
    headers = ["data", "attackers", "one rule for every attack", "its worst attack",
               "its acc there", "gap to clean"]  # fmt: skip
    return headers, rows


def plot(runs: dict[Key, list[dict[str, float]]], path: Path) -> None:
    """One panel per (split, attackers): bars per rule over clean and the attacks."""
    parts = list(dict.fromkeys(k[0] for k in runs))
    rules = list(dict.fromkeys(k[3] for k in runs if k[1] in ATTACKS))
    counts = sorted({k[2] for k in runs if k[1] in ATTACKS})
    fig, axes = pyplot().subplots(len(parts), len(counts), figsize=(11, 3.2 * len(parts)),
                                  squeeze=False, sharey=True)  # fmt: skip
    groups = ["clean", *ATTACKS]
    width = 0.8 / len(rules)
    for (i, p), (j, c) in ((pi, cj) for pi in enumerate(parts) for cj in enumerate(counts)):
        ax = axes[i][j]
        for n, r in enumerate(rules):
            vals = [_mean(runs.get((p, g, 0 if g == "clean" else c, r))) for g in groups]
            ax.bar([g + (n - len(rules) / 2 + 0.5) * width for g in range(len(groups))], vals,
                   width, label=r)  # fmt: skip
        silent = _mean(runs.get((p, "silent", c, "mean")))
        ax.axhline(silent, color="k", ls=":", lw=1, label="attackers cut off (mean)")
        ax.set(title=f"{p}, {c} of 16 attackers", ylim=(0, 100),
               xticks=range(len(groups)), xticklabels=["clean", *ATTACKS.values()])  # fmt: skip
        ax.grid(axis="y", alpha=0.3)
    for row in axes:
        row[0].set_ylabel("honest final global acc (%)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    save_png(fig, path)


def report(out_dir: Path) -> dict[str, Path]:
    """Write robustness.md and robustness.png into ``out_dir`` (the sweep's folder)."""
    runs = load(Path(out_dir))
    md, png = Path(out_dir) / "robustness.md", Path(out_dir) / "robustness.png"
    atomic_write_text(md, tables(runs))
    plot(runs, png)
    return {"table": md, "plot": png}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, help="the sweep's output folder")
    args = parser.parse_args(argv)
    try:
        written = report(args.results)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(written["table"].read_text(encoding="utf-8"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
