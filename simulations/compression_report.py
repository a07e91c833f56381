"""Accuracy against megabytes sent, per codec: one table and one plot from the four
``fedmerge sweep simulations/compression.yaml`` runs (see that file), and the same for
continual dissemination of experts with and without compression.

    python simulations/compression_report.py simulations/results/compression

Reads ``DIR/<topology>-<partition>/table.csv`` plus any ``DIR/<setting>/<more>/table.csv``
(later sweeps of the same setting, e.g. ``simulations/compression_quantized.yaml``; a cell
that appears twice must have the same accuracy); writes ``DIR/table.md`` and
``DIR/accuracy_vs_mb.png`` and prints the claim check: top-k at ≥ 10× fewer bytes than
dense ends within 1 point of dense's final accuracy (mean over seeds), per setting.
Dissemination: ``DIR/dissemination/<recipe>-<label>-s<seed>/summary.json`` (the commands
are in ``simulations/compression.yaml``) -> ``DIR/dissemination.md`` and
``DIR/dissemination_vs_mb.png``.
"""

from __future__ import annotations

import csv
import json
import re
import sys
from pathlib import Path

import numpy as np

from fedmerge.atomic import atomic_write_text
from fedmerge.report import markdown, pyplot, save_png

SETTINGS = ["torus-4x4-iid", "ring-16-iid", "torus-4x4-dirichlet", "ring-16-dirichlet"]
EXPERT_CODECS = {"dense": "float32 τ", "ternary10": "ternary (ComPEFT) 10%",
                 "topk10-8bit": "top-k 10%, 8-bit values"}  # fmt: skip


def read(folder: Path) -> dict[str, dict[str, dict[str, float]]]:
    """setting -> cell label -> {acc, std, mb}."""
    out = {}
    for setting in SETTINGS:
        tables = [folder / setting / "table.csv", *sorted(folder.glob(f"{setting}/*/table.csv"))]
        cells: dict[str, dict[str, float]] = {}
        for table in (t for t in tables if t.exists()):
            with table.open() as fh:
                for row in csv.DictReader(fh):
                    c = {"acc": float(row["final_global_acc"]),
                         "std": float(row["final_global_acc_std"]),
                         "mb": float(row["mb_sent_per_agent"])}  # fmt: skip
                    seen = cells.setdefault(row["cell"], c)
                    if abs(seen["acc"] - c["acc"]) > 1e-9:  # a rerun must reproduce
                        sys.exit(f"{table}: {row['cell']!r} has accuracy {c['acc']}, "
                                 f"{seen['acc']} in an earlier table")  # fmt: skip
        if cells:
            out[setting] = cells
    return out


def claim_lines(results: dict) -> list[str]:
    """Top-k cells with ≥ 10× fewer bytes than dense: within 1 point of dense or not."""
    lines = []
    for setting, cells in results.items():
        dense = cells["dense"]
        for label, c in cells.items():
            if not label.startswith("topk") or c["mb"] == 0 or dense["mb"] / c["mb"] < 10:
                continue
            gap = 100 * (dense["acc"] - c["acc"])
            verdict = "holds" if gap <= 1.0 else "FAILS"
            side = f"{gap:.2f} points below" if gap > 0 else f"{-gap:.2f} points above"
            lines.append(f"{setting}: {label} sends {dense['mb'] / c['mb']:.1f}× fewer bytes, "
                         f"{side} dense: {verdict}")  # fmt: skip
    return lines


def grid(first: str, second: str, results: dict, cell) -> str:
    """A Markdown table: one row per label (first column ``first``), two columns
    ("<key> acc", ``second``) per key of ``results``, filled by ``cell(c)`` → (acc, MB)
    (``c`` None: missing)."""
    labels = list(dict.fromkeys(label for cells in results.values() for label in cells))
    heads = [first, *(h for key in results for h in (f"{key} acc", second))]
    rows = [[label, *(x for c in results.values() for x in cell(c.get(label)))]
            for label in labels]  # fmt: skip
    return markdown(heads, rows).rstrip("\n")


def table(results: dict) -> str:
    def cell(c: dict | None) -> tuple[str, str]:
        return ("–", "–") if c is None else (f"{c['acc']:.3f} ± {c['std']:.3f}", f"{c['mb']:.3f}")

    return grid("codec", "MB", results, cell)


def plot(results: dict, path: Path) -> None:
    fig, axes = pyplot().subplots(1, len(results), figsize=(4.2 * len(results), 3.6), squeeze=False)
    for ax, (setting, cells) in zip(axes[0], results.items(), strict=True):
        for label, c in cells.items():
            if c["mb"] == 0:  # local only: a horizontal reference line
                ax.axhline(c["acc"], color="gray", linestyle=":", label=label)
                continue
            ax.errorbar(c["mb"], c["acc"], yerr=c["std"], fmt="o", capsize=3, label=label)
        ax.set_xscale("log")
        ax.set_title(setting)
        ax.set_xlabel("MB sent per agent (40 rounds)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("final mean global accuracy")
    axes[0][-1].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    save_png(fig, path, dpi=120)


def read_dissemination(folder: Path) -> dict[str, dict[str, dict[str, float]]]:
    """recipe -> label -> {acc, std (over expert seeds), mb (sent per node), seeds}."""
    runs: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for path in sorted(folder.glob("dissemination/*/summary.json")):
        m = re.fullmatch(r"(.+?)-(.+)-s(\d+)", path.parent.name)
        if not m:
            continue
        d = json.loads(path.read_text())
        mb = d["bytes_sent_total"] / d["nodes"] / 1e6
        label = EXPERT_CODECS.get(m[2], m[2])
        runs.setdefault(m[1], {}).setdefault(label, []).append((d["final_acc_mean"], mb))
    return {
        recipe: {label: {"acc": float(np.mean([a for a, _ in v])),
                         "std": float(np.std([a for a, _ in v])),
                         "mb": float(np.mean([b for _, b in v])), "seeds": len(v)}
                 for label, v in labels.items()}
        for recipe, labels in runs.items()
    }  # fmt: skip


def dissemination_table(results: dict) -> str:
    def cell(c: dict | None) -> tuple[str, str]:
        if c is None:
            return "–", "–"
        return f"{c['acc']:.3f} ± {c['std']:.3f} ({c['seeds']})", f"{c['mb']:.3f}"

    return grid("experts travel as", "MB per node", results, cell)


def plot_dissemination(results: dict, path: Path) -> None:
    from matplotlib import ticker

    fig, axes = pyplot().subplots(1, len(results), figsize=(4.6 * len(results), 3.6), squeeze=False)
    for ax, (recipe, cells) in zip(axes[0], results.items(), strict=True):
        for label, c in cells.items():
            ax.errorbar(c["mb"], c["acc"], yerr=c["std"], fmt="o", capsize=3, label=label)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())  # within a decade they collide
        ax.set_title(f"dissemination: {recipe}")
        ax.set_xlabel("MB sent per node (whole run)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("final mean accuracy (OPCM merge)")
    axes[0][0].legend(fontsize=8, loc="center right")
    fig.tight_layout()
    save_png(fig, path, dpi=120)


def main(folder: str) -> int:
    root = Path(folder)
    results = read(root)
    if not results:
        sys.exit(f"{root}: no <setting>/table.csv (run the sweeps in simulations/compression.yaml)")
    text = table(results) + "\n\n" + "\n".join(f"- {line}" for line in claim_lines(results))
    atomic_write_text(root / "table.md", text + "\n")
    plot(results, root / "accuracy_vs_mb.png")
    print(text)
    spread = read_dissemination(root)
    if spread:
        text = dissemination_table(spread)
        atomic_write_text(root / "dissemination.md", text + "\n")
        plot_dissemination(spread, root / "dissemination_vs_mb.png")
        print("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "simulations/results/compression"))
