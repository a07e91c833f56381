"""A long-lived ClientApp process for ``flower-supernode --isolation process``.

By default a SuperNode starts one ``flwr-clientapp`` process per message, which imports
torch and fedmerge, rebuilds the node's setup and reloads its agent every step: seconds of
overhead per round. With ``--isolation process`` the SuperNode leaves running ClientApps to
a process beside it; this is one that never exits::

    flower-supernode --isolation process --port 9100 ... &
    python -m fedmerge.runtimes.flower.worker --runtime-api-address 127.0.0.1:9100

It asks the SuperNode's runtime API for ``flwr-clientapp`` tasks (Flower's SuperExec
protocol) every 0.05 s, pulls each task's message (retrying payloads the SuperNode has not
received yet after 0.01 s, not Flower's 1 s), and runs each in this process with fedmerge's
ClientApp (:data:`fedmerge.runtimes.flower.client_app.app`), which keeps the setup and the
agent in memory between messages (and on disk, so a restarted node resumes). It runs the
ClientApp installed here, never code from the run's FAB: the node decides what it executes.
"""

from __future__ import annotations

import argparse
import itertools
import time
from logging import ERROR, INFO, WARNING

import httpx
from flwr.app import Error, Message
from flwr.common.constant import ErrorCode, SubStatus
from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
from flwr.supercore import log
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
from flwr.supercore.retry import RetryInvoker, exponential
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supernode.runtime import run_clientapp
from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

from fedmerge.runtimes.flower.client_app import app
from fedmerge.runtimes.flower.polling import quick_pulls


def _client(address: str, certificates: bytes | None, *token: str) -> RuntimeHttpClient:
    """A runtime-API client that retries transport errors for up to 30 s and then raises
    (Flower's own invoker retries forever and interrupts the process on a 401)."""
    retry = RetryInvoker(lambda: exponential(max_delay=2), httpx.TransportError, None, 30)
    interceptors = [RuntimeVersionHttpInterceptor(component_name="flwr-clientapp")]
    interceptors += [RuntimeTokenHttpInterceptor(t) for t in token]
    return RuntimeHttpClient.from_server_address(
        server_address=address, insecure=certificates is None, root_certificates=certificates,
        interceptors=interceptors, retry_invoker=retry,
    )  # fmt: skip


def run_task(address: str, certificates: bytes | None, token: str) -> None:
    """One ClientApp task: pull the message and context, run the app, push reply and status."""
    client = _client(address, certificates, token)
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    heartbeat.start()
    message = context = reply = None
    status, details = SubStatus.FAILED, "ClientApp task failed"
    clock = [time.perf_counter()]
    try:
        message, context, _, _ = pull_task_input(client)
        clock.append(time.perf_counter())
        reply = app(message=message, context=context)
        clock.append(time.perf_counter())
        status, details = SubStatus.COMPLETED, ""
    except Exception as exc:  # noqa: BLE001 - reported to the ServerApp, as flwr-clientapp does
        log(ERROR, "fedmerge worker: the ClientApp raised", exc_info=exc)
        details = f"{type(exc)}:<'{exc}'>"
        if message is not None:
            error = Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details)
            reply = Message(error, reply_to=message)
    finally:
        try:
            if reply is not None and context is not None:
                push_message(client, reply, context)
            push_task_output(client, context, status, details)
            clock.append(time.perf_counter())
            if len(clock) == 4:  # where a step's time goes, on the node
                log(INFO, "fedmerge worker: %s in %.2f s (pull %.2f, app %.2f, push %.2f)",
                    message.metadata.message_type, clock[3] - clock[0],
                    *(b - a for a, b in itertools.pairwise(clock)))  # fmt: skip
        finally:
            heartbeat.stop()
            client.close()


def serve(address: str, certificates: bytes | None = None, poll_s: float = 0.05) -> None:
    """Run ClientApp tasks from the SuperNode at ``address`` forever, polling every
    ``poll_s`` seconds; waits (logging) while the SuperNode is unreachable. A message's
    payloads may reach the SuperNode after the message: they are retried every 0.05 s at
    most (:func:`~.polling.quick_pulls`), not after 1 s, 2 s, ..."""
    quick_pulls(run_clientapp, "pull_and_inflate_object_from_tree")
    log(INFO, "fedmerge worker: serving ClientApp tasks of the SuperNode at %s", address)
    acquire = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
    client = _client(address, certificates)
    while True:
        try:
            res = client.AcquireTask(acquire)
        except httpx.HTTPError as exc:
            log(WARNING, "fedmerge worker: SuperNode at %s unreachable (%s); retrying", address,
                exc)  # fmt: skip
            time.sleep(1)
            continue
        if res.HasField("task") and res.token:
            try:
                run_task(address, certificates, res.token)
            except httpx.HTTPError as exc:
                log(WARNING, "fedmerge worker: task lost (%s)", exc)
        else:
            time.sleep(poll_s)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m fedmerge.runtimes.flower.worker",
        description="Run fedmerge's ClientApp for a SuperNode started with --isolation process, "
        "in one long-lived process (torch imported, setup and agent kept between messages).",
    )  # fmt: skip
    ap.add_argument("--runtime-api-address", default="127.0.0.1:9094",
                    help="the SuperNode's runtime API: the host and --port it was started "
                    "with (default %(default)s, flower-supernode's default)")  # fmt: skip
    ap.add_argument("--root-certificates", metavar="CA.pem",
                    help="CA of the runtime API's TLS certificate, when the SuperNode was "
                    "started with --ssl-certfile (default: plain HTTP on loopback)")  # fmt: skip
    ap.add_argument("--poll-s", type=float, default=0.05,
                    help="seconds between asks for a task (default %(default)s)")  # fmt: skip
    args = ap.parse_args(argv)
    certificates = None
    if args.root_certificates:
        with open(args.root_certificates, "rb") as f:
            certificates = f.read()
    serve(args.runtime_api_address, certificates, args.poll_s)


if __name__ == "__main__":
    main()
