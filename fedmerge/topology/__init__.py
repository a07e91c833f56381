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

from fedmerge.lazy import lazy_exports

_EXPORTS = {
    "fedmerge.topology.analysis": "rounds_to_shrink second_eigenvalue_modulus spectral_gap",
    "fedmerge.topology.build": "Topology build_topology",
    "fedmerge.topology.graphs": "GENERATORS make_graph write_graph",
    "fedmerge.topology.mixing": "MIXING_RULES mixing_matrix stochasticity",
    "fedmerge.topology.schedules": "SCHEDULES RoundPlan make_schedule",
    "fedmerge.topology.specs": "list_presets preset_path resolve_spec",
}
__all__, __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
