"""The vectorized path: all agents' parameters stacked along a leading agent axis.

Training is ``vmap(grad(loss))`` over ``functional_call`` of one template module, with
each agent's minibatch gathered from its padded data (a mask marks real samples, so the
loss is each agent's own batch mean) and SGD/Adam written out with a per-agent step mask
(an agent without a batch at a step does not move). Mixing is one sparse product
Θ ← W Θ over the (agents, parameters) matrix. Batch orders come from the same per-agent
generators as :class:`~fedmerge.decentralized.agent.Agent`, so both paths see identical batches.

Used for buffer-free models (no BatchNorm statistics) with cross-entropy and a protocol
that is a W product (gossip, local, centralized, single global merge).
"""

from __future__ import annotations

import math

import numpy as np
import scipy.sparse as sp
import torch
from torch.func import functional_call, grad, vmap

from fedmerge.decentralized.agent import agent_generator, batch_plan
from fedmerge.decentralized.faults import faults_in_use
from fedmerge.decentralized.setup import Setup
from fedmerge.decentralized.traffic import Traffic
from fedmerge.topology import RoundPlan

EVAL_CHUNK = 256  # agents evaluated per vmap call: bounds activation memory


PER_AGENT_FAULTS = {
    "byzantine": "Byzantine nodes (faults.byzantine)",
    "duplicate": "message duplication / reordering",
    "reorder": "message duplication / reordering",
    "state_dir": "per-node persistence / rejoin (faults.state_dir, faults.rejoin)",
    "rejoin": "per-node persistence / rejoin (faults.state_dir, faults.rejoin)",
}
"""Faults the stacked engine cannot express, and why (they act on single payloads/agents)."""


def why_not_stacked(setup: Setup) -> str | None:
    """None if the stacked path applies to ``setup``, else the reason it does not."""
    cfg = setup.config
    if not setup.protocol.vectorizable:
        return f"protocol {setup.protocol.name!r} merges per agent"
    per_agent = [PER_AGENT_FAULTS[k] for k in faults_in_use(cfg.faults) if k in PER_AGENT_FAULTS]
    if per_agent:
        return per_agent[0]
    if cfg.peft.r:
        return "LoRA agents (peft.r > 0) train and merge adapters per agent"
    if cfg.protocol.aggregation != "mean":
        return f"protocol.aggregation {cfg.protocol.aggregation!r} is computed per agent"
    if cfg.protocol.codec != "none":
        return f"protocol.codec {cfg.protocol.codec!r}: payloads are encoded per agent"
    if cfg.train.loss != "cross_entropy":
        return "a custom train.loss"
    model = setup.model(0)
    if any(True for _ in model.buffers()):
        return f"model {cfg.model.name!r} has buffers (e.g. BatchNorm statistics)"
    return None


def _pad(parts: list[torch.Tensor]) -> torch.Tensor:
    """Stack (n_i, ...) tensors into (A, max n_i, ...) with zeros after each part."""
    width = max(1, max(len(p) for p in parts))
    out = parts[0].new_zeros((len(parts), width, *parts[0].shape[1:]))
    for i, p in enumerate(parts):
        out[i, : len(p)] = p
    return out


class StackedEngine:
    """Every agent at once; an :class:`~fedmerge.decentralized.engine.Engine` like the
    per-agent one."""

    name = "vectorized"

    def __init__(self, setup: Setup) -> None:
        self.setup, cfg = setup, setup.config
        models = [setup.model(i) for i in range(setup.n)]
        self.template = models[0]
        names = [k for k, _ in self.template.named_parameters()]
        self.params = {k: torch.stack([m.get_parameter(k).detach() for m in models]) for k in names}
        ref = setup.reference
        self.ref = None if ref is None else {k: ref[k] for k in names}
        agents = setup.data.agents
        self.counts = [a.samples for a in agents]
        self.x, self.y = _pad([a.train_x for a in agents]), _pad([a.train_y for a in agents])
        self.tx, self.ty = _pad([a.test_x for a in agents]), _pad([a.test_y for a in agents])
        self.tcount = torch.tensor([len(a.test_y) for a in agents])
        self.generators = [agent_generator(cfg.seed, i) for i in range(setup.n)]
        self._grad = vmap(grad(self._loss))
        self._logits = vmap(self._forward, in_dims=(0, None))
        self._local_logits = vmap(self._forward)

    def _forward(self, params, x):
        return functional_call(self.template, params, (x,))

    def _loss(self, params, x, y, mask):
        ce = torch.nn.functional.cross_entropy(self._forward(params, x), y, reduction="none")
        return (ce * mask).sum() / mask.sum().clamp(min=1)

    # --- training ------------------------------------------------------------------

    def train(self, trains: np.ndarray) -> None:
        cfg = self.setup.config.train
        plans = [
            batch_plan(self.counts[i], cfg, g) if trains[i] else []
            for i, g in enumerate(self.generators)
        ]
        steps = max((len(p) for p in plans), default=0)
        if not steps:
            return
        a, b = len(plans), cfg.batch_size
        idx = torch.zeros(steps, a, b, dtype=torch.long)
        mask = torch.zeros(steps, a, b)
        for i, plan in enumerate(plans):
            for s, batch in enumerate(plan):
                idx[s, i, : len(batch)] = batch
                mask[s, i, : len(batch)] = 1.0
        rows = torch.arange(a)[:, None]
        opt = _Optimizer(cfg, self.params)
        for s in range(steps):
            grads = self._grad(self.params, self.x[rows, idx[s]], self.y[rows, idx[s]], mask[s])
            opt.step(self.params, grads, mask[s].any(dim=1))

    # --- communication ---------------------------------------------------------------

    def communicate(self, r: int, plan: RoundPlan, active: np.ndarray, lost: np.ndarray) -> Traffic:
        n = self.setup.n
        theta = self._matrix()
        shared = theta if self.ref is None else theta - self._flat_ref()
        nbytes = shared.shape[1] * 4
        pairs = np.array(plan.messages, dtype=np.int64).reshape(-1, 2)
        senders, receivers = pairs[:, 0], pairs[:, 1]
        ok = self._valid(shared, theta, senders, receivers, nbytes)
        t = Traffic.zeros(n)
        np.add.at(t.sent, senders, nbytes)
        delivered = ~lost
        np.add.at(t.received, receivers[delivered], nbytes)
        np.add.at(t.rejected, receivers[delivered & ~ok], 1)
        w = plan.mixing.tocoo()
        keep = np.ones(len(w.data), dtype=bool)
        drop = {(d, s) for s, d, k in zip(senders, receivers, delivered & ok, strict=True) if not k}
        if drop:
            keep = np.array([(i, j) not in drop for i, j in zip(w.row, w.col, strict=True)])
        w = sp.csr_matrix((w.data[keep], (w.row[keep], w.col[keep])), shape=w.shape)
        w = sp.diags(1.0 / np.asarray(w.sum(axis=1)).ravel()) @ w
        self._set_matrix(torch.from_numpy(w @ theta.double().numpy()))
        return t

    def _valid(self, shared, theta, senders, receivers, nbytes) -> np.ndarray:
        """Per message: the receiver's validation (finite, norm bound, size bound)."""
        v = self.setup.config.validation
        finite = torch.isfinite(shared).all(dim=1).numpy()
        norm = shared.double().norm(dim=1).numpy()
        own = theta.double().norm(dim=1).numpy()
        limit = v.max_bytes or 2 * nbytes
        return (
            finite[senders]
            & (norm[senders] <= v.max_norm_ratio * own[receivers])
            & (nbytes <= limit)
        )

    def _matrix(self) -> torch.Tensor:
        """(A, P) float32: every agent's parameters flattened in parameter order."""
        return torch.cat([p.reshape(p.shape[0], -1) for p in self.params.values()], dim=1)

    def _flat_ref(self) -> torch.Tensor:
        return torch.cat([v.reshape(1, -1) for v in self.ref.values()], dim=1)

    def _set_matrix(self, m: torch.Tensor) -> None:
        start = 0
        for k, p in self.params.items():
            size = math.prod(p.shape[1:])
            self.params[k] = m[:, start : start + size].reshape(p.shape).to(p.dtype)
            start += size

    # --- evaluation ------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> tuple[list[float | None], list[float | None]]:
        fed = self.setup.data
        glob, local = [], []
        for lo in range(0, self.setup.n, EVAL_CHUNK):
            chunk = {k: v[lo : lo + EVAL_CHUNK] for k, v in self.params.items()}
            hits = self._logits(chunk, fed.test_x).argmax(-1) == fed.test_y
            glob += hits.double().mean(dim=1).tolist()
            sl = slice(lo, lo + EVAL_CHUNK)
            hits = self._local_logits(chunk, self.tx[sl]).argmax(-1) == self.ty[sl]
            seen = torch.arange(self.tx.shape[1])[None, :] < self.tcount[sl, None]
            correct = (hits & seen).sum(dim=1)
            local += [
                float(c) / int(t) if t else None
                for c, t in zip(correct.tolist(), self.tcount[sl].tolist(), strict=True)
            ]
        return local, glob

    def flat(self) -> torch.Tensor:
        return self._matrix().double()

    def states(self) -> list[dict[str, torch.Tensor]]:
        return [{k: v[i] for k, v in self.params.items()} for i in range(self.setup.n)]

    @torch.no_grad()
    def predictions(self) -> torch.Tensor:
        """(n, N) int64: every agent's predicted class on the global test set."""
        x = self.setup.data.test_x
        return torch.cat([
            self._logits({k: v[lo : lo + EVAL_CHUNK] for k, v in self.params.items()}, x).argmax(-1)
            for lo in range(0, self.setup.n, EVAL_CHUNK)
        ])  # fmt: skip


class _Optimizer:
    """torch.optim's SGD (momentum, weight decay) and Adam, per agent, with a step mask."""

    def __init__(self, cfg, params: dict[str, torch.Tensor]) -> None:
        self.cfg = cfg
        self.state = {k: (torch.zeros_like(p), torch.zeros_like(p)) for k, p in params.items()}
        self.t = torch.zeros(next(iter(params.values())).shape[0])

    def step(self, params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor], moving):
        """Update ``params`` in place where ``moving`` (A,) bool is set."""
        c = self.cfg
        self.t += moving.double()
        for k, p in params.items():
            g = grads[k] + c.weight_decay * p if c.weight_decay else grads[k]
            m, v = self.state[k]
            shape = (-1,) + (1,) * (p.dim() - 1)
            sel = moving.reshape(shape)
            if c.optimizer == "adam":
                new_m = torch.where(sel, m.lerp(g, 0.1), m)
                new_v = torch.where(sel, v * 0.999 + 0.001 * g * g, v)
                t = self.t.clamp(min=1).reshape(shape)
                bc1, bc2 = 1 - 0.9**t, 1 - 0.999**t
                update = (c.lr / bc1) * new_m / (new_v.sqrt() / bc2.sqrt() + 1e-8)
                self.state[k] = (new_m, new_v)
            else:
                update = c.lr * (m * c.momentum + g if c.momentum else g)
                if c.momentum:
                    self.state[k] = (torch.where(sel, m * c.momentum + g, m), v)
            params[k] = torch.where(sel, p - update.to(p.dtype), p)
