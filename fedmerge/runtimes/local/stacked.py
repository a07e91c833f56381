"""The vectorized path: all agents' parameters stacked along a leading agent axis.

Training is ``vmap`` of ``functional_call`` of one template module and one backward through
the sum of the agents' losses, with each agent's minibatch gathered from its padded data (a
mask marks real samples, so the loss is each agent's own batch mean) and SGD/Adam written
out with a per-agent step mask (an agent without a batch at a step does not move). Mixing
is one sparse product Θ ← W Θ over the (agents, parameters) matrix, in float64. Batch orders
come from the same per-agent generators as :class:`~fedmerge.decentralized.agent.Agent`, so
both paths see identical batches.

Where the time goes, and why it is laid out this way (see docs/simulate.md, "Speed"):
the parameters are one matrix with per-parameter views, so nothing concatenates or copies
them per round; the float64 passes go block by block; the optimizer updates in place and
keeps state only when it has some; the global-test predictions of an evaluation are
reused by the disagreement measure.

Used for buffer-free models (no BatchNorm statistics) with cross-entropy and a protocol
that is a W product (gossip, local, centralized, single global merge), on the CPU: its W
product is scipy's, so with ``device`` on a GPU the simulator runs the per-agent engine
(``vectorize: auto``; ``always`` is then a ConfigError).
"""

from __future__ import annotations

import math

import numpy as np
import scipy.sparse as sp
import torch
from torch.func import functional_call, vmap

from fedmerge.decentralized.agent import agent_generator, batch_plan
from fedmerge.decentralized.faults import faults_in_use
from fedmerge.decentralized.setup import Setup
from fedmerge.decentralized.traffic import Traffic
from fedmerge.topology import RoundPlan

EVAL_CHUNK = 256  # agents evaluated per vmap call: bounds activation memory
BLOCK_BYTES = 2**21  # float64 column block of the mixing/validation/distance passes


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
    if setup.device.type != "cpu":
        return f"device {str(setup.device)!r}: the stacked engine computes on the CPU"
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
    if any(p.dtype != torch.float32 for p in model.parameters()):
        return f"model {cfg.model.name!r} has parameters that are not float32"
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
    per-agent one.

    The parameters live in one (A, P) matrix ``theta`` (agents × flattened parameters, in
    parameter order); ``params`` are views of it with the template's shapes, so training
    updates it in place and mixing, validation and the consensus distance read it without
    concatenating copies. The float64 passes (validation norms, the W product, distances)
    go over it in column blocks of :func:`_block_columns`, so no float64 copy of the whole
    matrix exists at once."""

    name = "vectorized"

    def __init__(self, setup: Setup) -> None:
        self.setup, cfg = setup, setup.config
        models = [setup.model(i) for i in range(setup.n)]
        self.template = models[0]
        names = [k for k, _ in self.template.named_parameters()]
        self.shapes = {k: self.template.get_parameter(k).shape for k in names}
        # per parameter, the order its (agent, *shape) dimensions are stored in
        self.orders = {k: tuple(range(len(shape) + 1)) for k, shape in self.shapes.items()}
        self.theta = self._store({k: torch.stack([m.get_parameter(k).detach() for m in models])
                                  for k in names})  # fmt: skip
        self.params = self._views(self.theta)
        ref = setup.reference
        self.ref = None if ref is None else self._store({k: ref[k][None] for k in names})[0]
        self._laid_out = False  # whether the storage follows the gradients' layout yet
        agents = setup.data.agents
        self.counts = [a.samples for a in agents]
        self.x, self.y = _pad([a.train_x for a in agents]), _pad([a.train_y for a in agents])
        self.tx, self.ty = _pad([a.test_x for a in agents]), _pad([a.test_y for a in agents])
        self.tcount = torch.tensor([len(a.test_y) for a in agents])
        self.generators = [agent_generator(cfg.seed, i) for i in range(setup.n)]
        self._logits = vmap(self._forward, in_dims=(0, None))
        self._batch_logits = vmap(self._forward)
        self._predicted: torch.Tensor | None = None  # global-test predictions of this theta
        self._plan_cache: tuple[sp.csr_matrix, np.ndarray, sp.csr_matrix] | None = None

    def _views(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        """The parameters as (A, *shape) views of ``theta`` (A, P), each stored in the
        dimension order of :attr:`orders`."""
        out, start = {}, 0
        for k, shape in self.shapes.items():
            size, order = math.prod(shape), self.orders[k]
            full = (theta.shape[0], *shape)
            stored = theta[:, start : start + size].view(*(full[d] for d in order))
            out[k] = stored.permute(*np.argsort(order).tolist())
            start += size
        return out

    def _store(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """(A, P): the (A, *shape) ``tensors`` in the storage layout of :meth:`_views`."""
        first = next(iter(tensors.values()))
        theta = torch.empty(first.shape[0], sum(map(math.prod, self.shapes.values())),
                            dtype=first.dtype)  # fmt: skip
        for k, view in self._views(theta).items():
            view.copy_(tensors[k])
        return theta

    def _follow(self, grads: dict[str, torch.Tensor]) -> None:
        """Store every parameter in the memory order its gradient comes in, once, at the
        first step. A vmapped linear layer's weight gradient is the transpose of a batched
        matmul's result; updating a row-major weight with it in place reads it with a
        stride (6× slower than streaming, 10 agents × 1000 × 1000); stored alike, the
        optimizer streams through both. The column order of :attr:`theta` changes, nothing
        else: mixing, norms and distances do not depend on it."""
        self._laid_out = True
        orders = {k: _dim_order(g) for k, g in grads.items()}
        orders = {k: o if o[0] == 0 else self.orders[k] for k, o in orders.items()}
        if orders == self.orders:
            return
        params = self.params
        ref = None if self.ref is None else self._views(self.ref[None])
        self.orders = orders
        self.theta = self._store(params)
        self.params = self._views(self.theta)
        self.ref = None if ref is None else self._store(ref)[0]

    def _forward(self, params, x):
        return functional_call(self.template, params, (x,))

    def _grads(self, x, y, mask) -> dict[str, torch.Tensor]:
        """Every agent's gradient of its own batch-mean loss on its batch x (A, B, ...),
        y (A, B), mask (A, B): one vmapped forward and one backward through the sum of the
        agents' losses (agent i's loss depends only on its own parameters, so that is its
        own gradient; cheaper per step than ``vmap(grad(loss))``)."""
        params = {k: v.detach().requires_grad_() for k, v in self.params.items()}
        with torch.enable_grad():
            logits = self._batch_logits(params, x)  # (A, B, classes)
            ce = torch.nn.functional.cross_entropy(
                logits.flatten(0, 1), y.flatten(), reduction="none"
            ).view(mask.shape)
            loss = ((ce * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)).sum()
            grads = torch.autograd.grad(loss, list(params.values()))
        return dict(zip(params, grads, strict=True))

    def train(self, trains: np.ndarray) -> None:
        cfg = self.setup.config.train
        plans = [
            batch_plan(self.counts[i], cfg, g) if trains[i] else []
            for i, g in enumerate(self.generators)
        ]
        steps = max((len(p) for p in plans), default=0)
        if not steps:
            return
        self._predicted = None
        a, b = len(plans), cfg.batch_size
        idx, sizes = np.zeros((steps, a, b), dtype=np.int64), np.zeros((steps, a, 1))
        for i, plan in enumerate(plans):  # numpy: a tenth of torch's cost per small write
            for s, batch in enumerate(plan):
                idx[s, i, : len(batch)] = batch.numpy()
                sizes[s, i] = len(batch)
        idx = torch.from_numpy(idx)
        mask = torch.from_numpy(np.arange(b) < sizes).float()  # (steps, a, b): real samples
        rows = torch.arange(a)[:, None]
        opt = _Optimizer(cfg)
        for s in range(steps):
            grads = self._grads(self.x[rows, idx[s]], self.y[rows, idx[s]], mask[s])
            if not self._laid_out:
                self._follow(grads)
            opt.step(self.params, grads, mask[s].any(dim=1))

    # --- communication ---------------------------------------------------------------

    def communicate(self, r: int, plan: RoundPlan, active: np.ndarray, lost: np.ndarray) -> Traffic:
        n = self.setup.n
        nbytes = self.theta.shape[1] * 4
        pairs, full = self._plan_arrays(plan)
        senders, receivers = pairs[:, 0], pairs[:, 1]
        ok = self._valid(senders, receivers, nbytes)
        t = Traffic.zeros(n)
        np.add.at(t.sent, senders, nbytes)
        delivered = ~lost
        np.add.at(t.received, receivers[delivered], nbytes)
        np.add.at(t.rejected, receivers[delivered & ~ok], 1)
        gone = ~(delivered & ok)
        if gone.any():
            drop = set(zip(receivers[gone].tolist(), senders[gone].tolist(), strict=True))
            self._mix(_renormalized(plan.mixing, drop))
        else:
            self._mix(full)
        return t

    def _plan_arrays(self, plan: RoundPlan) -> tuple[np.ndarray, sp.csr_matrix]:
        """(messages (m, 2) int64 of (sender, receiver), W renormalized with nothing
        dropped) of ``plan``, reused while the topology hands out the same (read-only) W:
        a static graph's plan is built once (:meth:`~fedmerge.topology.build.Topology.round`)."""
        if self._plan_cache is None or self._plan_cache[0] is not plan.mixing:
            pairs = np.array(plan.messages, dtype=np.int64).reshape(-1, 2)
            full = _renormalized(plan.mixing, set())
            for a in (pairs, full.data, full.indices, full.indptr):
                a.flags.writeable = False
            self._plan_cache = (plan.mixing, pairs, full)
        return self._plan_cache[1], self._plan_cache[2]

    def _mix(self, w: sp.csr_matrix) -> None:
        """Θ ← W Θ, accumulated in float64 block by block (each entry is the same sum of
        the same float64 products as one product over the whole matrix)."""
        out = torch.empty_like(self.theta)
        for cols in _block_columns(self.theta):
            block = self.theta[:, cols].double().numpy()
            out[:, cols] = torch.from_numpy(w @ block)
        self.theta, self.params, self._predicted = out, self._views(out), None

    def _valid(self, senders, receivers, nbytes) -> np.ndarray:
        """Per message: the receiver's validation (finite, norm bound, size bound) of the
        sender's payload (τ_j = θ_j − θ_ref, or θ_j), norms in float64. A payload is finite
        iff its float64 norm is: a float32 square is < 2^256, so only inf or nan entries
        make the sum of squares inf or nan."""
        v = self.setup.config.validation
        shared_norms, own_norms = [], []
        for cols in _block_columns(self.theta):
            block = self.theta[:, cols]
            own_norms.append(block.double().norm(dim=1))
            if self.ref is not None:  # else the payload is θ_j: its norm is the own one
                shared_norms.append((block - self.ref[cols]).double().norm(dim=1))
        own = _combine(own_norms).numpy()
        norm = own if self.ref is None else _combine(shared_norms).numpy()
        limit = v.max_bytes or 2 * nbytes
        return (
            np.isfinite(norm[senders])
            & ~(norm[senders] > v.max_norm_ratio * own[receivers])  # as validate_payload
            & (nbytes <= limit)
        )

    # --- evaluation ------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> tuple[list[float | None], list[float | None]]:
        fed = self.setup.data
        glob, local, predicted = [], [], []
        for lo in range(0, self.setup.n, EVAL_CHUNK):
            chunk = {k: v[lo : lo + EVAL_CHUNK] for k, v in self.params.items()}
            predicted.append(self._logits(chunk, fed.test_x).argmax(-1))
            glob += (predicted[-1] == fed.test_y).double().mean(dim=1).tolist()
            sl = slice(lo, lo + EVAL_CHUNK)
            hits = self._batch_logits(chunk, self.tx[sl]).argmax(-1) == self.ty[sl]
            seen = torch.arange(self.tx.shape[1])[None, :] < self.tcount[sl, None]
            correct = (hits & seen).sum(dim=1)
            local += [
                float(c) / int(t) if t else None
                for c, t in zip(correct.tolist(), self.tcount[sl].tolist(), strict=True)
            ]
        self._predicted = torch.cat(predicted)
        return local, glob

    def flat(self) -> torch.Tensor:
        """(n, P) float64, each parameter flattened in its own (row-major) order."""
        n = self.theta.shape[0]
        return torch.cat([v.reshape(n, -1) for v in self.params.values()], dim=1).double()

    def distances(self) -> list[float]:
        """‖θ_i − θ̄‖ per agent, in float64 block by block (as ``distances(self.flat())``)."""
        parts = []
        for cols in _block_columns(self.theta):
            block = self.theta[:, cols].double()
            parts.append((block - block.mean(dim=0)).norm(dim=1))
        return _combine(parts).tolist()

    def states(self) -> list[dict[str, torch.Tensor]]:
        return [{k: v[i] for k, v in self.params.items()} for i in range(self.setup.n)]

    @torch.no_grad()
    def predictions(self) -> torch.Tensor:
        """(n, N) int64: every agent's predicted class on the global test set (those of the
        last :meth:`evaluate` while the parameters have not changed since)."""
        if self._predicted is None:
            x = self.setup.data.test_x
            self._predicted = torch.cat([
                self._logits({k: v[lo : lo + EVAL_CHUNK] for k, v in self.params.items()},
                             x).argmax(-1)
                for lo in range(0, self.setup.n, EVAL_CHUNK)
            ])  # fmt: skip
        return self._predicted


def _renormalized(w: sp.csr_matrix, drop: set[tuple[int, int]]) -> sp.csr_matrix:
    """W (n, n) without the (receiver, sender) entries in ``drop``, each row rescaled to
    sum to 1 (a receiver averages over the payloads it accepted)."""
    w, n = w.tocoo(), w.shape[1]
    gone = np.array([i * n + j for i, j in drop], dtype=np.int64)
    keep = ~np.isin(w.row.astype(np.int64) * n + w.col, gone)
    w = sp.csr_matrix((w.data[keep], (w.row[keep], w.col[keep])), shape=w.shape)
    return (sp.diags(1.0 / np.asarray(w.sum(axis=1)).ravel()) @ w).tocsr()


def _dim_order(t: torch.Tensor) -> tuple[int, ...]:
    """``t``'s dimensions from the outermost in memory to the innermost."""
    return tuple(sorted(range(t.dim()), key=lambda d: (-t.stride(d), d)))


def _combine(norms: list[torch.Tensor]) -> torch.Tensor:
    """The norms of whole rows from their blocks' norms (the one block's, unchanged)."""
    return norms[0] if len(norms) == 1 else torch.stack(norms).square().sum(dim=0).sqrt()


def _block_columns(theta: torch.Tensor, budget: int = BLOCK_BYTES) -> list[slice]:
    """Column slices of ``theta`` (A, P) whose float64 copy fits in ``budget`` bytes (so a
    float64 pass over a block stays in cache and never copies the whole matrix)."""
    width = max(256, budget // (8 * max(1, theta.shape[0])))
    return [slice(lo, lo + width) for lo in range(0, theta.shape[1], width)]


class _Optimizer:
    """torch.optim's SGD (momentum, weight decay) and Adam, per agent, with a step mask.

    Parameters are updated in place (they are views of the engine's matrix); where every
    agent moves, without a masked select. The state (momentum, Adam's moments) exists only
    for the optimizers that use it. SGD is torch.optim's arithmetic (weight decay added to
    the gradient, buffer = g at the first step, ``p.add_(direction, alpha=-lr)``)."""

    def __init__(self, cfg) -> None:
        self.cfg = cfg
        self.momentum: dict[str, torch.Tensor] = {}  # SGD's buffers
        self.moments: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # Adam's m and v
        self.t: torch.Tensor | None = None  # Adam's per-agent step count (float32)

    def step(self, params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor], moving):
        """Update ``params`` in place where ``moving`` (A,) bool is set."""
        c = self.cfg
        rows = None if bool(moving.all()) else moving.nonzero().squeeze(1)
        if c.optimizer == "adam":
            self.t = torch.zeros(len(moving)) if self.t is None else self.t
            self.t += moving.double()
        for k, p in params.items():
            g = grads[k].add(p, alpha=c.weight_decay) if c.weight_decay else grads[k]
            if c.optimizer == "adam":
                direction, scale = self._adam(k, g, rows), 1.0
            else:
                direction, scale = self._sgd(k, g, rows), c.lr
            if rows is None:
                p.add_(direction, alpha=-scale)
            else:
                p[rows] = p[rows].add(direction[rows], alpha=-scale)

    def _sgd(self, k: str, g: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        """The step direction of torch.optim.SGD: g, or the momentum buffer (g at first)."""
        c = self.cfg
        if not c.momentum:
            return g
        m = self.momentum.get(k)
        buf = g.clone() if m is None else m * c.momentum + g
        if rows is not None:  # agents that do not step keep their buffer (none yet: zero)
            buf = _where(rows, buf, torch.zeros_like(g) if m is None else m)
        self.momentum[k] = buf
        return buf

    def _adam(self, k: str, g: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        if k not in self.moments:
            self.moments[k] = (torch.zeros_like(g), torch.zeros_like(g))
        m, v = self.moments[k]
        new_m, new_v = _where(rows, m.lerp(g, 0.1), m), _where(rows, v * 0.999 + 0.001 * g * g, v)
        self.moments[k] = (new_m, new_v)
        t = self.t.clamp(min=1).reshape((-1,) + (1,) * (g.dim() - 1))
        bc1, bc2 = 1 - 0.9**t, 1 - 0.999**t
        return (self.cfg.lr / bc1) * new_m / (new_v.sqrt() / bc2.sqrt() + 1e-8)


def _where(rows: torch.Tensor | None, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """``new`` in the agents ``rows`` (None: all), ``old`` elsewhere."""
    if rows is None:
        return new
    out = old.clone()
    out[rows] = new[rows]
    return out
