"""Draw a topology to PNG (``fedmerge topology show --plot``).

Nodes carry their index (and self weight W_ii for small graphs); edges carry W_ij
when the graph has at most :data:`LABEL_MAX_N` nodes. Rings, complete graphs,
exponential graphs and small worlds use a circular layout, stars a hub-and-shell
one, everything else a seeded spring layout.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import networkx as nx

from fedmerge.report.plots import pyplot, save_png

if TYPE_CHECKING:
    from fedmerge.topology.build import Topology
    from fedmerge.topology.schedules import RoundPlan

LABEL_MAX_N = 40
CIRCULAR = ("ring", "complete", "exponential", "watts_strogatz")


def _layout(topo: Topology) -> dict[int, tuple[float, float]]:
    graph = topo.spec.get("graph")
    if graph == "star":
        return nx.shell_layout(topo.graph, [[0], list(range(1, topo.n))])
    if graph in CIRCULAR:
        return nx.circular_layout(topo.graph)
    return nx.spring_layout(topo.graph, seed=topo.seed)


def draw_topology(
    topo: Topology, path: str | os.PathLike[str], *, plan: RoundPlan | None = None, dpi: int = 120
) -> Path:
    """Write ``topo``'s static W (or one round's ``plan``) as a PNG at ``path``; return it."""
    plt = pyplot()
    w = topo.mixing if plan is None else plan.mixing
    small = topo.n <= LABEL_MAX_N
    g = nx.Graph()
    g.add_nodes_from(range(topo.n))
    coo = w.tocoo()
    upper = coo.row < coo.col
    g.add_weighted_edges_from(
        zip(coo.row[upper].tolist(), coo.col[upper].tolist(), coo.data[upper].tolist(), strict=True)
    )
    pos = _layout(topo)
    size = 6 if small else 9
    fig, ax = plt.subplots(figsize=(size, size))
    try:
        node_size = 500 if small else max(5, 20000 // topo.n)
        nx.draw_networkx_nodes(g, pos, ax=ax, node_size=node_size, node_color="#9ecae1")
        nx.draw_networkx_edges(g, pos, ax=ax, width=1.0 if small else 0.3, alpha=0.7)
        if small:
            diag = w.diagonal()
            labels = {i: f"{i}\n{diag[i]:.2f}" for i in range(topo.n)}
            nx.draw_networkx_labels(g, pos, labels=labels, ax=ax, font_size=7)
            weights = {(i, j): f"{d['weight']:.2f}" for i, j, d in g.edges(data=True)}
            nx.draw_networkx_edge_labels(g, pos, edge_labels=weights, ax=ax, font_size=6)
        when = "" if plan is None else f", round {plan.round} ({plan.kind})"
        ax.set_title(f"{topo.name}: n={topo.n}, {topo.rule}{when}")
        ax.set_axis_off()
    except BaseException:
        plt.close(fig)
        raise
    return save_png(fig, path, dpi=dpi, bbox_inches="tight")
