"""Tabulate and plot the dimat_paper sweep: post-merge and post-train accuracy per method.

    fedmerge sweep simulations/dimat_paper/sweep.yaml --out runs/dimat_paper   # runs report()
    python simulations/dimat_paper/report.py runs/dimat_paper --out docs

Reads RESULTS/results.json; writes OUT/dimat_paper.md (mean ± std over seeds of the global
test accuracy after the first merge, after the last round's training and after its merge,
and the final plain / aligned consensus distance and prediction disagreement) and
OUT/dimat_paper.png (one panel per partition × topology: post-merge solid, post-train
dashed, mean over seeds with a ±std band).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from fedmerge.atomic import atomic_write_text
from fedmerge.report import pyplot, save_png
from fedmerge.sweep import cell_fields

METHODS = ("dimat-shared", "dimat-local", "wa", "gossip", "local")


def method_of(fields: dict) -> str:
    """The recipe's method name of a cell, from its ``a.b=c`` sets."""
    proto = fields.get("protocol") or {"name": fields.get("protocol.name")}
    if proto["name"] == "dimat":
        return f"dimat-{proto.get('calibration', 'local')}"
    if proto["name"] == "gossip":
        return "gossip" if fields.get("model.init") == "same" else "wa"
    return proto["name"]


def load(results_dir: Path) -> dict[tuple[str, str, str], dict[str, np.ndarray]]:
    """(partition, topology, method) → per-round curves (seeds, rounds) of each measure."""
    cells = {}
    for cell in json.loads((results_dir / "results.json").read_text()):
        fields = cell_fields(cell)
        curves = {
            key: np.array([[np.nan if p[key] is None else p[key] for p in run["curve"]]
                         for run in cell["runs"]])
            for key in ("global_acc", "acc_trained", "consensus", "consensus_aligned",
                        "disagreement")
        }  # fmt: skip
        topology = fields.get("topology", "–") if method_of(fields) != "local" else "–"
        cells[(fields["data.partition"], topology, method_of(fields))] = curves
    return cells


def ms(x: np.ndarray, spec: str = ".3f") -> str:
    return f"{np.mean(x):{spec}} ± {np.std(x, ddof=1) if len(x) > 1 else 0.0:{spec}}"


def table(cells) -> str:
    head = ["partition", "topology", "method", "after merge 1", "after training R",
            "after merge R", "consensus R", "aligned R", "disagreement R"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (part, topo, method), c in sorted(cells.items(), key=_order):
        lines.append("| " + " | ".join([
            part, topo, method, ms(c["global_acc"][:, 0]), ms(c["acc_trained"][:, -1]),
            ms(c["global_acc"][:, -1]), ms(c["consensus"][:, -1], ".3g"),
            ms(c["consensus_aligned"][:, -1], ".3g"), ms(c["disagreement"][:, -1]),
        ]) + " |")  # fmt: skip
    return "\n".join(lines) + "\n"


def _order(item) -> tuple:
    (part, topo, method), _ = item
    return part, topo != "complete", topo, METHODS.index(method)


def plot(cells, path: Path) -> None:
    plt = pyplot()
    parts, topos = ("iid", "shards"), ("complete", "ring")
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), sharey=True)
    for (r, part), (c, topo) in ((a, b) for a in enumerate(parts) for b in enumerate(topos)):
        ax = axes[r, c]
        for i, method in enumerate(METHODS):
            curves = cells.get((part, topo if method != "local" else "–", method))
            if curves is None:
                continue
            x = np.arange(1, curves["global_acc"].shape[1] + 1)
            for key, style, label in (("global_acc", "-", method), ("acc_trained", "--", None)):
                mean, std = curves[key].mean(0), curves[key].std(0)
                ax.plot(x, mean, style, color=f"C{i}", lw=1.5, label=label)
                ax.fill_between(x, mean - std, mean + std, color=f"C{i}", alpha=0.12)
        ax.set(title=f"{part} · {topo}", xlabel="round", ylim=(0, 1))
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("global test accuracy")
    axes[1, 0].set_ylabel("global test accuracy")
    axes[0, 0].legend(fontsize=8, title="solid: after merge; dashed: after training",
                      title_fontsize=8)  # fmt: skip
    fig.tight_layout()
    save_png(fig, path, dpi=90)


def report(results: Path, out: Path | None = None) -> dict[str, Path]:
    """Tabulate and plot the sweep in ``results`` into ``out`` (default: ``results``); print
    the table. ``fedmerge sweep`` calls this on its output (``report:`` in sweep.yaml)."""
    cells = load(results)
    out = out or results
    out.mkdir(parents=True, exist_ok=True)
    md = table(cells)
    paths = {"table": out / "dimat_paper.md", "plot": out / "dimat_paper.png"}
    atomic_write_text(paths["table"], md)
    plot(cells, paths["plot"])
    print(md)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("results", type=Path, help="the fedmerge sweep output directory")
    parser.add_argument("--out", type=Path, default=None, help="default: RESULTS")
    args = parser.parse_args()
    report(args.results, args.out)


if __name__ == "__main__":
    main()
