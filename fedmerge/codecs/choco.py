"""CHOCO-Gossip: compressed gossip that keeps the network average (Koloskova et al., 2019).

Plain gossip with compressed payloads, x_i ← Σ_j w_ij C(x_j), loses the average: what a
neighbour receives is not what the sender keeps. CHOCO-Gossip compresses *differences*
against public copies instead. Every agent i holds x̂_j for itself and each neighbour
(all start at 0, so every holder of x̂_j has the same value). Per round:

    q_i  = C(x_i − x̂_i)                          sent to every neighbour
    x̂_j ← x̂_j + q_j                              for j = i and every j heard from
    x_i  ← x_i + γ Σ_j w_ij (x̂_j − x̂_i)           (the j = i term is 0)

For a symmetric W (Metropolis–Hastings, uniform on a regular graph) the last step moves
the sum Σ_i x_i by γ Σ_ij w_ij (x̂_j − x̂_i) = 0: the network average is kept exactly,
whatever the codec, and x̂_i tracks x_i so the compression error does not accumulate
(the difference x_i − x̂_i plays the role of error feedback). ``γ`` (``consensus_step``)
must be small enough for the codec (the paper's γ scales with the compression quality
δ and the spectral gap); with codec ``none`` and γ = 1 it is exact gossip.

The copies assume every message arrives; a lost q_j leaves this holder's x̂_j behind
the others' for good (the average is then no longer exact). **Key frames** bound that:
with ``resync`` K > 0, in rounds K, 2K, … an agent publishes an 8-bit snapshot
s_i = D(Q₈(x_i)) (:data:`RESYNC_CODEC`) instead of q_i and sets x̂_i ← s_i; every holder
that receives it sets its x̂_i ← s_i too, so a copy left behind by a lost message is
exact again after the next key frame it receives. Without loss all holders still agree,
so the average is still kept exactly.

The copies x̂ live on the agent's ``device`` (they meet x_i and the received q_j there);
codecs are CPU code, so :meth:`ChocoGossip.publish` hands them x_i − x̂_i on the CPU and
brings q_i back (the one place CHOCO moves tensors), and the codec's sender state stays
on the CPU.

>>> import torch
>>> a, b = (ChocoGossip(i, "topk", {"density": 0.5}, gamma=1.0) for i in (0, 1))
>>> xa, xb = {"w": torch.tensor([4.0, 0.0])}, {"w": torch.tensor([0.0, 2.0])}
>>> (_, qa), (_, qb) = a.publish(xa), b.publish(xb)
>>> xa, xb = a.merge(xa, [(1, qb, 0.5)]), b.merge(xb, [(0, qa, 0.5)])
>>> xa["w"].tolist(), xb["w"].tolist(), (xa["w"] + xb["w"]).tolist()
([2.0, 1.0], [2.0, 1.0], [4.0, 2.0])
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any

import torch

from fedmerge.codecs.feedback import Encoder
from fedmerge.codecs.wire import Encoded, encode_state
from fedmerge.device import CPU, to_device

StateDict = dict[str, torch.Tensor]
Heard = tuple[int, Mapping[str, torch.Tensor], float]  # (sender j, q_j, w_ij)
PREFIX = "__choco__"
RESYNC_CODEC = ("quantize", {"bits": 8, "block": 64})  # key frames: x_i to 8 bits


class ChocoGossip:
    """One agent's CHOCO-Gossip state: its encoder and the public copies x̂ it holds."""

    def __init__(
        self, agent: int, codec: str, params: Mapping[str, Any] | None, gamma: float,
        seed: int = 0, resync: int = 0, device: torch.device = CPU,
    ):  # fmt: skip
        self.agent, self.gamma, self.resync = agent, gamma, resync
        self.device = torch.device(device)  # where the copies x̂ live
        self.encoder = Encoder(codec, params, seed=seed * 1_000_003 + agent)
        self.copies: dict[int, StateDict] = {}  # j -> x̂_j

    def _copy(self, j: int, like: Mapping[str, torch.Tensor]) -> StateDict:
        if j not in self.copies:
            self.copies[j] = {k: torch.zeros_like(v) for k, v in like.items()}
        return self.copies[j]

    def is_keyframe(self, round: int) -> bool:
        """Whether what is published in ``round`` (0-based, as the engines count) is a key
        frame (a snapshot, not a q): rounds K, 2K, … as the metrics number them."""
        return self.resync > 0 and (round + 1) % self.resync == 0

    def publish(self, x: Mapping[str, torch.Tensor], round: int = 0) -> tuple[Encoded, StateDict]:
        """Encode q_i = C(x_i − x̂_i) and advance the own copy; returns (encoded, q_i on the
        CPU). In a key-frame ``round``: the snapshot s_i, which becomes the own copy."""
        own = self._copy(self.agent, x)
        if self.is_keyframe(round):
            encoded = encode_state(to_device(x, CPU), *RESYNC_CODEC)
            snapshot = encoded.decode(source="own payload")
            own.update(to_device(snapshot, self.device, copy=True))
            return encoded, snapshot
        encoded, q = self.encoder.encode(to_device({k: x[k] - own[k] for k in x}, CPU))
        for k, v in to_device(q, self.device).items():
            own[k] += v
        return encoded, q

    def merge(
        self, x: Mapping[str, torch.Tensor], received: Sequence[Heard],
        keyframes: Collection[int] = (),
    ) -> StateDict:  # fmt: skip
        """Apply the neighbours' q_j ``(sender, q_j, w_ij)`` to their copies (the senders
        in ``keyframes`` sent snapshots: they replace the copy), then the consensus step;
        returns the new x_i."""
        own = self._copy(self.agent, x)
        for j, q, _ in received:
            copy = self._copy(j, q)
            for k, v in q.items():
                if j in keyframes:
                    copy[k] = v.clone()
                else:
                    copy[k] += v
        out = {k: v.clone() for k, v in x.items()}
        for j, _, w in received:
            for k, v in self.copies[j].items():
                out[k] += self.gamma * w * (v - own[k])
        return out

    def to_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """Everything needed to resume exactly (copies, codec sender state, call count) as
        named tensors under :data:`PREFIX` plus string metadata (for an agent-state file)."""
        out = {f"{PREFIX}/copy/{j}/{k}": v for j, c in self.copies.items() for k, v in c.items()}
        for key, state in self.encoder.state.items():
            out |= {f"{PREFIX}/codec/{name}/{key}": v for name, v in state.items()}
        return out, {"choco_calls": str(self.encoder.calls)}

    def load_tensors(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, str]) -> None:
        """Restore what :meth:`to_tensors` saved (``tensors`` may hold other keys too): the
        copies onto :attr:`device`, the codec state onto the CPU."""
        self.copies, self.encoder.state = {}, {}
        for name, v in tensors.items():
            root, kind, owner, key = (name.split("/", 3) + ["", "", ""])[:4]
            if root != PREFIX:
                continue
            if kind == "copy":
                self.copies.setdefault(int(owner), {})[key] = v.to(self.device)
            else:
                self.encoder.state.setdefault(key, {})[owner] = v.to(CPU)
        self.encoder.calls = int(meta.get("choco_calls", "0"))
