"""fedmerge: decentralized and continual model merging.

The public Python API; each name lives in the module named after its idea.
"""

from fedmerge.checkpoint import (
    Checkpoint,
    CheckpointWriter,
    TensorSpec,
    load_state_dict,
    open_checkpoint,
    read_metadata,
    save_state_dict,
)
from fedmerge.errors import CheckpointError, ConfigError, FedmergeError, ValidationError
from fedmerge.merging import METHODS as MERGE_METHODS
from fedmerge.merging import MergeReport, merge, merge_checkpoints
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

__version__ = "0.1.0"

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "CheckpointWriter",
    "ConfigError",
    "FedmergeError",
    "MERGE_METHODS",
    "MergeReport",
    "StateDict",
    "TensorSpec",
    "ValidationError",
    "add_task_vector",
    "check_finite",
    "check_same_specs",
    "content_hash",
    "global_norm",
    "load_state_dict",
    "merge",
    "merge_checkpoints",
    "open_checkpoint",
    "read_metadata",
    "save_state_dict",
    "state_hash",
    "task_vector",
]
