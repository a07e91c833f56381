"""fedmerge: decentralized and continual model merging.

The public Python API; each name lives in the module named after its idea and is imported
on first use (PEP 562), so ``import fedmerge`` stays cheap (it loads neither torch, scipy,
Flower nor torch.distributed, so the CLI starts at once):

>>> import fedmerge
>>> fedmerge.build_topology("ring", n=4).n
4
"""

from __future__ import annotations

from fedmerge.lazy import lazy_exports

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    # module: names (a name "alias=attr" exports module.attr as alias)
    "fedmerge.alignment": "PermutationSpec activation_matching apply_permutation "
    "permutation_spec reset_bn_stats weight_matching",
    "fedmerge.checkpoint": "Checkpoint CheckpointWriter TensorSpec load_state_dict "
    "open_checkpoint read_metadata save_state_dict",
    "fedmerge.config": "SimConfig default_config load_config",
    "fedmerge.continual": "CONTINUAL_METHODS ContinualMerger ContinualStore default_projectable "
    "linear_keys_from_module make_merger",
    "fedmerge.data.datasets": "Dataset load_dataset",
    "fedmerge.data.partition": "FederatedData federate",
    "fedmerge.data.tasks": "TASK_NAMES Task TaskFamily make_task_family",
    "fedmerge.decentralized.adversary": "Adversary byzantine_nodes freshest",
    "fedmerge.decentralized.agent": "Agent",
    "fedmerge.decentralized.dissemination": "Arrival DisseminationResult disseminate fold_directly",
    "fedmerge.decentralized.engine": "Engine RoundRunner",
    "fedmerge.decentralized.payload": "Payload validate_payload",
    "fedmerge.decentralized.persist": "restore_agent save_agent",
    "fedmerge.decentralized.protocols": "PROTOCOLS",
    "fedmerge.decentralized.receive": "receive_and_merge",
    "fedmerge.decentralized.robust": "AGGREGATION_RULES=RULES clip_aggregate=clip "
    "krum_aggregate=krum median_aggregate=median trimmed_mean_aggregate=trimmed_mean",
    "fedmerge.decentralized.setup": "Setup build_setup",
    "fedmerge.dimat": "dimat_merge",
    "fedmerge.errors": "CheckpointError ConfigError FedmergeError ValidationError",
    "fedmerge.merging": "MERGE_METHODS=METHODS MergeReport merge merge_checkpoints",
    "fedmerge.models": "MODELS build_model",
    "fedmerge.report": "summarize write_run",
    "fedmerge.runtimes": "RUNTIMES run",
    "fedmerge.runtimes.local": "Simulator",
    "fedmerge.runtimes.torchdist": "PeerFailure",
    "fedmerge.statedict": "StateDict add_task_vector check_finite check_same_specs "
    "content_hash global_norm state_hash task_vector",
    "fedmerge.stheader": "parse_header read_file_header",
    "fedmerge.sweep": "run_sweep",
    "fedmerge.topology": "RoundPlan Topology build_topology list_presets",
}
__all__, __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
