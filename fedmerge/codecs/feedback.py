"""The sender's side of a compressed link: error feedback and per-key codec state.

With error feedback (Seide et al. 2014; Karimireddy et al., EF-SGD, 2019) the sender
keeps what it did not send, ``e``, and adds it to the next payload:
``c = x + e``, send ``C(c)``, ``e ← c − D(C(c))``. So after T calls
``Σ sent = Σ x − e_T``: the running sum of what receivers got tracks the running
sum of the true tensors up to one bounded residual (for top-k with density δ,
``‖e‖ ≤ q/(1−q) · max ‖x‖`` with ``q = sqrt(1−δ)``).

>>> import torch
>>> enc = Encoder("topk", {"density": 0.5}, error_feedback=True)
>>> _, sent = enc.encode({"w": torch.tensor([1.0, 0.1])})
>>> sent["w"].tolist(), enc.residual["w"].tolist()
([1.0, 0.0], [0.0, 0.10000000149011612])
>>> _, sent = enc.encode({"w": torch.tensor([0.0, 0.1])})
>>> sent["w"].tolist()
[0.0, 0.20000000298023224]
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from fedmerge.codecs.registry import get_codec
from fedmerge.codecs.wire import Encoded, encode_state


class Encoder:
    """Encode successive state dicts with one codec, keeping residuals and codec state.

    ``encode(tensors)`` returns the :class:`Encoded` form and the tensors a receiver
    will decode from it (``(shape)`` of each input).
    """

    def __init__(
        self, codec: str, params: Mapping[str, Any] | None = None, *,
        error_feedback: bool = False, seed: int = 0,
    ):  # fmt: skip
        self.codec = get_codec(codec).name
        self.params = get_codec(codec).resolve(params)
        self.error_feedback = error_feedback
        self.seed = seed
        self.calls = 0
        self.residual: dict[str, torch.Tensor] = {}
        self.state: dict[str, dict[str, torch.Tensor]] = {}

    def encode(
        self, tensors: Mapping[str, torch.Tensor]
    ) -> tuple[Encoded, dict[str, torch.Tensor]]:
        target = {k: self._with_residual(k, v) for k, v in tensors.items()}
        encoded = encode_state(
            target, self.codec, self.params, seed=self.seed, call=self.calls, state=self.state
        )
        sent = encoded.decode(source="own payload")
        if self.error_feedback:
            self.residual = {k: target[k] - sent[k] for k in target}
        self.calls += 1
        return encoded, sent

    def _with_residual(self, key: str, x: torch.Tensor) -> torch.Tensor:
        e = self.residual.get(key) if self.error_feedback else None
        return x.detach() if e is None or e.shape != x.shape else x.detach() + e
