"""Tiny Hugging Face models and LoRA adapters built offline, for tests, docs and demos.

    python -m fedmerge.hf.tiny demo            # demo/base + demo/adapter_{1,2,3} (GPT-2)
    python -m fedmerge.hf.tiny demo --arch llama --adapters 2

A base is a randomly initialised ``*ForCausalLM`` built from a config (no
download) with a word-level tokenizer; an adapter is ``peft``'s LoRA on it with
seeded random A and B (peft initialises B to zero, which would be a no-op expert).
Needs ``transformers`` and ``peft``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

ARCHS = ("gpt2", "llama", "bert")
TARGETS = {"gpt2": ["c_attn", "c_proj", "c_fc"], "llama": ["q_proj", "v_proj", "down_proj"],
           "bert": ["query", "value", "dense"]}  # fmt: skip
VOCAB = 64


def tiny_config(arch: str):
    """A few-thousand-parameter config of ``arch`` (gpt2, llama or bert)."""
    import transformers as tf

    if arch == "gpt2":
        return tf.GPT2Config(
            vocab_size=VOCAB,
            n_positions=32,
            n_embd=32,
            n_layer=2,
            n_head=2,
            bos_token_id=0,
            eos_token_id=0,
        )
    if arch == "llama":
        return tf.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                              max_position_embeddings=32)  # fmt: skip
    if arch == "bert":
        return tf.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                             num_attention_heads=2, intermediate_size=48,
                             max_position_embeddings=32)  # fmt: skip
    raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "[PAD]": 1, **{f"w{i}": i for i in range(2, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")


def make_base(out: str | Path, arch: str = "gpt2", seed: int = 0) -> Path:
    """Save a tiny randomly initialised model (+ tokenizer) to ``out``; returns ``out``."""
    import transformers as tf

    torch.manual_seed(seed)
    cls = tf.BertForMaskedLM if arch == "bert" else tf.AutoModelForCausalLM
    model = cls.from_config(tiny_config(arch)) if arch != "bert" else cls(tiny_config(arch))
    model.save_pretrained(out)
    _tokenizer().save_pretrained(out)
    return Path(out)


def load_base(path: str | Path):
    """The model saved by :func:`make_base` (float32, eval mode)."""
    import transformers as tf

    cfg = tf.AutoConfig.from_pretrained(path)
    cls = tf.BertForMaskedLM if cfg.model_type == "bert" else tf.AutoModelForCausalLM
    return cls.from_pretrained(path).eval()


def make_adapter(base: str | Path, out: str | Path, seed: int, **lora: Any) -> Path:
    """Save a LoRA adapter of the model at ``base`` with seeded random factors.

    ``lora`` overrides :class:`peft.LoraConfig` fields (default: r=4, lora_alpha=8,
    the arch's attention/MLP projections).
    """
    import peft

    model = load_base(base)
    arch = model.config.model_type
    options = {"r": 4, "lora_alpha": 8, "target_modules": TARGETS[arch], **lora}
    if arch == "gpt2":
        options.setdefault("fan_in_fan_out", True)
    pm = peft.get_peft_model(model, peft.LoraConfig(**options))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if p.requires_grad:
                p.copy_(
                    torch.randn(p.shape, generator=g) * (0.05 if "lora_" in name else 0.01)
                    + (0 if "lora_" in name else p)
                )
    pm.save_pretrained(out)
    return Path(out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("out", help="folder for base/ and adapter_1/ ...")
    p.add_argument("--arch", choices=ARCHS, default="gpt2")
    p.add_argument("--adapters", type=int, default=3)
    args = p.parse_args(argv)
    out = Path(args.out)
    make_base(out / "base", args.arch)
    for i in range(1, args.adapters + 1):
        make_adapter(out / "base", out / f"adapter_{i}", seed=i)
    print(f"wrote {out / 'base'} and {args.adapters} LoRA adapter(s) {out / 'adapter_*'}")


if __name__ == "__main__":
    main()
