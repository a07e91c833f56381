"""DIMAT vs gossip, paired by setting and seed, from a ``fedmerge sweep`` result.

``fedmerge sweep simulations/dimat_sweep.yaml`` runs every cell × seed and writes
``results.json``; this reads it back, pairs each ``dimat`` run with the ``gossip`` run of the
same model, partition, init, topology and seed (same rounds, same bytes: both send one full
model per message), and reports per setting: mean global accuracy after round 1 and after
the last round for both, the paired difference DIMAT − gossip (mean ± std over seeds), how
many seeds DIMAT won, and the ``local`` / ``centralized`` lines of the same model and
partition. It also draws one panel per (model, partition, init).

    fedmerge sweep simulations/dimat_sweep.yaml --out runs/dimat_sweep   # runs this at the end
    python simulations/dimat/compare.py runs/dimat_sweep                  # again, on its own

The sweep file names this script with ``report: dimat/compare.py``; ``fedmerge sweep``
then calls :func:`report` on its output directory. Writes ``compare.md`` and
``compare.png`` next to ``results.json`` (or into ``--out``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from fedmerge.atomic import atomic_write_text
from fedmerge.errors import ConfigError
from fedmerge.report import markdown, pyplot, rich_table, save_png
from fedmerge.sweep import cell_fields

SETTING = ("model.name", "data.partition", "model.init", "topology")


@dataclass(frozen=True)
class Run:
    """One sweep run: its cell's fields, the seed, the per-round mean global accuracy."""

    fields: dict[str, Any]
    seed: int
    curve: np.ndarray  # (rounds,)
    bytes_sent: int

    def get(self, key: str) -> str:
        value = self.fields.get(key, "–")
        if isinstance(value, dict):  # a topology mapping: its generator's name
            return str(value.get("graph", "graph"))
        return str(value)


def load_runs(results_dir: str | Path) -> list[Run]:
    """Every run of a sweep's ``results.json``, with the cell's ``a.b=c`` sets parsed."""
    path = Path(results_dir) / "results.json"
    try:
        results = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read sweep results: {exc}") from exc
    runs = []
    for cell in results:
        fields = cell_fields(cell)
        for run in cell["runs"]:
            curve = np.array([p["global_acc"] for p in run["curve"]], dtype=float)
            runs.append(Run(fields, run["seed"], curve, run["summary"]["bytes_sent"]))
    return runs


def _ms(x: Sequence[float]) -> str:
    x = np.asarray(x, dtype=float)
    std = x.std(ddof=1) if len(x) > 1 else 0.0
    return f"{x.mean():.3f} ± {std:.3f}"


def compare_rows(runs: list[Run]) -> list[dict[str, Any]]:
    """One row per setting that has both dimat and gossip runs (paired by seed)."""
    by = {(r.get("protocol.name"), *(r.get(k) for k in SETTING), r.seed): r for r in runs}
    settings = dict.fromkeys(k[1:-1] for k in by if k[0] == "dimat")
    rows = []
    for setting in settings:
        seeds = sorted(k[-1] for k in by if k[0] == "dimat" and k[1:-1] == setting)
        pairs = [(by[("dimat", *setting, s)], by.get(("gossip", *setting, s))) for s in seeds]
        pairs = [(d, g) for d, g in pairs if g is not None]
        if not pairs:
            continue
        diff = [d.curve[-1] - g.curve[-1] for d, g in pairs]
        rows.append({
            **dict(zip(SETTING, setting, strict=True)),
            "seeds": len(pairs),
            "rounds": len(pairs[0][0].curve),
            "dimat_r1": [d.curve[0] for d, _ in pairs],
            "gossip_r1": [g.curve[0] for _, g in pairs],
            "dimat_final": [d.curve[-1] for d, _ in pairs],
            "gossip_final": [g.curve[-1] for _, g in pairs],
            "diff_final": diff,
            "wins": int(sum(x > 0 for x in diff)),
            "mb_dimat": pairs[0][0].bytes_sent / 1e6,
            "mb_gossip": pairs[0][1].bytes_sent / 1e6,
            "local": _reference(runs, "local", setting),
            "centralized": _reference(runs, "centralized", setting),
        })  # fmt: skip
    order = {t: i for i, t in enumerate(("ring", "torus", "complete"))}
    first = {k: list(dict.fromkeys(r[k] for r in rows)) for k in SETTING}
    return sorted(rows, key=lambda r: (*(first[k].index(r[k]) for k in SETTING[:3]),
                                       order.get(r["topology"], len(order))))  # fmt: skip


def _reference(runs: list[Run], protocol: str, setting: tuple[str, ...]) -> list[float]:
    """Final accuracies of ``protocol`` runs with the same model and partition."""
    return [
        r.curve[-1]
        for r in runs
        if r.get("protocol.name") == protocol
        and (r.get("model.name"), r.get("data.partition")) == setting[:2]
    ]


HEADERS = ["model", "partition", "init", "topology", "dimat r1", "gossip r1", "dimat final",
           "gossip final", "Δ final (dimat − gossip)", "dimat wins", "MB/run (both)", "local",
           "centralized"]  # fmt: skip


def table_cells(row: dict[str, Any]) -> list[str]:
    ref = [_ms(row[k]) if row[k] else "–" for k in ("local", "centralized")]
    mb = f"{row['mb_dimat']:.1f}" + ("" if row["mb_dimat"] == row["mb_gossip"] else
                                     f" / {row['mb_gossip']:.1f}")  # fmt: skip
    return [row["model.name"], row["data.partition"], row["model.init"], row["topology"],
            _ms(row["dimat_r1"]), _ms(row["gossip_r1"]), _ms(row["dimat_final"]),
            _ms(row["gossip_final"]), f"{_ms(row['diff_final'])}",
            f"{row['wins']}/{row['seeds']}", mb, *ref]  # fmt: skip


def print_table(rows: list[dict[str, Any]]) -> None:
    rounds = rows[0]["rounds"] if rows else "?"
    title = (f"DIMAT vs gossip: mean global test accuracy over agents after round 1 and round "
             f"{rounds}, mean ± std over seeds (paired)")  # fmt: skip
    table = rich_table(title, HEADERS, [table_cells(r) for r in rows], left=4)
    Console(width=max(Console().width, 200)).print(table)


def plot(runs: list[Run], path: Path) -> None:
    """A panel per (model, partition, init): dimat solid, gossip dashed, one colour per
    topology; local and centralized of the same model and partition as grey lines."""
    plt = pyplot()
    mesh = [r for r in runs if r.get("protocol.name") in ("dimat", "gossip")]
    panels = list(dict.fromkeys(tuple(r.get(k) for k in SETTING[:3]) for r in mesh))
    topologies = list(dict.fromkeys(r.get("topology") for r in mesh))
    cols = min(4, len(panels))
    nrows = -(-len(panels) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.3 * cols, 3.4 * nrows), squeeze=False)
    for ax, panel in zip(axes.flat, panels, strict=False):
        for protocol, style in (("dimat", "-"), ("gossip", "--")):
            for i, topo in enumerate(topologies):
                curves = [r.curve for r in mesh if r.get("protocol.name") == protocol
                          and tuple(r.get(k) for k in SETTING) == (*panel, topo)]  # fmt: skip
                if curves:
                    mean = np.mean(curves, axis=0)
                    ax.plot(np.arange(1, len(mean) + 1), mean, style, color=f"C{i}", lw=1.3,
                            label=f"{protocol} {topo}")  # fmt: skip
        for protocol, shade in (("local", "0.6"), ("centralized", "0.25")):
            curves = [r.curve for r in runs if r.get("protocol.name") == protocol
                      and (r.get("model.name"), r.get("data.partition")) == panel[:2]]  # fmt: skip
            if curves:
                mean = np.mean(curves, axis=0)
                ax.plot(np.arange(1, len(mean) + 1), mean, ":", color=shade, label=protocol)
        ax.set_title(" · ".join(panel) + " init", fontsize=9)
        ax.set_xlabel("round", fontsize=8)
        ax.set_ylabel("global test accuracy", fontsize=8)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.tight_layout()
    save_png(fig, path, dpi=100)


def report(results: str | Path, out: str | Path | None = None) -> dict[str, Path]:
    """Compare the sweep in ``results``; write ``compare.md`` and ``compare.png`` to ``out``
    (default: ``results``), print the table and return the files written."""
    runs = load_runs(results)
    rows = compare_rows(runs)
    out = Path(out or results)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"table": out / "compare.md", "plot": out / "compare.png"}
    atomic_write_text(paths["table"], markdown(HEADERS, [table_cells(r) for r in rows]))
    plot(runs, paths["plot"])
    print_table(rows)
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python simulations/dimat/compare.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("results", help="a `fedmerge sweep` output directory (has results.json)")
    parser.add_argument("--out", help="where to write compare.md/png (default: RESULTS)")
    args = parser.parse_args(argv)
    try:
        paths = report(args.results, args.out)
    except ConfigError as exc:
        print(f"dimat compare: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {paths['table']}, {paths['plot']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
