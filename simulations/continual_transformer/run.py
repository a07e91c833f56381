r"""Continual merging in the transformer regime: LoRA experts of a tiny ViT, folded in orders.

The continual digits recipe (``simulations/continual/run.py``: the same orders, methods,
references, metrics and outputs) with a different expert set: the body is a
``transformers`` ViT built offline from a config (:class:`fedmerge.continual.experts.ViTBody`,
~230k parameters on 4×4 patches of the 8×8 digits), pretrained on upright digits plus
distorted copies (the broad task), and each task's expert is a ``peft`` LoRA adapter
(``get_peft_model``, r = 8, on every attention and MLP projection) trained with the
task's frozen head and merged back to a dense body with ``merge_and_unload``, so its
task vector τ_t = θ_t − θ₀ has rank ≤ 8 per adapted layer.

    python simulations/continual_transformer/run.py \
        --config simulations/continual_transformer/vit.yaml
    fedmerge sweep simulations/continual_transformer/vit.yaml --set orders=2   # the same run

Writes ``steps.csv``, ``summary.json``, ``table.md`` and ``accuracy_vs_step.png`` to ``out``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fedmerge.config import option
from fedmerge.continual.experts import (
    BodyConfig,
    FinetuneSpec,
    LoraSpec,
    PretrainSpec,
    TaskDataConfig,
)
from fedmerge.recipe import Recipe, load_script

continual = load_script(Path(__file__).parents[1] / "continual" / "run.py")
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"]  # every ViT Linear


@dataclass
class TransformerConfig(continual.ContinualConfig):
    """:class:`ContinualConfig` with the transformer regime's defaults (``vit.yaml``)."""

    orders: int = option(5, "random task orders (seeded); mean ± std is over these")
    data: TaskDataConfig = field(default_factory=lambda: TaskDataConfig(augment=2))
    model: BodyConfig = field(default_factory=lambda: BodyConfig(arch="vit"))
    pretrain: PretrainSpec = field(default_factory=lambda: PretrainSpec(steps=800, lr=1e-3))
    finetune: FinetuneSpec = field(
        default_factory=lambda: FinetuneSpec(
            steps=150, lr=3e-3, lora=LoraSpec(r=8, alpha=16.0, target_modules=list(PROJECTIONS))
        )
    )
    out: str = option("simulations/results/continual_transformer", "output directory")


RECIPE = Recipe(
    "continual_transformer", TransformerConfig, run=continual.run, units=continual.units,
    write=continual.write, show=continual.show, doc=__doc__,
)  # fmt: skip

if __name__ == "__main__":
    raise SystemExit(RECIPE.main())
