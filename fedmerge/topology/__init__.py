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
diameter), :mod:`.specs` (presets, YAML, overrides), :mod:`.draw` (PNG).
"""

from fedmerge.lazy import lazy_exports

_EXPORTS = {
    "GENERATORS": ("fedmerge.topology.graphs",),
    "MIXING_RULES": ("fedmerge.topology.mixing",),
    "SCHEDULES": ("fedmerge.topology.schedules",),
    "RoundPlan": ("fedmerge.topology.schedules",),
    "Topology": ("fedmerge.topology.build",),
    "build_topology": ("fedmerge.topology.build",),
    "list_presets": ("fedmerge.topology.specs",),
    "make_graph": ("fedmerge.topology.graphs",),
    "make_schedule": ("fedmerge.topology.schedules",),
    "mixing_matrix": ("fedmerge.topology.mixing",),
    "preset_path": ("fedmerge.topology.specs",),
    "resolve_spec": ("fedmerge.topology.specs",),
    "rounds_to_shrink": ("fedmerge.topology.analysis",),
    "second_eigenvalue_modulus": ("fedmerge.topology.analysis",),
    "spectral_gap": ("fedmerge.topology.analysis",),
    "stochasticity": ("fedmerge.topology.mixing",),
    "write_graph": ("fedmerge.topology.graphs",),
}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
