"""Mixing matrices W (n × n, scipy.sparse CSR) from a graph and a rule.

Row i of W holds the weights node i gives itself and its neighbours when it
averages: x_i ← Σ_j W_ij x_j. Rules (d_i = degree of i, d_max = largest degree):

==================== ============================================ ==================
rule                 off-diagonal weight W_ij for an edge i ~ j   stochasticity
==================== ============================================ ==================
metropolis_hastings  1 / (1 + max(d_i, d_j))                      doubly, symmetric
uniform              1 / (d_i + 1)  (closed neighbourhood)        row (doubly if regular)
max_degree           1 / (d_max + 1)                              doubly, symmetric
edge_weights         a_ij / (s_i + Σ_j a_ij), a = edge ``weight``  row
==================== ============================================ ==================

The diagonal takes the rest: W_ii = 1 − Σ_{j≠i} W_ij, which is always > 0, so
W is aperiodic even on bipartite graphs (an even ring). ``max_degree`` uses
1/(d_max+1) rather than Xiao & Boyd's 1/d_max for that reason. For
``edge_weights`` the self weight s_i is the node attribute ``self_weight`` when
given, else the mean weight of i's edges (so unweighted graphs give ``uniform``).

Everything is computed from edge arrays, so a 10,000-node graph takes milliseconds.

>>> import networkx as nx
>>> W = mixing_matrix(nx.cycle_graph(4))
>>> W.toarray().round(3)[0].tolist()
[0.333, 0.333, 0.0, 0.333]
"""

from __future__ import annotations

from typing import NamedTuple

import networkx as nx
import numpy as np
import scipy.sparse as sp

from fedmerge.errors import ConfigError

NATURAL_STOCHASTICITY = {
    "metropolis_hastings": "doubly",
    "uniform": "row",
    "max_degree": "doubly",
    "edge_weights": "row",
}
MIXING_RULES = tuple(NATURAL_STOCHASTICITY)
STOCHASTICITY = ("row", "doubly")


class Edges(NamedTuple):
    """Undirected edges of a graph on nodes 0..n-1 as arrays (each edge once, u ≠ v)."""

    n: int
    u: np.ndarray  # (m,) int64
    v: np.ndarray  # (m,) int64
    weight: np.ndarray  # (m,) float64, 1.0 where the graph has no ``weight``
    self_weight: np.ndarray  # (n,) float64, NaN where the node has no ``self_weight``

    def select(self, keep: np.ndarray) -> Edges:
        """The edges picked by ``keep`` (a (m,) bool mask or an index array)."""
        return Edges(self.n, self.u[keep], self.v[keep], self.weight[keep], self.self_weight)

    def restrict(self, active: np.ndarray | None) -> Edges:
        """Only the edges whose two ends are both active (``active``: (n,) bool)."""
        return self if active is None else self.select(active[self.u] & active[self.v])


def graph_edges(g: nx.Graph) -> Edges:
    """Edge arrays of ``g`` (nodes must be 0..n-1)."""
    n = g.number_of_nodes()
    data = list(g.edges(data="weight", default=1.0))
    u = np.fromiter((a for a, _, _ in data), dtype=np.int64, count=len(data))
    v = np.fromiter((b for _, b, _ in data), dtype=np.int64, count=len(data))
    w = np.fromiter((float(c) for _, _, c in data), dtype=np.float64, count=len(data))
    s = np.full(n, np.nan)
    for node, value in g.nodes(data="self_weight"):
        if value is not None:
            s[node] = float(value)
    return Edges(n, u, v, w, s)


def pairs_edges(n: int, pairs: np.ndarray) -> Edges:
    """Edge arrays for unweighted pairs ``pairs`` ((m, 2) int) on n nodes."""
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    m = len(pairs)
    return Edges(n, pairs[:, 0], pairs[:, 1], np.ones(m), np.full(n, np.nan))


def mixing_from_edges(
    edges: Edges, rule: str = "metropolis_hastings", active: np.ndarray | None = None
) -> sp.csr_matrix:
    """W (n × n CSR) for ``rule`` on ``edges``; inactive nodes get an identity row.

    With ``active`` ((n,) bool) the rule is applied to the subgraph induced by the
    active nodes: their degrees and weights are renormalized over the nodes present.
    """
    e = edges.restrict(active)
    n = e.n
    deg = np.bincount(e.u, minlength=n) + np.bincount(e.v, minlength=n)
    if rule == "metropolis_hastings":
        w_uv = w_vu = 1.0 / (1.0 + np.maximum(deg[e.u], deg[e.v]))
    elif rule == "uniform":
        w_uv, w_vu = 1.0 / (deg[e.u] + 1.0), 1.0 / (deg[e.v] + 1.0)
    elif rule == "max_degree":
        w_uv = w_vu = np.full(len(e.u), 1.0 / (deg.max(initial=0) + 1.0))
    elif rule == "edge_weights":
        strength = np.bincount(e.u, e.weight, n) + np.bincount(e.v, e.weight, n)
        own = np.where(deg > 0, strength / np.maximum(deg, 1), 1.0)
        own = np.where(np.isnan(e.self_weight), own, e.self_weight)
        total = own + strength
        w_uv, w_vu = e.weight / total[e.u], e.weight / total[e.v]
    else:
        raise ConfigError(
            f"unknown mixing rule {rule!r} (field 'mixing'); choose from {', '.join(MIXING_RULES)}"
        )
    off = sp.coo_matrix(
        (np.concatenate([w_uv, w_vu]), (np.concatenate([e.u, e.v]), np.concatenate([e.v, e.u]))),
        shape=(n, n),
    ).tocsr()
    diag = 1.0 - np.asarray(off.sum(axis=1)).ravel()
    return (off + sp.diags(diag, format="csr")).tocsr()


def mixing_matrix(g: nx.Graph, rule: str = "metropolis_hastings") -> sp.csr_matrix:
    """W (n × n CSR) for graph ``g`` (nodes 0..n-1) under ``rule``."""
    return mixing_from_edges(graph_edges(g), rule)


def stochasticity(w: sp.spmatrix, tol: float = 1e-9) -> dict[str, bool]:
    """Which properties W has: nonnegative, row_stochastic, doubly_stochastic, symmetric."""
    w = sp.csr_matrix(w)
    rows = np.asarray(w.sum(axis=1)).ravel()
    cols = np.asarray(w.sum(axis=0)).ravel()
    nonneg = bool(w.data.min(initial=0.0) >= -tol)
    row = nonneg and bool(np.abs(rows - 1.0).max(initial=0.0) <= tol)
    diff = abs(w - w.T)
    return {
        "nonnegative": nonneg,
        "row_stochastic": row,
        "doubly_stochastic": row and bool(np.abs(cols - 1.0).max(initial=0.0) <= tol),
        "symmetric": bool(diff.max() <= tol) if diff.nnz else True,
    }


def check_stochasticity(w: sp.spmatrix, rule: str, claim: str) -> dict[str, bool]:
    """Raise if W is not as stochastic as ``claim`` ('row' or 'doubly') says."""
    if claim not in STOCHASTICITY:
        raise ConfigError(f"field 'stochastic' must be 'row' or 'doubly', got {claim!r}")
    props = stochasticity(w)
    if not props["row_stochastic"]:
        raise ConfigError(f"mixing rule {rule!r} produced a W whose rows do not sum to 1")
    if claim == "doubly" and not props["doubly_stochastic"]:
        cols = np.asarray(w.sum(axis=0)).ravel()
        raise ConfigError(
            f"mixing rule {rule!r} is not doubly stochastic on this graph (column sums "
            f"{cols.min():.4g}..{cols.max():.4g}; 'uniform' and 'edge_weights' are doubly "
            "stochastic only on regular, evenly weighted graphs): use 'metropolis_hastings' or "
            "'max_degree', or set 'stochastic: row'"
        )
    return props
