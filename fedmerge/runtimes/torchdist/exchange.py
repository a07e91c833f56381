"""The data plane: payloads between ranks, peer to peer, with a deadline.

Per (sender node, receiving rank): header → ack → body, each step one
``batch_isend_irecv`` waiting until a deadline (:mod:`~fedmerge.runtimes.torchdist.wire`
is the format). A receiver refuses an oversized or malformed payload at the header, before
any body moves; what it refuses or cannot decode reaches the agent as a
:class:`~fedmerge.decentralized.delivery.Refused`, counted like an invalid payload.
"""

from __future__ import annotations

import time
from datetime import timedelta

import torch
import torch.distributed as dist

from fedmerge.decentralized.delivery import Refused
from fedmerge.decentralized.payload import Payload
from fedmerge.errors import ValidationError
from fedmerge.runtimes.torchdist import wire
from fedmerge.runtimes.torchdist.control import Membership, short_error


class Exchange:
    """Rank ``rank``'s side of every round's payload exchange; keeps warm wire buffers."""

    def __init__(
        self, members: Membership, device: torch.device, max_data: int, max_table: int
    ) -> None:
        """``max_data``: the most tensor bytes a payload may announce; ``max_table``: the
        most bytes its tensor table may take."""
        self.members, self.device = members, device
        self.rank, self.layout = members.control.rank, members.layout
        self.max_data, self.max_table = max_data, max_table
        self.buffers: dict[tuple[str, int], torch.Tensor] = {}  # warm wire buffers, per sender

    @classmethod
    def for_agents(cls, members: Membership, device: torch.device, agents) -> Exchange:
        """An exchange whose bounds admit what the hosted ``agents`` accept."""
        keys = max(a.tensor_limit() for a in agents)
        max_table = 4096 + 1024 * keys  # JSON table + 8-byte padding per tensor
        return cls(members, device, max(a.byte_limit() for a in agents), max_table)

    def exchange(self, r: int, plan, lost, payloads: dict[int, Payload]):
        """Move payloads to other ranks: header, ack (the receiver refuses what is too big or
        malformed), body. Returns (received {sender: Payload or Refused}, failed {peer rank:
        error})."""
        rank_of, me = self.layout.rank_of, self.rank
        live = [(s, d) for (s, d), gone in zip(plan.messages, lost, strict=True) if not gone]
        out = sorted({(s, rank_of(d)) for s, d in live if s in payloads and rank_of(d) != me})
        inc = sorted({(s, rank_of(s)) for s, d in live if rank_of(d) == me and rank_of(s) != me})
        senders = sorted({s for s, _ in out})
        packed = {s: wire.pack(payloads[s], self.buffers.get(("out", s))) for s in senders}
        self.buffers.update({("out", s): body for s, (_, body) in packed.items()})
        heads = {s: wire.empty_header() for s, _ in inc}
        failed: dict[int, str] = {}
        deadline = time.monotonic() + self.members.timeout.total_seconds()  # for all three steps
        sends = [(packed[s][0], k, s, True) for s, k in out]
        self.p2p(sends + [(heads[s], k, s, False) for s, k in inc], failed, deadline)
        refused, sizes = {}, {}
        for s, k in inc:
            if k not in failed:
                sizes[s] = self.admit(r, s, heads[s], refused)
        acks = {s: torch.tensor([int(sizes.get(s) is not None)]) for s, _ in inc}
        acked = {(s, k): torch.zeros(1, dtype=torch.int64) for s, k in out}
        sends = [(acks[s], k, s, True) for s, k in inc if k not in failed]
        recvs = [(acked[s, k], k, s, False) for s, k in out if k not in failed]
        self.p2p(sends + recvs, failed, deadline)
        bodies = {s: self.buffer(("in", s), n) for s, n in sizes.items() if n is not None}
        sends = [(packed[s][1], k, s, True) for s, k in out if k not in failed and acked[s, k]]
        recvs = [(bodies[s], k, s, False) for s, k in inc if s in bodies and k not in failed]
        self.p2p(sends + recvs, failed, deadline)
        received = {}
        for s, k in inc:
            if s in bodies and k not in failed:
                try:
                    received[s] = wire.unpack(heads[s], bodies[s])
                except ValidationError as exc:
                    refused[s] = Refused(wire.tensor_bytes(heads[s]), str(exc))
        return {**received, **refused}, failed

    def buffer(self, key: tuple[str, int], size: int) -> torch.Tensor:
        """A (size,) uint8 receive buffer, reused round after round. Payload tensors are views
        of it: valid until the same sender's next exchange (merges use them within the round)."""
        buf = self.buffers.get(key)
        if buf is None or buf.numel() != size:
            buf = self.buffers[key] = torch.empty(size, dtype=torch.uint8)
        return buf

    def admit(self, r: int, s: int, header: torch.Tensor, refused: dict) -> int | None:
        """Body size to receive from sender s, or None: refused before any transfer, with the
        reason :func:`~fedmerge.decentralized.payload.validate_payload` would give."""
        try:
            size = wire.body_size(header, s)
        except ValidationError as exc:
            refused[s] = Refused(0, str(exc))
            return None
        nbytes = wire.tensor_bytes(header)
        who = f"payload from agent {s} (round {int(header[3])})"
        if nbytes > self.max_data:
            refused[s] = Refused(nbytes, f"{who}: {nbytes} bytes exceeds the {self.max_data} limit")
        elif size - nbytes > self.max_table:
            refused[s] = Refused(nbytes, f"{who}: a {size - nbytes}-byte tensor table is too large")
        return None if s in refused else size

    def p2p(self, ops: list[tuple[torch.Tensor, int, int, bool]], failed: dict[int, str],
            deadline: float) -> None:  # fmt: skip
        """Run (tensor, peer rank, tag, is_send) ops as one ``batch_isend_irecv``, waiting until
        ``deadline`` (monotonic); peers whose operations fail or time out go to ``failed``."""
        if not ops:
            return
        dev = [(t.to(self.device), k, tag, send) for t, k, tag, send in ops]
        p2p = [dist.P2POp(dist.isend if send else dist.irecv, t, k, self.members.group, tag)
               for t, k, tag, send in dev]  # fmt: skip
        peers = [k for _, k, _, _ in ops]
        try:
            works = dist.batch_isend_irecv(p2p)
        except RuntimeError as exc:
            failed.update({k: short_error(exc) for k in peers if k not in failed})
            return
        if len(works) != len(ops):  # a coalesced backend answers for the whole batch
            works, peers = works[:1] * len(ops), peers
        for work, k, (t, _, _, send), (d, *_) in zip(works, peers, ops, dev, strict=True):
            try:
                left = max(deadline - time.monotonic(), 0.001)
                work.wait(timeout=timedelta(seconds=left))
                if not send and d is not t:
                    t.copy_(d)
            except RuntimeError as exc:
                failed.setdefault(k, short_error(exc))
