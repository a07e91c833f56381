"""Draw a topology to PNG (``fedmerge topology show --plot``).

Nodes carry their index (and self weight W_ii for small graphs: the share of its own model
a node keeps when it averages); edges carry W_ij when the graph has at most
:data:`LABEL_MAX_N` nodes and :data:`EDGE_LABEL_MAX` edges, or one caption line says the
weight when every edge has the same. A caption under the drawing explains the labels.
Rings, complete graphs, exponential graphs and small worlds use a circular layout, stars a
hub-and-shell one, everything else a seeded spring layout.
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
EDGE_LABEL_MAX = 40
CIRCULAR = ("ring", "complete", "exponential", "watts_strogatz")


def _layout(topo: Topology) -> dict[int, tuple[float, float]]:
    graph = topo.spec.get("graph")
    if graph == "star":
        return nx.shell_layout(topo.graph, [[0], list(range(1, topo.n))])
    if graph in CIRCULAR:
        return nx.circular_layout(topo.graph)
    return nx.spring_layout(topo.graph, seed=topo.seed)


def _edge_texts(g: nx.Graph) -> dict[tuple[int, int], str]:
    return {(i, j): f"{d['weight']:.2f}" for i, j, d in g.edges(data=True)}


def _caption(g: nx.Graph) -> str:
    """What the labels mean: node = index over its self weight W_ii; the edge weights."""
    texts = set(_edge_texts(g).values())
    if len(texts) == 1:
        edges = f"every edge: W_ij = W_ji = {texts.pop()}"
    elif g.number_of_edges() <= EDGE_LABEL_MAX:
        edges = "edge label: W_ij"
    else:
        edges = "edge weights: fedmerge topology show"
    own = "node label: index over its self weight W_ii (the share of its own model it keeps)"
    return f"{own}\n{edges}"


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
            fig.text(0.5, 0.02, _caption(g), ha="center", fontsize=8)
            if len(set(_edge_texts(g).values())) > 1 and g.number_of_edges() <= EDGE_LABEL_MAX:
                nx.draw_networkx_edge_labels(g, pos, edge_labels=_edge_texts(g), ax=ax,
                                             font_size=6)  # fmt: skip
        when = "" if plan is None else f", round {plan.round} ({plan.kind})"
        ax.set_title(f"{topo.name}: n={topo.n}, {topo.rule}{when}")
        ax.set_axis_off()
    except BaseException:
        plt.close(fig)
        raise
    return save_png(fig, path, dpi=dpi, bbox_inches="tight")
