"""Accuracy against megabytes sent, per codec: one table and one plot from the four
``fedmerge sweep simulations/compression.yaml`` runs (see that file).

    python simulations/compression_report.py simulations/results/compression

Reads ``DIR/<topology>-<partition>/table.csv``; writes ``DIR/table.md`` and
``DIR/accuracy_vs_mb.png`` and prints the claim check: top-k at ≥ 10× fewer bytes than
dense ends within 1 point of dense's final accuracy (mean over seeds), per setting.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

from fedmerge.report import pyplot, save_png

SETTINGS = ["torus-4x4-iid", "ring-16-iid", "torus-4x4-dirichlet", "ring-16-dirichlet"]


def read(folder: Path) -> dict[str, dict[str, dict[str, float]]]:
    """setting -> cell label -> {acc, std, mb}."""
    out = {}
    for setting in SETTINGS:
        table = folder / setting / "table.csv"
        if not table.exists():
            continue
        with table.open() as fh:
            out[setting] = {
                row["cell"]: {"acc": float(row["final_global_acc"]),
                              "std": float(row["final_global_acc_std"]),
                              "mb": float(row["mb_sent_per_agent"])}
                for row in csv.DictReader(fh)
            }  # fmt: skip
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


def table(results: dict) -> str:
    labels = list(dict.fromkeys(label for cells in results.values() for label in cells))
    head = "| codec | " + " | ".join(f"{s} acc | MB" for s in results) + " |"
    rule = "| --- |" + " --- | --- |" * len(results)

    def cell(c: dict | None) -> str:
        return "– | –" if c is None else f"{c['acc']:.3f} ± {c['std']:.3f} | {c['mb']:.3f}"

    rows = [f"| {label} | " + " | ".join(cell(c.get(label)) for c in results.values()) + " |"
            for label in labels]  # fmt: skip
    return "\n".join([head, rule, *rows])


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


def main(folder: str) -> int:
    root = Path(folder)
    results = read(root)
    if not results:
        sys.exit(f"{root}: no <setting>/table.csv (run the sweeps in simulations/compression.yaml)")
    text = table(results) + "\n\n" + "\n".join(f"- {line}" for line in claim_lines(results))
    (root / "table.md").write_text(text + "\n")
    plot(results, root / "accuracy_vs_mb.png")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "simulations/results/compression"))
