"""Hugging Face interop: PEFT LoRA adapters as experts, HF model directories as outputs.

- :mod:`fedmerge.hf.adapter`: read an adapter directory as θ = θ_base + ΔW, lazily.
- :mod:`fedmerge.hf.modeldir`: tell a model directory, copy its config/tokenizer files.
- :mod:`fedmerge.hf.refactor`: write a merge back as a PEFT adapter by truncated SVD.
"""
