"""Hugging Face interop: PEFT LoRA adapters as experts, HF model directories as outputs,
LoRA agents (docs/peft.md).

- :mod:`fedmerge.hf.adapter`: read an adapter directory as θ = θ_base + ΔW, lazily.
- :mod:`fedmerge.hf.modeldir`: tell a model directory, copy its config/tokenizer files.
- :mod:`fedmerge.hf.refactor`: write a merge back as a PEFT adapter by truncated SVD.
- :mod:`fedmerge.hf.merge`: one-shot merges written as an adapter (``--as-adapter``).
- :mod:`fedmerge.hf.lora`: the ``hf`` model source, LoRA agents, factor/product merging.
- :mod:`fedmerge.hf.tiny`: tiny offline models and adapters for tests and demos.
- :mod:`fedmerge.hf.callback`: a ``TrainerCallback`` on the merge sidecar's file contract.
"""
