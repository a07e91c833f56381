"""fedmerge: decentralized and continual model merging.

The public Python API; each name lives in the module named after its idea.
"""

from fedmerge.decentralized.agent import Agent
from fedmerge.alignment import (
    PermutationSpec,
    activation_matching,
    apply_permutation,
    permutation_spec,
    reset_bn_stats,
    weight_matching,
)
from fedmerge.checkpoint import (
    Checkpoint,
    CheckpointWriter,
    TensorSpec,
    load_state_dict,
    open_checkpoint,
    read_metadata,
    save_state_dict,
)
from fedmerge.config import SimConfig, default_config, load_config
from fedmerge.continual import (
    CONTINUAL_METHODS,
    ContinualMerger,
    ContinualStore,
    default_projectable,
    linear_keys_from_module,
    make_merger,
)
from fedmerge.data.datasets import Dataset, load_dataset
from fedmerge.data.partition import FederatedData, federate
from fedmerge.data.tasks import TASK_NAMES, Task, TaskFamily, make_task_family
from fedmerge.dimat import dimat_merge
from fedmerge.dissemination import Arrival, DisseminationResult, disseminate, fold_directly
from fedmerge.errors import CheckpointError, ConfigError, FedmergeError, ValidationError
from fedmerge.merging import METHODS as MERGE_METHODS
from fedmerge.merging import MergeReport, merge, merge_checkpoints
from fedmerge.models import MODELS, build_model
from fedmerge.decentralized.payload import Payload, validate_payload
from fedmerge.decentralized.protocols import PROTOCOLS
from fedmerge.report import summarize, write_run
from fedmerge.runtimes.torchdist import PeerFailure
from fedmerge.runtimes.local.simulator import Simulator, build_setup
from fedmerge.statedict import (
    StateDict,
    add_task_vector,
    check_finite,
    check_same_specs,
    content_hash,
    global_norm,
    state_hash,
    task_vector,
)
from fedmerge.sweep import run_sweep
from fedmerge.topology import RoundPlan, Topology, build_topology, list_presets

__version__ = "0.1.0"

from fedmerge.decentralized.adversary import Adversary, byzantine_nodes, freshest
from fedmerge.decentralized.persist import restore_agent, save_agent
from fedmerge.decentralized.robust import RULES as AGGREGATION_RULES
from fedmerge.decentralized.robust import clip as clip_aggregate
from fedmerge.decentralized.robust import krum as krum_aggregate
from fedmerge.decentralized.robust import median as median_aggregate
from fedmerge.decentralized.robust import trimmed_mean as trimmed_mean_aggregate
from fedmerge.stheader import parse_header, read_file_header

__all__ = [
    "Agent",
    "Dataset",
    "FederatedData",
    "PROTOCOLS",
    "Payload",
    "SimConfig",
    "Simulator",
    "build_setup",
    "default_config",
    "federate",
    "load_config",
    "load_dataset",
    "run_sweep",
    "summarize",
    "validate_payload",
    "write_run",
    "TASK_NAMES",
    "Task",
    "TaskFamily",
    "make_task_family",
    "CONTINUAL_METHODS",
    "ContinualMerger",
    "ContinualStore",
    "default_projectable",
    "linear_keys_from_module",
    "make_merger",
    "Checkpoint",
    "CheckpointError",
    "CheckpointWriter",
    "ConfigError",
    "FedmergeError",
    "RoundPlan",
    "MERGE_METHODS",
    "MergeReport",
    "StateDict",
    "TensorSpec",
    "Topology",
    "ValidationError",
    "add_task_vector",
    "build_topology",
    "check_finite",
    "check_same_specs",
    "content_hash",
    "global_norm",
    "list_presets",
    "load_state_dict",
    "merge",
    "merge_checkpoints",
    "open_checkpoint",
    "read_metadata",
    "save_state_dict",
    "state_hash",
    "task_vector",
    "MODELS",
    "build_model",
    "PermutationSpec",
    "activation_matching",
    "apply_permutation",
    "dimat_merge",
    "Arrival",
    "DisseminationResult",
    "disseminate",
    "fold_directly",
    "permutation_spec",
    "reset_bn_stats",
    "weight_matching",
    "AGGREGATION_RULES",
    "Adversary",
    "byzantine_nodes",
    "clip_aggregate",
    "freshest",
    "krum_aggregate",
    "median_aggregate",
    "parse_header",
    "read_file_header",
    "restore_agent",
    "save_agent",
    "trimmed_mean_aggregate",
    "PeerFailure",
]
