"""fedmerge: decentralized and continual model merging.

The public Python API; each name lives in the module named after its idea and is imported on
first use (``import fedmerge`` alone loads neither torch nor scipy, so the CLI starts at once).

>>> import fedmerge
>>> fedmerge.load_config(None, ["rounds=2"]).rounds
2
"""

from __future__ import annotations

from fedmerge.lazy import lazy_exports

__version__ = "0.1.0"

_EXPORTS: dict[str, tuple[str, ...]] = {
    "Agent": ("fedmerge.agent",),
    "Dataset": ("fedmerge.data.datasets",),
    "FederatedData": ("fedmerge.data.partition",),
    "PROTOCOLS": ("fedmerge.protocols",),
    "Payload": ("fedmerge.payload",),
    "SimConfig": ("fedmerge.config",),
    "Simulator": ("fedmerge.simulator",),
    "build_setup": ("fedmerge.simulator",),
    "default_config": ("fedmerge.config",),
    "federate": ("fedmerge.data.partition",),
    "load_config": ("fedmerge.config",),
    "load_dataset": ("fedmerge.data.datasets",),
    "run_sweep": ("fedmerge.sweep",),
    "summarize": ("fedmerge.report",),
    "validate_payload": ("fedmerge.payload",),
    "write_run": ("fedmerge.report",),
    "TASK_NAMES": ("fedmerge.data.tasks",),
    "Task": ("fedmerge.data.tasks",),
    "TaskFamily": ("fedmerge.data.tasks",),
    "make_task_family": ("fedmerge.data.tasks",),
    "CONTINUAL_METHODS": ("fedmerge.continual",),
    "ContinualMerger": ("fedmerge.continual",),
    "ContinualStore": ("fedmerge.continual",),
    "default_projectable": ("fedmerge.continual",),
    "linear_keys_from_module": ("fedmerge.continual",),
    "make_merger": ("fedmerge.continual",),
    "Checkpoint": ("fedmerge.checkpoint",),
    "CheckpointError": ("fedmerge.errors",),
    "CheckpointWriter": ("fedmerge.checkpoint",),
    "ConfigError": ("fedmerge.errors",),
    "FedmergeError": ("fedmerge.errors",),
    "RoundPlan": ("fedmerge.topology",),
    "MERGE_METHODS": ("fedmerge.merging", "METHODS"),
    "MergeReport": ("fedmerge.merging",),
    "StateDict": ("fedmerge.statedict",),
    "TensorSpec": ("fedmerge.checkpoint",),
    "Topology": ("fedmerge.topology",),
    "ValidationError": ("fedmerge.errors",),
    "add_task_vector": ("fedmerge.statedict",),
    "build_topology": ("fedmerge.topology",),
    "check_finite": ("fedmerge.statedict",),
    "check_same_specs": ("fedmerge.statedict",),
    "content_hash": ("fedmerge.statedict",),
    "global_norm": ("fedmerge.statedict",),
    "list_presets": ("fedmerge.topology",),
    "load_state_dict": ("fedmerge.checkpoint",),
    "merge": ("fedmerge.merging",),
    "merge_checkpoints": ("fedmerge.merging",),
    "open_checkpoint": ("fedmerge.checkpoint",),
    "read_metadata": ("fedmerge.checkpoint",),
    "save_state_dict": ("fedmerge.checkpoint",),
    "state_hash": ("fedmerge.statedict",),
    "task_vector": ("fedmerge.statedict",),
    "MODELS": ("fedmerge.models",),
    "build_model": ("fedmerge.models",),
    "PermutationSpec": ("fedmerge.alignment",),
    "activation_matching": ("fedmerge.alignment",),
    "apply_permutation": ("fedmerge.alignment",),
    "dimat_merge": ("fedmerge.dimat",),
    "Arrival": ("fedmerge.dissemination",),
    "DisseminationResult": ("fedmerge.dissemination",),
    "disseminate": ("fedmerge.dissemination",),
    "fold_directly": ("fedmerge.dissemination",),
    "permutation_spec": ("fedmerge.alignment",),
    "reset_bn_stats": ("fedmerge.alignment",),
    "weight_matching": ("fedmerge.alignment",),
    "AGGREGATION_RULES": ("fedmerge.robust", "RULES"),
    "Adversary": ("fedmerge.adversary",),
    "byzantine_nodes": ("fedmerge.adversary",),
    "clip_aggregate": ("fedmerge.robust", "clip"),
    "freshest": ("fedmerge.adversary",),
    "krum_aggregate": ("fedmerge.robust", "krum"),
    "median_aggregate": ("fedmerge.robust", "median"),
    "parse_header": ("fedmerge.stheader",),
    "read_file_header": ("fedmerge.stheader",),
    "restore_agent": ("fedmerge.persist",),
    "save_agent": ("fedmerge.persist",),
    "trimmed_mean_aggregate": ("fedmerge.robust", "trimmed_mean"),
    "PeerFailure": ("fedmerge.runtimes.torchdist",),
}
"""public name -> (module, attribute in it when it differs from the name)"""

__all__ = list(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
