"""A real Flower deployment on loopback: one SuperLink, three SuperNodes (``--isolation
process``, each beside its long-lived agent worker), ``flwr run .``; insecure, and with TLS
and SuperNode authentication.

Slow (process start-up); the round time is printed, never asserted.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from fedmerge.config import default_config
from fedmerge.runtimes.flower.loopback import BIN, Loopback
from fedmerge.runtimes.local.simulator import Simulator

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


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
    """SuperLink + 3 SuperNodes (each beside its agent worker) on 127.0.0.1: insecure, or TLS
    (a CA made here) with SuperNode authentication (keys made here, registered with ``flwr
    supernode register``); yields (deployment, rounds); stops them."""
    if not (BIN / "flower-superlink").exists():
        pytest.skip("flower-superlink is not installed next to this Python")
    tls = request.param == "tls+auth"
    certs = make_certificates(tmp_path) if tls else {}
    security = {}
    if tls:
        security = {
            "link_args": ["--ssl-ca-certfile", str(certs["ca"]), "--ssl-certfile",
                          str(certs["cert"]), "--ssl-keyfile", str(certs["key"]),
                          "--enable-supernode-auth"],
            "node_args": ["--root-certificates", str(certs["ca"])],
            "connection": f'root-certificates = "{certs["ca"]}"',
        }  # fmt: skip
    with Loopback(tmp_path / "dep", env={"OMP_NUM_THREADS": "1"}, **security) as dep:
        dep.start()
        for i in range(3):
            auth = []
            if tls:
                private, public = node_key(tmp_path, i)
                done = dep.flwr("supernode", "register", str(public), "loopback", cwd=tmp_path,
                                timeout=120)  # fmt: skip
                assert done.returncode == 0, done.stdout + done.stderr
                auth = ["--auth-supernode-private-key", str(private)]
            config = f'partition-id={i} num-partitions=3 state-dir="{tmp_path / "state"}"'
            dep.add_node(f"node-{i}", config, *auth)
        yield dep, 1 if tls else 2  # rounds: TLS adds a run, keep it short


def test_flwr_run_on_a_loopback_deployment(loopback, tmp_path):
    dep, rounds = loopback
    out = tmp_path / "out"
    sets = f"topology=ring agents=3 rounds={rounds} vectorize=never"
    start = time.perf_counter()
    run = dep.run(ROOT, f"overrides='{sets}' out-dir='{out}' timeout=120", 120)
    if run.wait(timeout=480) != 0 or not (out / "metrics.jsonl").exists():
        pytest.fail(f"no metrics:\n{dep.tails()}")
    elapsed = time.perf_counter() - start
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
