"""Payloads relayed without uploading them again: the replies stay on the SuperLink.

Flower stores objects by content (SHA-256) and counts references. A node's reply brings its
payload to the SuperLink; the relay pulls it, and ``pull_messages`` confirms the reply at
once, so the SuperLink deletes the payload, and the relay uploads the same bytes again in
the next step's messages (4.3 MB per payload for a 1M-parameter model). With
:class:`KeptReplies` the relay confirms step k's replies only after pushing step k + 1's
messages: the SuperLink still holds the payloads then, the new messages reference them, and
``PushMessages`` asks the relay for none of them (``objects_to_push``); the confirmation
then drops only the replies' own references. Only for Flower 1.41's ``HttpGrid`` (a
deployment); any other grid confirms as usual. Its pulls end at the caller's deadline
(:func:`~fedmerge.runtimes.flower.polling.pulls_until`).
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid

from fedmerge.runtimes.flower.polling import pulls_until


class KeptReplies:
    """Pull replies from ``grid`` with their confirmations held until :meth:`release`."""

    def __init__(self, grid: Grid) -> None:
        from flwr.superlink.grid.http_grid import HttpGrid

        self.grid, self.held = grid, []
        self.client = grid._runtime_client if isinstance(grid, HttpGrid) else None
        if self.client is not None and not callable(
            getattr(type(self.client), "ConfirmMessageReceived", None)
        ):  # fmt: skip
            raise RuntimeError("this Flower's runtime client is not the one fedmerge knows")

    def pull(self, message_ids: Iterable[str], until: float | None = None) -> list[Message]:
        """``grid.pull_messages``, its confirmations kept for :meth:`release`; a reply whose
        objects are not all on the SuperLink by ``time.monotonic()`` ``until`` comes back as
        an error reply (None: Flower's limit)."""
        if self.client is None:
            return list(self.grid.pull_messages(message_ids))
        from flwr.superlink.grid import http_grid

        self.client.ConfirmMessageReceived = self.held.append  # the instance's, for this call
        try:
            with pulls_until(http_grid, until):
                return list(self.grid.pull_messages(message_ids))
        finally:
            del self.client.ConfirmMessageReceived

    def release(self) -> None:
        """Send the held confirmations (the SuperLink may now delete those replies)."""
        while self.held:
            type(self.client).ConfirmMessageReceived(self.client, self.held.pop())
