"""Topologies: who talks to whom, and with what weight, as data.

>>> from fedmerge.topology import build_topology
>>> topo = build_topology("ring-8")          # a preset from topologies/*.yaml
>>> topo.n, topo.rule
(8, 'metropolis_hastings')
>>> plan = topo.round(0)                     # RoundPlan: mixing (CSR), neighbors, edges
>>> [j for j, _ in plan.neighbors[0]]
[0, 1, 7]

Modules: :mod:`.graphs` (generators, files, checks), :mod:`.mixing` (rules → W),
:mod:`.schedules` (time-varying rounds, churn), :mod:`.analysis` (spectral gap,
diameter), :mod:`.specs` (presets, YAML, overrides); drawing: :func:`fedmerge.report.draw_topology`.
"""

from fedmerge.topology.analysis import rounds_to_shrink, second_eigenvalue_modulus, spectral_gap
from fedmerge.topology.build import Topology, build_topology
from fedmerge.topology.graphs import GENERATORS, make_graph, write_graph
from fedmerge.topology.mixing import MIXING_RULES, mixing_matrix, stochasticity
from fedmerge.topology.schedules import SCHEDULES, RoundPlan, make_schedule
from fedmerge.topology.specs import list_presets, preset_path, resolve_spec

__all__ = [
    "GENERATORS",
    "MIXING_RULES",
    "SCHEDULES",
    "RoundPlan",
    "Topology",
    "build_topology",
    "list_presets",
    "make_graph",
    "make_schedule",
    "mixing_matrix",
    "preset_path",
    "resolve_spec",
    "rounds_to_shrink",
    "second_eigenvalue_modulus",
    "spectral_gap",
    "stochasticity",
    "write_graph",
]
