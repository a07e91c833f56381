"""Consensus measures: how far apart the agents' models are, three ways.

- ``consensus`` — the plain parameter distance ‖θ_i − θ̄‖ (θ̄ the mean over agents), from
  :func:`distances`. Meaningful when the agents share one coordinate system (one
  shared init, gossip on task vectors). It is **not** invariant to permutations of hidden
  units: two agents computing the same function with their units in another order are far
  apart by it, so for DIMAT from different inits it reports distances that mean nothing.
- ``consensus_aligned`` — the same distance after aligning every agent to a reference
  agent (the first one) by weight matching (:func:`fedmerge.alignment.weight_matching`,
  data-free): ‖P_i(θ_i) − mean_j P_j(θ_j)‖ with P_ref = identity, from
  :func:`aligned_distances`. ≈ 0 for a model and its permuted copies; equal to the plain
  distance when the identity is the best alignment (a shared init and small drift).
  Weight matching is coordinate descent, so on models that disagree it is an upper bound
  of the distance under the best permutations.
- ``disagreement`` — in function space, needs no alignment: per agent, the share of the
  global test samples on which its predicted class differs from another agent's, averaged
  over the other agents (:func:`disagreement`). In [0, 1]; 0 when all agents predict alike.

>>> disagreement(torch.tensor([[0, 1, 2, 3], [0, 1, 2, 0], [0, 1, 2, 3]]))
[0.125, 0.25, 0.125]
>>> distances(torch.tensor([[0.0, 0.0], [2.0, 0.0]]))
[1.0, 1.0]
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedmerge.alignment import apply_permutation, permutation_spec, weight_matching
from fedmerge.alignment.spec import PermutationSpec
from fedmerge.config import MetricsConfig
from fedmerge.decentralized.engine import Engine
from fedmerge.errors import ConfigError
from fedmerge.statedict import StateDict, is_mergeable


def flat_state(state: StateDict, dtype: torch.dtype | None = torch.float64) -> torch.Tensor:
    """(P,) ``dtype``: the floating entries of ``state``, flattened in key order. ``None``:
    their common dtype (float32 for a float32 model), which holds every value exactly at
    a fraction of float64's bytes (what a Flower node ships, converted on arrival)."""
    flat = torch.cat([v.reshape(-1) for v in state.values() if is_mergeable(v)])
    return flat if dtype is None else flat.to(dtype)


def distances(flat: torch.Tensor, mean: torch.Tensor | None = None) -> list[float]:
    """‖θ_i − θ̄‖ for the rows of ``flat`` (n, P); θ̄ (P,) defaults to the rows' mean (a
    runtime that holds only some rows passes the mean it all-reduced)."""
    centre = flat.mean(0) if mean is None else mean
    return (flat - centre).norm(dim=1).tolist()


def aligned_distances(
    states: Sequence[StateDict], spec: PermutationSpec, reference: int = 0, seed: int = 0
) -> list[float]:
    """‖P_i(θ_i) − mean_j P_j(θ_j)‖ per agent, P_i aligning agent i to ``states[reference]``
    by weight matching (float entries only; BatchNorm statistics follow the permutation)."""
    ref = states[reference]
    aligned = [
        s if i == reference else apply_permutation(spec, weight_matching(spec, ref, s, seed), s)
        for i, s in enumerate(states)
    ]
    return distances(torch.stack([flat_state(s) for s in aligned]))


def disagreement(predictions: torch.Tensor) -> list[float]:
    """Per agent i: mean over j ≠ i of the share of samples where predictions (n, N) of
    class indices differ; zero for a single agent. O(n·N): with counts[s, c] the number
    of agents predicting c on sample s, agent i agrees with counts[s, p_i(s)] − 1 others."""
    n, samples = predictions.shape
    if n < 2:
        return [0.0] * n
    on = {"dtype": torch.float64, "device": predictions.device}  # the engine's device
    counts = torch.zeros(samples, int(predictions.max()) + 1, **on)
    cols = torch.arange(samples, device=predictions.device).expand(n, samples)
    counts.index_put_((cols.reshape(-1), predictions.reshape(-1)), torch.ones(n * samples, **on),
                      accumulate=True)  # fmt: skip
    agree = (counts[cols, predictions] - 1).mean(dim=1) / (n - 1)
    return (1.0 - agree).tolist()


def measures(
    engine: Engine, template: torch.nn.Module, init: str, cfg: MetricsConfig
) -> dict[str, list[float] | None]:
    """The three measures of one round for every agent of ``engine`` (a list per field, or
    None where ``cfg`` turns the measure off). ``template`` is a model of the agents'
    architecture (for its permutation spec); ``init`` the config's ``model.init``: with
    ``aligned_consensus: auto`` the aligned distance is computed for ``different`` only,
    and only for models that have a permutation spec."""
    out: dict[str, list[float] | None] = {"consensus": engine.distances()}
    mode = cfg.aligned_consensus
    spec = None
    if mode == "always" or (mode == "auto" and init == "different"):
        try:
            spec = permutation_spec(template)
        except ConfigError:
            if mode == "always":
                raise
    out["consensus_aligned"] = None if spec is None else aligned_distances(engine.states(), spec)
    out["disagreement"] = disagreement(engine.predictions()) if cfg.disagreement else None
    return out
