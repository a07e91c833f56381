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
from fedmerge.runtimes.local.simulator import Simulator

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


def make_certificates(folder: Path) -> dict[str, Path]:
    """A throw-away CA and a server certificate for 127.0.0.1 signed by it (PEM files)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def cert(subject: str, key, issuer: str, signer, ca: bool) -> x509.Certificate:
        now = datetime.datetime.now(datetime.UTC)
        b = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
        )
        b = b.public_key(key.public_key()).serial_number(x509.random_serial_number())
        b = b.not_valid_before(now - datetime.timedelta(minutes=5))
        b = b.not_valid_after(now + datetime.timedelta(days=1))
        b = b.add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        if not ca:
            import ipaddress

            names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            b = b.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return b.sign(signer, hashes.SHA256())

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_cert = cert("fedmerge-test-ca", ca_key, "fedmerge-test-ca", ca_key, True)
    server = cert("127.0.0.1", key, "fedmerge-test-ca", ca_key, False)
    pem = serialization.Encoding.PEM
    files = {"ca": folder / "ca.crt", "cert": folder / "server.pem", "key": folder / "server.key"}
    files["ca"].write_bytes(ca_cert.public_bytes(pem))
    files["cert"].write_bytes(server.public_bytes(pem))
    files["key"].write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))  # fmt: skip
    return files


def node_key(folder: Path, i: int) -> tuple[Path, Path]:
    """A SuperNode's authentication key pair (NIST P-384, OpenSSH format, as Flower wants)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    private, public = folder / f"node-{i}.key", folder / f"node-{i}.pub"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.OpenSSH,
                                          serialization.NoEncryption()))  # fmt: skip
    ssh = serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    public.write_bytes(key.public_key().public_bytes(*ssh))
    return private, public


@pytest.fixture(params=["insecure", "tls+auth"])
def loopback(request, tmp_path):
    """SuperLink + 3 SuperNodes on 127.0.0.1: insecure, or TLS (a CA made here) with SuperNode
    authentication (keys made here, registered with ``flwr supernode register``); yields
    (env, logs folder, rounds); stops them."""
    if not (BIN / "flower-superlink").exists():
        pytest.skip("flower-superlink is not installed next to this Python")
    home = tmp_path / "flwr-home"
    home.mkdir()
    link, *node_ports = free_ports(4)  # Flower 1.41: one HTTP port for all SuperLink APIs
    tls = request.param == "tls+auth"
    certs = make_certificates(tmp_path) if tls else {}
    security = f'root-certificates = "{certs["ca"]}"' if tls else "insecure = true"
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\n'
        f'address = "127.0.0.1:{link}"\n{security}\n'
    )
    link_security = (["--ssl-ca-certfile", str(certs["ca"]), "--ssl-certfile", str(certs["cert"]),
                      "--ssl-keyfile", str(certs["key"]), "--enable-supernode-auth"]
                     if tls else ["--insecure"])  # fmt: skip
    node_security = ["--root-certificates", str(certs["ca"])] if tls else ["--insecure"]
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
        start("superlink", "flower-superlink", *link_security, "--port", str(link),
              "--database", str(tmp_path / "link.db"))  # fmt: skip
        wait_for_port(link, procs[0][0], logs / "superlink.log")
        for i, port in enumerate(node_ports):
            auth = []
            if tls:
                private, public = node_key(tmp_path, i)
                register = [str(BIN / "flwr"), "supernode", "register", str(public), "loopback"]
                done = subprocess.run(register, env=env, cwd=tmp_path, capture_output=True,
                                      text=True, timeout=120)  # fmt: skip
                assert done.returncode == 0, done.stdout + done.stderr
                auth = ["--auth-supernode-private-key", str(private)]
            config = f'partition-id={i} num-partitions=3 state-dir="{tmp_path / "state"}"'
            start(f"supernode-{i}", "flower-supernode", *node_security, "--superlink",
                  f"127.0.0.1:{link}", "--port", str(port), "--node-config", config,
                  *auth)  # fmt: skip
        yield env, logs, 1 if tls else 2  # rounds: TLS adds a run, keep it short
    finally:
        for proc, out in reversed(procs):
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
            out.close()


def test_flwr_run_on_a_loopback_deployment(loopback, tmp_path):
    env, logs, rounds = loopback
    out = tmp_path / "out"
    sets = f"topology=ring agents=3 rounds={rounds} vectorize=never"
    run_config = f"overrides='{sets}' out-dir='{out}' timeout=120"
    start = time.perf_counter()
    cmd = [str(BIN / "flwr"), "run", ".", "loopback", "--run-config", run_config, "--stream"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=480)
    elapsed = time.perf_counter() - start
    if not (out / "metrics.jsonl").exists():
        tails = {p.name: p.read_text()[-2000:] for p in logs.iterdir()}
        pytest.fail(f"no metrics: {done.stdout[-3000:]}\n{done.stderr[-2000:]}\n{tails}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["round"], r["agent"]) for r in rows] == [
        (r, a) for r in range(1, rounds + 1) for a in range(3)
    ]
    ref = Simulator(default_config(sets.split())).run()
    for a, b in zip(ref, rows, strict=True):
        assert b["global_acc"] == a["global_acc"] and b["local_acc"] == a["local_acc"]
        assert b["consensus"] == pytest.approx(a["consensus"], abs=1e-6)
    print(f"\nloopback deployment: 3 SuperNodes, {rounds} rounds, {elapsed:.1f} s from `flwr run` "
          f"to report; {sum(r['wall_s'] for r in rows[::3]) / rounds:.1f} s per round")  # fmt: skip
    shutil.rmtree(out)
