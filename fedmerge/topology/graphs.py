"""Graph generators by name, graph files, and the checks every topology graph passes.

A generator is a plain function returning an undirected :class:`networkx.Graph`.
Names not in :data:`GENERATORS` fall back to networkx itself (``"petersen"``,
``"barbell_graph"`` …) with the same keyword checks.

>>> g = make_graph("exponential", {"n": 16})
>>> sorted({d for _, d in g.degree()})
[7]
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import networkx as nx

from fedmerge.atomic import atomic_write_text
from fedmerge.errors import ConfigError

GRAPH_FILE_FORMATS = ("graphml", "edgelist", "adjlist")
GRAPH_FILE_SUFFIXES = {
    ".graphml": "graphml",
    ".xml": "graphml",
    ".edgelist": "edgelist",
    ".edges": "edgelist",
    ".txt": "edgelist",
    ".csv": "edgelist",
    ".adjlist": "adjlist",
    ".adj": "adjlist",
}


def ring(n: int) -> nx.Graph:
    """Cycle 0-1-…-(n-1)-0 (each node has 2 neighbours; n ≤ 2 is a path, no self-loop)."""
    return nx.cycle_graph(n) if n >= 3 else nx.path_graph(n)


def complete(n: int) -> nx.Graph:
    """Every pair of nodes is an edge."""
    return nx.complete_graph(n)


def star(n: int) -> nx.Graph:
    """Hub 0 joined to leaves 1..n-1 (n nodes in all)."""
    return nx.star_graph(n - 1)


def line(n: int) -> nx.Graph:
    """Path 0-1-…-(n-1)."""
    return nx.path_graph(n)


def grid(rows: int, cols: int, periodic: bool = False) -> nx.Graph:
    """rows × cols lattice, node r*cols + c; ``periodic`` wraps it into a torus."""
    g = nx.grid_2d_graph(rows, cols, periodic=periodic)
    return nx.relabel_nodes(g, {(r, c): r * cols + c for r, c in g.nodes})


def torus(rows: int, cols: int) -> nx.Graph:
    """rows × cols lattice with wrap-around (degree 4 when rows, cols ≥ 3)."""
    return grid(rows, cols, periodic=True)


def hypercube(dim: int) -> nx.Graph:
    """2^dim nodes; i ~ j when their binary labels differ in one bit (degree dim)."""
    if not isinstance(dim, int) or dim < 0:
        raise ConfigError(f"graph 'hypercube' needs a dimension dim >= 0, got {dim!r}")
    g = nx.empty_graph(2**dim)
    g.add_edges_from(
        (i, i ^ (1 << b)) for i in range(2**dim) for b in range(dim) if i < i ^ (1 << b)
    )
    return g


def exponential(n: int) -> nx.Graph:
    """Static exponential graph: i ~ (i ± 2^k) mod n for every 2^k < n.

    For n a power of two every node has degree 2·log2(n) − 1 (offset n/2 is its own negative).
    """
    g = nx.empty_graph(n)
    k = 1
    while k < n:
        g.add_edges_from((i, (i + k) % n) for i in range(n) if (i + k) % n != i)
        k *= 2
    return g


def erdos_renyi(n: int, p: float, seed: int | None = None) -> nx.Graph:
    """G(n, p): each pair is an edge with probability p."""
    return nx.fast_gnp_random_graph(n, p, seed=seed)


def watts_strogatz(n: int, k: int = 4, p: float = 0.1, seed: int | None = None) -> nx.Graph:
    """Small world: ring lattice with k nearest neighbours, each edge rewired with probability p."""
    return nx.watts_strogatz_graph(n, k, p, seed=seed)


def barabasi_albert(n: int, m: int = 2, seed: int | None = None) -> nx.Graph:
    """Preferential attachment: each new node attaches to m existing ones."""
    return nx.barabasi_albert_graph(n, m, seed=seed)


def random_regular(n: int, d: int = 3, seed: int | None = None) -> nx.Graph:
    """Uniformly random d-regular graph (n·d must be even)."""
    return nx.random_regular_graph(d, n, seed=seed)


def file(path: str, format: str = "auto") -> nx.Graph:  # noqa: A002 - the spec field is `format`
    """Read a graph file: GraphML, edge list (``u v [weight]``) or adjacency list.

    A ``weight`` edge attribute is kept (used by the ``edge_weights`` mixing rule).
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"graph file not found: {p} (field 'path')")
    fmt = GRAPH_FILE_SUFFIXES.get(p.suffix.lower()) if format == "auto" else format
    if fmt not in GRAPH_FILE_FORMATS:
        raise ConfigError(
            f"cannot tell the format of graph file {p}: set 'format' to one of "
            f"{', '.join(GRAPH_FILE_FORMATS)}"
        )
    try:
        if fmt == "graphml":
            g = nx.read_graphml(p)
        elif fmt == "edgelist":
            g = _read_edgelist(p)
        else:
            g = nx.read_adjlist(p)
    except (nx.NetworkXError, ValueError, TypeError, OSError, SyntaxError) as exc:
        raise ConfigError(f"cannot read graph file {p} as {fmt}: {exc}") from exc
    if g.is_directed() or g.is_multigraph():
        raise ConfigError(f"graph file {p}: directed graphs and multigraphs are not supported")
    return g


def _read_edgelist(p: Path) -> nx.Graph:
    """Edge list with an optional third column ``weight`` (comma or whitespace separated)."""
    g = nx.Graph()
    for lineno, raw in enumerate(p.read_text().splitlines(), start=1):
        text = raw.split("#", 1)[0].replace(",", " ").split()
        if not text:
            continue
        if len(text) not in (2, 3):
            raise ConfigError(f"graph file {p}, line {lineno}: expected 'u v [weight]'")
        if len(text) == 3:
            g.add_edge(text[0], text[1], weight=float(text[2]))
        else:
            g.add_edge(text[0], text[1])
    return g


def write_graph(g: nx.Graph, path: str | Path, format: str = "auto") -> Path:  # noqa: A002
    """Write ``g`` (with any ``weight`` attributes) as GraphML, edge list or adjacency list.

    The file is written atomically and reads back with :func:`file` to the same graph
    (adjacency lists carry no weights).
    """
    p = Path(path)
    fmt = GRAPH_FILE_SUFFIXES.get(p.suffix.lower()) if format == "auto" else format
    if fmt == "graphml":
        text = "\n".join(nx.generate_graphml(g))
    elif fmt == "edgelist":
        rows = (
            f"{u} {v} {w}" if w is not None else f"{u} {v}" for u, v, w in g.edges(data="weight")
        )
        text = "\n".join(rows)
    elif fmt == "adjlist":
        text = "\n".join(nx.generate_adjlist(g))
    else:
        raise ConfigError(f"cannot tell the graph format of {p}: use one of {GRAPH_FILE_FORMATS}")
    atomic_write_text(p, text + "\n")
    return p


GENERATORS: dict[str, Callable[..., nx.Graph]] = {
    f.__name__: f
    for f in (
        ring,
        complete,
        star,
        line,
        grid,
        torus,
        hypercube,
        exponential,
        erdos_renyi,
        watts_strogatz,
        barabasi_albert,
        random_regular,
        file,
    )
}


def generator(name: str) -> Callable[..., nx.Graph]:
    """The generator called ``name``: ours first, then ``networkx.<name>[_graph]``.

    Only functions from ``networkx.generators`` qualify: a spec cannot call readers,
    writers or algorithms.
    """
    if name in GENERATORS:
        return GENERATORS[name]
    for candidate in (name, f"{name}_graph"):
        fn = getattr(nx, candidate, None)
        module = getattr(fn, "__module__", "") or ""
        if callable(fn) and not inspect.isclass(fn) and module.startswith("networkx.generators."):
            return fn
    raise ConfigError(
        f"unknown graph generator {name!r} (field 'graph'); built in: {', '.join(GENERATORS)}, "
        "or any networkx generator such as 'petersen_graph' or 'barbell_graph'"
    )


def make_graph(
    name: str, params: Mapping[str, Any], *, n: int | None = None, seed: int | None = None
) -> nx.Graph:
    """Call generator ``name`` with ``params`` (checked against its signature).

    ``n`` is passed to generators that take it and translated where the generator
    counts differently (``hypercube`` takes ``dim``, ``grid``/``torus`` take
    ``rows``/``cols``); for any other generator the result must have n nodes.
    ``seed`` is passed to generators that accept one.
    """
    fn = generator(name)
    accepted = _parameters(fn)
    kwargs = dict(params)
    takes_n = "n" in accepted or name in ("hypercube", "grid", "torus")
    if n is not None and takes_n:
        kwargs.setdefault("n", n)
    kwargs = _translate_n(name, kwargs)
    if "seed" in accepted and seed is not None:
        kwargs.setdefault("seed", seed)
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ConfigError(
            f"graph {name!r} does not take {', '.join(map(repr, unknown))}; "
            f"it takes: {', '.join(accepted) or 'nothing'}"
        )
    missing = [p for p, required in accepted.items() if required and p not in kwargs]
    if missing:
        raise ConfigError(f"graph {name!r} needs {', '.join(map(repr, missing))}")
    try:
        g = fn(**kwargs)
    except ConfigError:
        raise
    except (nx.NetworkXError, ValueError, TypeError, ZeroDivisionError) as exc:
        raise ConfigError(f"graph {name!r} with {kwargs}: {exc}") from exc
    if not isinstance(g, nx.Graph):
        raise ConfigError(f"graph {name!r} did not return a networkx graph")
    if n is not None and not takes_n and g.number_of_nodes() != n:
        raise ConfigError(f"graph {name!r} has {g.number_of_nodes()} nodes but n = {n}")
    if g.is_directed() or g.is_multigraph():
        g = nx.Graph(g.to_undirected()) if g.is_directed() else nx.Graph(g)
    return g


def _translate_n(name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Map a node count ``n`` onto generators parameterised otherwise."""
    if "n" not in kwargs:
        return kwargs
    n = kwargs["n"]
    if name == "hypercube" and "dim" not in kwargs:
        dim = round(math.log2(n)) if isinstance(n, int) and n > 0 else -1
        if dim < 0 or 2**dim != n:
            raise ConfigError(f"graph 'hypercube' needs n to be a power of two, got n={n}")
        return {**{k: v for k, v in kwargs.items() if k != "n"}, "dim": dim}
    if name in ("grid", "torus") and "rows" not in kwargs and "cols" not in kwargs:
        side = math.isqrt(n) if isinstance(n, int) and n > 0 else 0
        if side * side != n:
            raise ConfigError(f"graph {name!r} needs rows and cols, or n a perfect square; n={n}")
        return {**{k: v for k, v in kwargs.items() if k != "n"}, "rows": side, "cols": side}
    if name in ("grid", "torus"):
        rows, cols = kwargs.get("rows"), kwargs.get("cols")
        if rows is not None and cols is not None and rows * cols != n:
            raise ConfigError(f"graph {name!r}: rows × cols = {rows * cols} but n = {n}")
        kwargs = {k: v for k, v in kwargs.items() if k != "n"}
        if rows is None:
            kwargs["rows"] = n // cols
        elif cols is None:
            kwargs["cols"] = n // rows
    return kwargs


def _parameters(fn: Callable[..., Any]) -> dict[str, bool]:
    """Keyword parameters of a generator → whether each is required."""
    skip = {"create_using", "backend", "backend_kwargs"}
    out = {}
    for p in inspect.signature(fn).parameters.values():
        if p.name in skip or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        out[p.name] = p.default is inspect.Parameter.empty
    return out


def normalize_labels(g: nx.Graph) -> tuple[nx.Graph, list[Any] | None]:
    """Relabel nodes to 0..n-1; return the graph and ``labels`` (None if unchanged).

    Labels that are the strings "0".."n-1" (GraphML, edge lists) map to those integers;
    any other labels are numbered in the graph's node order and kept in ``labels``
    (``labels[i]`` is the original label of node i).
    """
    nodes = list(g.nodes)
    n = len(nodes)
    as_int = _int_labels(nodes)
    if as_int is not None and sorted(as_int) == list(range(n)):
        if all(isinstance(v, int) for v in nodes):
            return g, None
        return nx.relabel_nodes(g, dict(zip(nodes, as_int, strict=True))), None
    mapping = {label: i for i, label in enumerate(nodes)}
    return nx.relabel_nodes(g, mapping), nodes


def _int_labels(nodes: list[Any]) -> list[int] | None:
    out = []
    for v in nodes:
        if isinstance(v, bool):
            return None
        if isinstance(v, int):
            out.append(v)
        elif isinstance(v, str) and v.strip().lstrip("-").isdigit():
            out.append(int(v))
        else:
            return None
    return out


def check_graph(g: nx.Graph, *, allow_disconnected: bool = False, source: str = "graph") -> None:
    """Refuse graphs no mixing rule should run on, naming the problem."""
    if g.number_of_nodes() == 0:
        raise ConfigError(f"{source} has no nodes (field 'n' or the graph file is empty)")
    loops = list(nx.selfloop_edges(g))
    if loops:
        shown = ", ".join(str(u) for u, _ in loops[:5])
        raise ConfigError(
            f"{source} has self-loops at node(s) {shown}: remove them, the mixing rule "
            "sets every node's self weight"
        )
    for u, v, w in g.edges(data="weight"):
        if w is not None and not (isinstance(w, (int, float)) and math.isfinite(w) and w > 0):
            raise ConfigError(f"{source}: edge ({u}, {v}) has weight {w!r}; weights must be > 0")
    if not allow_disconnected and not nx.is_connected(g):
        parts = nx.number_connected_components(g)
        biggest = max(len(c) for c in nx.connected_components(g))
        raise ConfigError(
            f"{source} is disconnected: {parts} components (largest has {biggest} of "
            f"{g.number_of_nodes()} nodes), so gossip can never reach consensus; "
            "set 'allow_disconnected: true' to use it anyway"
        )
