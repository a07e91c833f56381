"""What a topology promises: degrees, diameter, stochasticity, spectral gap, gossip speed.

For a symmetric doubly stochastic W with second-largest eigenvalue modulus
λ = max(|λ_2|, |λ_n|), gossip averaging x ← W x shrinks the disagreement
‖x − x̄·1‖₂ by at least λ per round, so a factor ε takes at most
⌈ln(1/ε) / ln(1/λ)⌉ rounds (≈ ln(1/ε) / gap for a small spectral gap 1 − λ).

>>> import networkx as nx
>>> from fedmerge.topology.mixing import mixing_matrix
>>> round(spectral_gap(mixing_matrix(nx.complete_graph(5), "uniform")), 6)
1.0
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import networkx as nx
import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla
from scipy.sparse.csgraph import shortest_path

from fedmerge.topology.mixing import stochasticity

DENSE_MAX_N = 500  # up to here dense eigenvalues (exact, < 0.1 s); above, sparse eigsh/eigs
EXACT_DIAMETER_MAX_N = 2000  # exact diameter is O(n·m); above this report a lower bound


def second_eigenvalue_modulus(w: sp.spmatrix, symmetric: bool | None = None) -> float:
    """|λ_2(W)|: the largest eigenvalue modulus after the leading 1 (W: (n, n), stochastic)."""
    n = w.shape[0]
    if n < 2:
        return 0.0
    if symmetric is None:
        symmetric = stochasticity(w)["symmetric"]
    if n <= DENSE_MAX_N:
        dense = w.toarray()
        ev = np.linalg.eigvalsh(dense) if symmetric else np.linalg.eigvals(dense)
        mods = np.sort(np.abs(ev))[::-1]
        return float(min(mods[1], 1.0))
    w = sp.csr_matrix(w, dtype=np.float64)
    if symmetric:  # W - 11ᵀ/n removes the eigenvalue 1 (eigenvector 1) and keeps the rest
        ones = np.ones(n) / math.sqrt(n)
        op = spla.LinearOperator(
            (n, n), matvec=lambda x: w @ x - ones * (ones @ x), dtype=np.float64
        )
        ev = spla.eigsh(
            op,
            k=1,
            which="LM",
            tol=1e-8,
            return_eigenvectors=False,
            v0=np.random.default_rng(0).standard_normal(n),
        )
        return float(min(abs(ev[0]), 1.0))
    ev = spla.eigs(
        w,
        k=2,
        which="LM",
        tol=1e-8,
        return_eigenvectors=False,
        v0=np.random.default_rng(0).standard_normal(n),
    )
    return float(min(np.sort(np.abs(ev))[0], 1.0))


def spectral_gap(w: sp.spmatrix) -> float:
    """1 − |λ_2(W)| (1 for exact averaging, 0 when gossip never mixes)."""
    return 1.0 - second_eigenvalue_modulus(w)


def rounds_to_shrink(slem: float, factor: float = 1e-3) -> int | None:
    """Rounds of x ← W x that shrink the disagreement by ``factor``, from |λ_2| (None: never)."""
    if slem <= 0.0:
        return 1
    if slem >= 1.0 - 1e-12:
        return None
    return max(1, math.ceil(math.log(factor) / math.log(slem)))


def measured_contraction(mixings: Iterable[sp.spmatrix], n: int, seed: int = 0) -> float:
    """Per-round shrink of the disagreement ‖x − x̄‖ under x ← W_r x, measured.

    x starts standard normal, shape (n, 4); returns (d_t / d_0)^(1/t), the geometric
    mean over the rounds of ``mixings``, stopping early once d_t < 1e-9·d_0 (beyond
    that only rounding error is left). For a static symmetric doubly stochastic W it
    is at most |λ_2(W)|; for a time-varying schedule it is the number to compare.
    """
    x = np.random.default_rng(seed).standard_normal((n, 4))
    start = np.linalg.norm(x - x.mean(axis=0))
    if start == 0.0:
        return 1.0
    ratio, rounds = 1.0, 0
    for w in mixings:
        x = w @ x
        rounds += 1
        ratio = np.linalg.norm(x - x.mean(axis=0)) / start
        if ratio < 1e-9:
            break
    return float(ratio ** (1.0 / rounds)) if rounds else 1.0


def diameter(g: nx.Graph, seed: int = 0) -> tuple[int | None, bool]:
    """(diameter, exact?); None if disconnected.

    Exact (breadth-first search from every node, in C via scipy, O(n·m)) for
    n ≤ :data:`EXACT_DIAMETER_MAX_N`; above it networkx's double-sweep lower bound,
    which is exact on many graphs but only an estimate in general.
    """
    n = g.number_of_nodes()
    if n == 0 or not nx.is_connected(g):
        return None, True
    if n > EXACT_DIAMETER_MAX_N:
        return nx.approximation.diameter(g, seed=seed), False
    adjacency = nx.to_scipy_sparse_array(g, nodelist=range(n), format="csr")
    longest = 0.0
    for start in range(0, n, 256):  # 256 sources at a time keeps memory at 256·n floats
        hops = shortest_path(
            adjacency,
            unweighted=True,
            directed=False,
            indices=np.arange(start, min(n, start + 256)),
        )
        longest = max(longest, float(hops.max()))
    return int(longest), True


def analyze(g: nx.Graph, w: sp.spmatrix, rule: str, factor: float = 1e-3) -> dict[str, Any]:
    """Everything ``fedmerge topology show`` prints, as a JSON-ready dict."""
    degrees = np.fromiter((d for _, d in g.degree()), dtype=np.int64, count=g.number_of_nodes())
    connected = g.number_of_nodes() > 0 and nx.is_connected(g)
    diam, exact = diameter(g)
    props = stochasticity(w)
    slem = second_eigenvalue_modulus(w, props["symmetric"]) if connected else 1.0
    return {
        "n": g.number_of_nodes(),
        "edges": g.number_of_edges(),
        "degree_min": int(degrees.min()) if len(degrees) else 0,
        "degree_max": int(degrees.max()) if len(degrees) else 0,
        "degree_mean": float(degrees.mean()) if len(degrees) else 0.0,
        "connected": connected,
        "components": nx.number_connected_components(g) if g.number_of_nodes() else 0,
        "diameter": diam,
        "diameter_exact": exact,
        "mixing": rule,
        **props,
        "second_eigenvalue": slem,
        "spectral_gap": 1.0 - slem,
        "shrink_factor": factor,
        "rounds_to_shrink": rounds_to_shrink(slem, factor),
    }
