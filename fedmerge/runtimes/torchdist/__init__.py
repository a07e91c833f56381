"""The torch.distributed runtime: agents on ranks, payloads peer to peer along the topology.

Every rank builds the same :class:`~fedmerge.decentralized.setup.Setup` from the config
and hosts a block of nodes (node i on rank i by default; ``distributed.agents_per_rank: k``
puts nodes k·r … k·r+k−1 on rank r). Round r on every rank, as in process:

    faults, plan  the seeded FaultModel and ``topology.round(r, active)`` (same on every rank)
    train         the hosted agents
    exchange      per (sender node, receiving rank): header → ack → flat body, each step one
                  ``batch_isend_irecv`` with a deadline (:mod:`.wire`)
    receive/merge the round kit's receive_and_merge, as every runtime
    agree         every rank checks in on the rendezvous store; the first to see everyone (or
                  to reach the timeout) writes who is alive, and all ranks adopt that verdict
    consensus     Σ_i θ_i by all_reduce (float64), then ‖θ_i − θ̄‖ per hosted agent
    rows          through the store to the leader (the lowest live rank)

A rank that stops answering is named by rank and node. ``on_peer_failure: abort`` stops
every rank with that message (:class:`PeerFailure`); ``continue`` drops its nodes from the
plan (the topology renormalizes the weights over the nodes present), rebuilds the process
group over the survivors and goes on; its rows then read ``active: false`` with no metrics.

``run(cfg, procs=N)`` starts N local worker processes itself (laptops, tests); under
``torchrun`` each worker calls :func:`run_rank` (see ``clients/torchdist_agent.py``).

Modules, one concern each: :mod:`.round` (one rank's round), :mod:`.exchange` and
:mod:`.wire` (the data plane), :mod:`.control` (agreement and the failure policy),
:mod:`.layout` (nodes on ranks, backend), :mod:`.resume` (saved rounds, restart and resume),
:mod:`.launch` (connect, run, local launcher), :mod:`.sidecar` (merging for external trainers).
"""

from fedmerge.runtimes.torchdist.control import Excluded, PeerFailure
from fedmerge.runtimes.torchdist.launch import connect, exit_now, run, run_rank, worker_main
from fedmerge.runtimes.torchdist.layout import Layout, make_layout, pick_backend
from fedmerge.runtimes.torchdist.round import RankRunner

__all__ = ["Excluded", "Layout", "PeerFailure", "RankRunner", "connect", "exit_now",
           "make_layout", "pick_backend", "run", "run_rank", "worker_main"]  # fmt: skip
