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
from fedmerge.continual import (
    CONTINUAL_METHODS,
    ContinualMerger,
    ContinualStore,
    default_projectable,
    linear_keys_from_module,
    make_merger,
)
from fedmerge.data.tasks import TASK_NAMES, Task, TaskFamily, make_task_family
from fedmerge.errors import CheckpointError, ConfigError, FedmergeError, ValidationError
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
    "StateDict",
    "TensorSpec",
    "ValidationError",
    "add_task_vector",
    "check_finite",
    "check_same_specs",
    "content_hash",
    "global_norm",
    "load_state_dict",
    "open_checkpoint",
    "read_metadata",
    "save_state_dict",
    "state_hash",
    "task_vector",
]
