"""A real Flower deployment on loopback: one SuperLink, three SuperNodes, ``flwr run .``.

Slow (process start-up, and SuperNodes poll the SuperLink every few seconds); the round
time is printed, never asserted.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedmerge.config import default_config
from fedmerge.simulator import Simulator

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def free_ports(k: int) -> list[int]:
    socks = [socket.socket() for _ in range(k)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def wait_for_port(port: int, proc: subprocess.Popen, log: Path, limit: float = 90) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the SuperLink exited: {log.read_text()[-2000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"the SuperLink did not open port {port} in {limit} s")


@pytest.fixture
def loopback(tmp_path):
    """SuperLink + 3 SuperNodes on 127.0.0.1; yields (env, connection name); stops them."""
    if not (BIN / "flower-superlink").exists():
        pytest.skip("flower-superlink is not installed next to this Python")
    home = tmp_path / "flwr-home"
    home.mkdir()
    link, *node_ports = free_ports(4)  # Flower 1.41: one HTTP port for all SuperLink APIs
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\n'
        f'address = "127.0.0.1:{link}"\ninsecure = true\n'
    )
    env = {**os.environ, "FLWR_HOME": str(home), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}  # fmt: skip
    logs = tmp_path / "logs"
    logs.mkdir()
    procs = []

    def start(name: str, *args: str) -> None:
        out = open(logs / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
        procs.append((subprocess.Popen([str(BIN / args[0]), *args[1:]], env=env, stdout=out,
                                       stderr=subprocess.STDOUT, cwd=tmp_path), out))  # fmt: skip

    try:
        start("superlink", "flower-superlink", "--insecure", "--port", str(link),
              "--database", str(tmp_path / "link.db"))  # fmt: skip
        wait_for_port(link, procs[0][0], logs / "superlink.log")
        for i, port in enumerate(node_ports):
            config = f'partition-id={i} num-partitions=3 state-dir="{tmp_path / "state"}"'
            start(f"supernode-{i}", "flower-supernode", "--insecure", "--superlink",
                  f"127.0.0.1:{link}", "--port", str(port), "--node-config", config)  # fmt: skip
        yield env, logs
    finally:
        for proc, out in reversed(procs):
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
            out.close()


def test_flwr_run_on_a_loopback_deployment(loopback, tmp_path):
    env, logs = loopback
    out = tmp_path / "out"
    sets = "topology=ring agents=3 rounds=2 vectorize=never"
    run_config = f"overrides='{sets}' out-dir='{out}' timeout=120"
    start = time.perf_counter()
    cmd = [str(BIN / "flwr"), "run", ".", "loopback", "--run-config", run_config, "--stream"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=480)
    elapsed = time.perf_counter() - start
    if not (out / "metrics.jsonl").exists():
        tails = {p.name: p.read_text()[-2000:] for p in logs.iterdir()}
        pytest.fail(f"no metrics: {done.stdout[-3000:]}\n{done.stderr[-2000:]}\n{tails}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["round"], r["agent"]) for r in rows] == [(r, a) for r in (1, 2) for a in range(3)]
    ref = Simulator(default_config(sets.split())).run()
    for a, b in zip(ref, rows, strict=True):
        assert b["global_acc"] == a["global_acc"] and b["local_acc"] == a["local_acc"]
        assert b["consensus"] == pytest.approx(a["consensus"], abs=1e-6)
    print(f"\nloopback deployment: 3 SuperNodes, 2 rounds, {elapsed:.1f} s from `flwr run` to "
          f"report; {sum(r['wall_s'] for r in rows[::3]) / 2:.1f} s per round")  # fmt: skip
    shutil.rmtree(out)
