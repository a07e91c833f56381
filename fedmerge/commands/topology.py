"""Inspect topologies: who talks to whom, with what weight, and how fast gossip mixes.

SPEC is a preset name (see 'fedmerge topology list'), a generator name (ring,
complete, star, line, grid, torus, hypercube, exponential, erdos_renyi,
watts_strogatz, barabasi_albert, random_regular, or any networkx generator), a
YAML spec file, or a graph file (.graphml, .edgelist, .adjlist).

examples:
  fedmerge topology list
  fedmerge topology show ring-8
  fedmerge topology show torus --n 36 --set mixing=uniform
  fedmerge topology show watts_strogatz --n 10000 --set k=6 --set p=0.1 --json
  fedmerge topology show complete-8 --set schedule.kind=random_matching --round 3
  fedmerge topology show small-world-16 --plot small-world-16.png
  fedmerge topology show my-graph.graphml --set mixing=edge_weights

The table shows degrees, diameter (an estimate above 2,000 nodes), whether W is
row-/doubly stochastic, the spectral gap 1 - |lambda_2(W)| and the rounds of
gossip averaging x <- Wx needed to shrink the disagreement 1000-fold.
"""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

if TYPE_CHECKING:
    from fedmerge.topology import RoundPlan, Topology

NAME = "topology"
HELP = "show, list and draw communication topologies (graphs + mixing weights)"
NEIGHBOUR_TABLE_MAX_N = 40


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    show = sub.add_parser(
        "show",
        help="analyse one topology (table, --json, --plot)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    show.add_argument("spec", metavar="SPEC", help="preset, generator, YAML spec or graph file")
    show.add_argument("--n", type=int, default=None, help="number of nodes")
    show.add_argument("--seed", type=int, default=None, help="seed of random graphs/schedules")
    show.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="K=V",
        help="override a spec field, e.g. mixing=uniform, p=0.2, schedule.kind=random_matching",
    )
    show.add_argument("--json", action="store_true", help="print the analysis as JSON")
    show.add_argument("--plot", metavar="FILE", default=None, help="also draw it to a PNG")
    show.add_argument("--round", type=int, default=None, help="show the plan of this round")
    show.add_argument(
        "--total-rounds", type=int, default=None, help="rounds in the run (sparse_then_complete)"
    )
    sub.add_parser("list", help="list the named presets")


def run(args: argparse.Namespace) -> int:
    if args.action == "list":
        return _list()
    from fedmerge.topology import RoundPlan, build_topology

    topo = build_topology(args.spec, n=args.n, seed=args.seed, overrides=args.overrides)
    report = topo.analyze()
    plan = None
    if args.round is not None:
        plan = topo.round(args.round, total_rounds=args.total_rounds)
        report["round"] = _plan_summary(plan)
    if args.plot:
        from fedmerge.report import draw_topology

        report["plot"] = str(draw_topology(topo, args.plot, plan=plan))
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    console = Console()
    console.print(_summary_table(report))
    if topo.n <= NEIGHBOUR_TABLE_MAX_N:
        static = RoundPlan(round=0, mixing=topo.mixing, kind="static W")
        console.print(_neighbour_table(topo, plan or static))
    if args.plot:
        console.print(f"wrote {escape(report['plot'])}")
    return 0


def _plan_summary(plan: RoundPlan) -> dict[str, Any]:
    return {"round": plan.round, "kind": plan.kind, "edges": [list(e) for e in plan.edges]}


def _summary_table(report: dict[str, Any]) -> Table:
    table = Table(title=f"topology {escape(str(report['name']))}", show_header=False)
    table.add_column("property", style="bold")
    table.add_column("value")
    diameter = report["diameter"]
    rounds = report["rounds_to_shrink"]
    rows = [
        ("nodes", report["n"]),
        ("edges", report["edges"]),
        (
            "degree min / mean / max",
            f"{report['degree_min']} / {report['degree_mean']:.2f} / {report['degree_max']}",
        ),
        ("connected", f"{report['connected']} ({report['components']} component(s))"),
        (
            "diameter",
            "-"
            if diameter is None
            else f"{diameter}{'' if report['diameter_exact'] else ' (lower-bound estimate)'}",
        ),
        ("mixing rule", report["mixing"]),
        (
            "row / doubly stochastic, symmetric",
            f"{report['row_stochastic']} / {report['doubly_stochastic']}, {report['symmetric']}",
        ),
        ("|lambda_2(W)|", f"{report['second_eigenvalue']:.6f}"),
        ("spectral gap", f"{report['spectral_gap']:.6f}"),
        (
            f"gossip rounds to shrink x{report['shrink_factor']:g}",
            "never" if rounds is None else rounds,
        ),
        ("schedule", report["schedule"]),
    ]
    if "measured_contraction" in report:
        rows.append(
            (
                f"measured shrink per round ({report['measured_rounds']} rounds)",
                f"{report['measured_contraction']:.6f}",
            )
        )
    if "round" in report:
        rows.append(
            (
                f"round {report['round']['round']}",
                f"{report['round']['kind']}, {len(report['round']['edges'])} edges",
            )
        )
    for key, value in rows:
        table.add_row(key, escape(str(value)))
    return table


def _neighbour_table(topo: Topology, plan: RoundPlan) -> Table:
    when = (
        "the graph's static W" if plan.kind == "static W" else f"round {plan.round} ({plan.kind})"
    )
    table = Table(title=f"in-weights W_ij, {when}",
                  caption="a node's new model: self × its own + Σ W_ij × neighbour j's; "
                  "self is W_ii")  # fmt: skip
    table.add_column("node", justify="right")
    table.add_column("self", justify="right")
    table.add_column("neighbours j: W_ij")
    for i, row in enumerate(plan.neighbors):
        own = next((w for j, w in row if j == i), 0.0)
        others = ", ".join(f"{j}: {w:.3f}" for j, w in row if j != i)
        label = str(i) if topo.labels is None else escape(f"{i} ({topo.labels[i]})")
        table.add_row(label, f"{own:.3f}", others or "-")
    return table


def _list() -> int:
    from fedmerge.topology.specs import list_presets, resolve_spec

    table = Table(title="topology presets (topologies/*.yaml)",
                  caption="use one as SPEC, or in a config: topology: NAME")  # fmt: skip
    table.add_column("name", style="bold", no_wrap=True)
    table.add_column("n", justify="right", no_wrap=True)
    table.add_column("graph · mixing · schedule, and what it is")
    for name in list_presets():
        spec = resolve_spec(name)
        schedule = spec["schedule"]
        kind = schedule if isinstance(schedule, str) else schedule.get("kind", "static")
        n = spec["n"] if spec["n"] is not None else _count(spec)
        what = escape(f"{spec['graph']} · {spec['mixing']} · {kind}")
        if spec["description"]:
            what += f"\n[dim]{escape(spec['description'])}[/]"
        table.add_row(escape(name), str(n), what)
    Console().print(table)
    return 0


def _count(spec: dict[str, Any]) -> str:
    params = spec["params"]
    if "rows" in params and "cols" in params:
        return str(params["rows"] * params["cols"])
    return "?"
