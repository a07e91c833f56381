"""User-side factories a config names as ``tests.user_factories:<fn>`` (model, data, loss)."""

import torch
from torch import nn


class TinyTransformerClassifier(nn.Module):
    """Digits (B, 1, 8, 8) as 8 tokens of 8 pixels → a randomly initialized Hugging Face BERT
    encoder (built offline from a config object) → [token 0] → class logits (B, classes)."""

    def __init__(self, num_classes: int) -> None:
        from transformers import BertConfig, BertModel

        cfg = BertConfig(
            hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
            max_position_embeddings=16, vocab_size=4,
        )  # fmt: skip
        super().__init__()
        self.proj, self.encoder = nn.Linear(8, 16), BertModel(cfg, add_pooling_layer=False)
        self.head = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.proj(x.reshape(len(x), 8, 8))
        return self.head(self.encoder(inputs_embeds=tokens).last_hidden_state[:, 0])


def tiny_bert(in_shape, num_classes, seed):
    """The model factory: ``model.name: tests.user_factories:tiny_bert``."""
    return TinyTransformerClassifier(num_classes)


def blobs(samples: int = 300):
    """The data factory: four 2-D Gaussian blobs as an (x, y) pair."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(samples) % 4
    centers = torch.tensor([[2.0, 2.0], [-2.0, 2.0], [2.0, -2.0], [-2.0, -2.0]])
    return centers[y] + 0.5 * torch.randn(samples, 2, generator=g), y


class SmoothedCE(nn.CrossEntropyLoss):
    """The loss factory (a class built with no arguments)."""

    def __init__(self) -> None:
        super().__init__(label_smoothing=0.1)
