"""``flower-supernode`` that waits less (recommended with fedmerge's worker).

Flower 1.41's SuperNode asks the SuperLink for a message, and when there is none sleeps
3 s (hard-coded); it pulls a message's payloads, retrying one not yet uploaded after 1 s,
2 s, ...; then it waits for its ClientApp's reply in 0.5 s sleeps. A fedmerge step reaches
a node only after every node's previous reply is in, so these waits add up to seconds per
round (``benchmarks/flower_deploy.py``, docs/deployment.md). This runs Flower's own
SuperNode with its idle poll capped at ``--poll-s`` seconds, its waits on its ClientApp at
0.01 s and its payload retries after 0.01 s (:mod:`.polling`); all other arguments are
``flower-supernode``'s::

    python -m fedmerge.runtimes.flower.supernode --poll-s 0.2 --isolation process \\
        --superlink LINK_HOST:9093 --node-config "node-file='/data/node.yaml'" ...

Each poll is one request to the SuperLink: N nodes at 0.2 s make 5·N requests per second
while idle. It changes only ``flwr.supernode.start_client_internal``'s sleeps and object
pulls (checked at start: a Flower whose loop differs is refused; use ``flower-supernode``).
"""

from __future__ import annotations

import sys

from fedmerge.runtimes.flower.polling import cap_sleeps


def split_poll(argv: list[str]) -> tuple[float, list[str]]:
    """(``--poll-s`` value, default 0.2; the other arguments, for flower-supernode)."""
    rest, poll, it = [], 0.2, iter(argv)
    for arg in it:
        if arg == "--poll-s" or arg.startswith("--poll-s="):
            value = arg.partition("=")[2] or next(it, "")
            try:
                poll = float(value)
            except ValueError:
                raise SystemExit(f"--poll-s: expected seconds, got {value!r}") from None
            if not 0.01 <= poll <= 3:
                raise SystemExit(f"--poll-s: {poll} is outside 0.01..3 seconds")
        else:
            rest.append(arg)
    return poll, rest


def main() -> None:
    from flwr.supernode import start_client_internal
    from flwr.supernode.cli import flower_supernode

    poll, rest = split_poll(sys.argv[1:])
    cap_sleeps(start_client_internal, poll)
    sys.argv = ["flower-supernode", *rest]
    flower_supernode()


if __name__ == "__main__":
    main()
