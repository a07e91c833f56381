"""What every run leaves behind, whatever the runtime, and the one CSV writer.

``DIR/config.yaml``   the resolved config (loadable by ``fedmerge simulate``)
``DIR/metrics.jsonl`` one JSON object per agent per round (the runtimes' rows)
``DIR/metrics.csv``   the same rows as CSV (columns: the union of the rows' keys)
``DIR/summary.json``  final and best mean accuracy, consensus distance, bytes, wall time
``DIR/accuracy.png``  global and local test accuracy vs round (mean, and each agent faintly)
``DIR/consensus.png`` mean ‖θ_i − θ̄‖ (plain and aligned, log scale) and prediction
                      disagreement vs round

>>> print(csv_text([{"a": 1, "b": 2}, {"a": 3, "c": 4}]), end="")
a,b,c
1,2,
3,,4
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedmerge.atomic import atomic_write_text
from fedmerge.config import SimConfig, dump_config
from fedmerge.report.plots import plot_run
from fedmerge.report.rows import Row, summarize


def write_run(
    out: str | Path, cfg: SimConfig, rows: Sequence[Row], extra: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Write config.yaml, metrics.jsonl/.csv, summary.json and the PNG plots; return the summary."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # the saved config says how many agents ran (``agents: 0`` means "the topology's count")
    cfg = dataclasses.replace(cfg, agents=cfg.agents or len({row["agent"] for row in rows}))
    summary = summarize(rows, {"name": cfg.name, **(extra or {})})
    atomic_write_text(out / "config.yaml", dump_config(cfg))
    write_jsonl(out / "metrics.jsonl", rows)
    atomic_write_text(out / "metrics.csv", csv_text(rows))
    write_json(out / "summary.json", summary)
    plot_run(out, cfg.name, rows)
    return summary


def csv_text(rows: Sequence[Row]) -> str:
    """The rows as CSV text; the columns are the union of their keys, in first-seen order."""
    buf = io.StringIO()
    columns = list(dict.fromkeys(k for r in rows for k in r))
    writer = csv.DictWriter(buf, columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def write_json(path: Path, value: Any) -> None:
    """``value`` as indented JSON (atomic)."""
    atomic_write_text(path, json.dumps(value, indent=2) + "\n")


def write_jsonl(path: Path, rows: Sequence[Row]) -> None:
    """One JSON object per line (atomic)."""
    atomic_write_text(path, "".join(json.dumps(dict(r)) + "\n" for r in rows))
