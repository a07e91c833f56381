"""The round kit: everything one decentralized round needs, whatever the runtime.

A runtime (:mod:`fedmerge.runtimes`) only moves payloads and drives rounds; everything else
is here, one idea per module:

- :mod:`.setup`: data, partition, topology, shared reference, each agent (``build_setup``)
- :mod:`.agent`: train, publish, :meth:`~.agent.Agent.validate` + ``receive``, evaluate;
  ``last_round`` is the per-sender freshness state; ``extra_state`` what a kind of agent
  keeps besides its model (:mod:`.continual_agent` keeps a continual merge)
- :mod:`.payload`: what travels (safetensors on the wire, content hash, validation)
- :mod:`.delivery`: a :class:`~.delivery.Delivery` names its transport sender (``source``)
  and carries a payload or a :class:`~.delivery.Refused`; ``deliver`` is the in-memory way
- :mod:`.receive`: ``receive_and_merge``, the one receive → validate → count → merge step
- :mod:`.protocols`: the registered protocols (gossip, DIMAT, disseminate, …); a protocol
  is a merge function plus declared facts, optionally with its own agent factory
- :mod:`.robust`: the registered aggregation rules (mean, clip, median, trimmed mean, Krum)
- :mod:`.faults` (seeded fault model, crash/rejoin, declared fault kinds),
  :mod:`.adversary` (Byzantine senders, duplication, reordering, freshness),
  :mod:`.persist` (the one agent-state file), :mod:`.consensus`, :mod:`.traffic`,
  :mod:`.metrics` (the metrics row), :mod:`.engine` (the declared ``Engine`` and
  ``RoundRunner`` interfaces), :mod:`.dissemination` (the expert-flooding node and
  :func:`~.dissemination.disseminate` over given experts)
"""
