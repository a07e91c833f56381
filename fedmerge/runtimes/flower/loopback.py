"""A Flower deployment on one machine: a SuperLink and SuperNodes as real processes on
127.0.0.1 (with each node's long-lived agent worker, :mod:`.worker`), and ``flwr run``.

For tests, benchmarks and trying a deployment before the hosts exist; across hosts the same
commands run on each host (docs/deployment.md). Every process's output goes to
``<folder>/logs/<name>.log``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

BIN = Path(sys.executable).parent
SOURCE = Path(__file__).resolve().parents[3]  # the fedmerge the workers import: this one
INSECURE = ("--insecure",)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Loopback:
    """SuperLink + SuperNodes on loopback. ``link_args``/``node_args``: their security flags
    (TLS files, ``--enable-supernode-auth``); ``connection``: the security line of the
    ``[superlink.loopback]`` connection in ``$FLWR_HOME/config.toml``; ``workers``: run each
    SuperNode with ``--isolation process`` beside a long-lived agent worker (False: Flower's
    default, one ``flwr-clientapp`` process per message); ``poll_s``: start the SuperNodes
    through :mod:`.supernode` with that poll (None: ``flower-supernode`` itself);
    ``database``: the SuperLink's ``--database`` (None: Flower's default, in memory; a
    file puts every payload through SQLite, docs/deployment.md)."""

    folder: Path
    link_args: Sequence[str] = INSECURE
    node_args: Sequence[str] = INSECURE
    connection: str = "insecure = true"
    workers: bool = True
    poll_s: float | None = 0.2
    database: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    procs: dict[str, tuple[subprocess.Popen, IO]] = field(default_factory=dict, init=False)
    ports: dict[str, int] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        home, self.logs = self.folder / "flwr-home", self.folder / "logs"
        home.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(exist_ok=True)
        self.env = {
            **os.environ, "FLWR_HOME": str(home),
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(SOURCE),
                                                        os.environ.get("PYTHONPATH")])),
            **self.env,
        }  # fmt: skip

    def start(self, timeout: float = 90) -> None:
        """Start the SuperLink (one port for all its APIs) and write the connection."""
        port = free_port()
        self.ports["superlink"] = port
        (self.folder / "flwr-home" / "config.toml").write_text(
            f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\n'
            f'address = "127.0.0.1:{port}"\n{self.connection}\n'
        )
        database = ["--database", self.database] if self.database else []
        self.spawn("superlink", "flower-superlink", *self.link_args, "--port", str(port),
                   *database)  # fmt: skip
        self.wait_for_port(port, "superlink", timeout)

    def add_node(self, name: str, node_config: str, *extra: str,
                 env: dict[str, str] | None = None) -> None:  # fmt: skip
        """Start SuperNode ``name`` with ``--node-config node_config`` (and its worker),
        ``env`` added to their environment."""
        if name not in self.ports:
            self.ports[name] = free_port()
        port, link = self.ports[name], self.ports["superlink"]
        isolation = ["--isolation", "process"] if self.workers else []
        supernode = ["flower-supernode"] if self.poll_s is None else [
            sys.executable, "-m", "fedmerge.runtimes.flower.supernode", f"--poll-s={self.poll_s}"
        ]  # fmt: skip
        self.spawn(name, *supernode, *self.node_args, "--superlink",
                   f"127.0.0.1:{link}", "--port", str(port), "--node-config", node_config,
                   *isolation, *extra, env=env)  # fmt: skip
        if self.workers:
            self.spawn(f"{name}-worker", sys.executable, "-m", "fedmerge.runtimes.flower.worker",
                       "--runtime-api-address", f"127.0.0.1:{port}", env=env)  # fmt: skip

    def kill_node(self, name: str) -> None:
        """SIGKILL SuperNode ``name`` and its worker (a crash: nothing gets to clean up)."""
        for key in (name, f"{name}-worker"):
            if key in self.procs:
                proc, out = self.procs.pop(key)
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                out.close()

    def flwr(self, *args: str, cwd: Path, timeout: float) -> subprocess.CompletedProcess:
        """``flwr ARGS`` against this deployment's ``$FLWR_HOME``."""
        cmd = [str(BIN / "flwr"), *args]
        return subprocess.run(cmd, cwd=cwd, env=self.env, capture_output=True, text=True,
                              timeout=timeout)  # fmt: skip

    def run(self, app: Path, run_config: str, timeout: float) -> subprocess.Popen:
        """Start ``flwr run APP loopback --run-config RUN_CONFIG --stream`` (logs/run.log)."""
        self.spawn("run", str(BIN / "flwr"), "run", str(app), "loopback", "--run-config",
                   run_config, "--stream", cwd=app)  # fmt: skip
        return self.procs["run"][0]

    def spawn(self, name: str, program: str, *args: str, cwd: Path | None = None,
              env: dict[str, str] | None = None) -> None:  # fmt: skip
        exe = program if os.sep in program else str(BIN / program)
        out = open(self.logs / f"{name}.log", "a")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen([exe, *args], env={**self.env, **(env or {})}, stdout=out,
                                stderr=subprocess.STDOUT, cwd=cwd or self.folder)  # fmt: skip
        self.procs[name] = (proc, out)

    def wait_for_port(self, port: int, name: str, limit: float) -> None:
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            if self.procs[name][0].poll() is not None:
                raise RuntimeError(f"{name} exited: {self.tail(name)}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.3)
        raise RuntimeError(f"{name} did not open port {port} within {limit} s")

    def tail(self, name: str, chars: int = 2000) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def tails(self) -> str:
        return "\n".join(f"--- {p.stem}\n{self.tail(p.stem)}" for p in sorted(self.logs.iterdir()))

    def close(self) -> None:
        """Stop every process (the run first, the SuperLink last)."""
        for name in reversed(list(self.procs)):
            proc, out = self.procs.pop(name)
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            out.close()

    def __enter__(self) -> Loopback:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
