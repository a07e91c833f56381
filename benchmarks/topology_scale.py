"""How long a large topology takes to build, analyse and plan, against baselines in the same run.

    python benchmarks/topology_scale.py            # 10,000-node small world, dense check at 2,000
    python benchmarks/topology_scale.py --n 2000 --dense-n 500    # quick

Ratios printed:
  build / networkx floor   build_topology (generator + checks + sparse MH W) vs
                           nx.watts_strogatz_graph alone (the least any builder must spend)
  dense eig / sparse       |λ2(W)| by numpy's dense eigvalsh vs fedmerge's sparse eigsh on the
                           same n = dense-n matrix (both values printed: they must agree)
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import networkx as nx
import numpy as np
from rich.console import Console
from rich.table import Table

from fedmerge.topology import analysis, build_topology
from fedmerge.topology import build as topo_build


def timed(fn: Callable[[], Any], repeat: int = 1) -> tuple[float, Any]:
    """Best wall time of ``repeat`` calls, and the last result."""
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000, help="nodes of the small world")
    parser.add_argument("--k", type=int, default=6, help="nearest neighbours")
    parser.add_argument("--p", type=float, default=0.1, help="rewiring probability")
    parser.add_argument("--dense-n", type=int, default=2_000, help="n of the dense/sparse check")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    spec = {"graph": "watts_strogatz", "n": args.n, "k": args.k, "p": args.p, "seed": 0}

    t_nx, _ = timed(lambda: nx.watts_strogatz_graph(args.n, args.k, args.p, seed=0), args.repeat)
    t_build, topo = timed(lambda: build_topology(spec), args.repeat)
    t_analyze, report = timed(topo.analyze, args.repeat)
    half = set(range(0, args.n, 2))
    saved = topo_build.PLAN_CACHE
    topo_build.PLAN_CACHE = 0  # every plan built from scratch
    try:
        t_round, _ = timed(lambda: topo.round(1), args.repeat)
        t_churn, _ = timed(lambda: topo.round(1, active=half), args.repeat)
    finally:
        topo_build.PLAN_CACHE = saved
    topo.round(0)
    t_again, _ = timed(lambda: topo.round(1), args.repeat)  # the static plan, kept
    matching = build_topology(spec, overrides={"schedule": "random_matching"})
    t_match, _ = timed(lambda: matching.round(1), args.repeat)

    small = build_topology({**spec, "n": args.dense_n}).mixing
    t_dense, dense = timed(lambda: _dense_slem(small), args.repeat)
    saved = analysis.DENSE_MAX_N
    analysis.DENSE_MAX_N = 0  # force the sparse path at the same n
    try:
        t_sparse, sparse = timed(lambda: analysis.second_eigenvalue_modulus(small), args.repeat)
    finally:
        analysis.DENSE_MAX_N = saved

    table = Table(title=f"watts_strogatz n={args.n} k={args.k} p={args.p} (best of {args.repeat})")
    table.add_column("step")
    table.add_column("seconds", justify="right")
    rows = [
        ("nx.watts_strogatz_graph (floor)", t_nx),
        ("build_topology (graph + checks + MH W)", t_build),
        ("analyze (degrees, diameter, stochasticity, gap)", t_analyze),
        ("round(r) static plan", t_round),
        ("round(r) static plan again (kept by the topology)", t_again),
        ("round(r, active=half) churn plan", t_churn),
        ("round(r) random_matching plan", t_match),
        (f"|λ2| dense numpy eigvalsh, n={args.dense_n}", t_dense),
        (f"|λ2| sparse eigsh, n={args.dense_n}", t_sparse),
    ]
    for name, seconds in rows:
        table.add_row(name, f"{seconds:.3f}")
    console = Console()
    console.print(table)
    console.print(
        f"build + analyse: {t_build + t_analyze:.2f} s; "
        f"build / networkx floor = {t_build / t_nx:.2f}x; "
        f"dense eig / sparse = {t_dense / t_sparse:.1f}x "
        f"(|λ2| dense {dense:.8f}, sparse {sparse:.8f})"
    )
    console.print(
        f"gap {report['spectral_gap']:.5f}, diameter {report['diameter']}"
        f"{'' if report['diameter_exact'] else ' (estimate)'}, "
        f"rounds to shrink 1e-3: {report['rounds_to_shrink']}"
    )


def _dense_slem(w) -> float:
    ev = np.sort(np.abs(np.linalg.eigvalsh(w.toarray())))[::-1]
    return float(ev[1])


if __name__ == "__main__":
    main()
