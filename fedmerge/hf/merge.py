"""One-shot merges written as a PEFT LoRA adapter (``fedmerge merge --as-adapter``).

The merge runs through the ordinary engine (:func:`fedmerge.merging.engine.plan_merge`
and ``run_plan``, key by key; experts may be checkpoints, compressed files or adapters) and its
difference from the base is re-factorized by :func:`fedmerge.hf.refactor.write_adapter`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from fedmerge.checkpoint import check_output, open_checkpoint
from fedmerge.codecs.expert import open_expert
from fedmerge.errors import ConfigError
from fedmerge.hf.modeldir import is_model_dir
from fedmerge.hf.refactor import AdapterReport, write_adapter
from fedmerge.merging.engine import ProgressFactory, plan_merge, run_plan


def merge_to_adapter(
    method: str,
    base_path: str | os.PathLike,
    expert_paths: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    rank: int,
    svd: str = "exact",
    weights: Sequence[float] | None = None,
    params: Mapping[str, Any] | None = None,
    progress: ProgressFactory | None = None,
) -> AdapterReport:
    """Merge ``expert_paths`` over the model directory ``base_path``; write a LoRA adapter."""
    if not is_model_dir(base_path):
        raise ConfigError(
            f"{base_path}: --as-adapter needs the base as a Hugging Face model directory "
            "(config.json + safetensors) to know its layer types"
        )
    inputs = [Path(base_path), *map(Path, expert_paths)]
    check_output(
        out, {"base": base_path, **{f"expert {i + 1}": p for i, p in enumerate(expert_paths)}}
    )
    with ExitStack() as stack:
        base = stack.enter_context(open_checkpoint(base_path))
        experts = [stack.enter_context(open_expert(p, base=base)) for p in expert_paths]
        plan = plan_merge(method, base, experts, [str(p) for p in inputs], weights, params)
        meta = {"fedmerge.method": method,
                "fedmerge.params": json.dumps(plan.params, sort_keys=True)}  # fmt: skip
        return write_adapter(out, base, run_plan(plan, progress), base_path, rank, svd,
                             metadata=meta)  # fmt: skip
