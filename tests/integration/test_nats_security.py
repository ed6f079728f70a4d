"""NATS credentials and TLS: nats-server that asks for them, every pdserve service presenting them.

`pdserve up --nats URL` against a server with a user and password (and one with TLS) proves the options
reach every service it starts (any service without them would fail to connect and `pdserve up` would not
become ready); `pdserve up --nats-token` shows its own NATS asks for the token. Without credentials, a
service fails at once with one line that names the flags to set.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import re
import shutil
import subprocess
import sys
import time

import nats
import pytest

from pdserve import config as cfg
from pdserve import nats_auth, nats_server
from pdserve.bus import Bus, BusError
from pdserve.config import MOCK_MODEL
from pdserve.protocol import StatsRequest, WorkerStats
from tests.e2e.conftest import PdserveUp, Service, free_port

USER, PASSWORD, TOKEN = "pdserve", "s3cret-Passw0rd", "t0ken-abcdef"


@pytest.fixture
def auth_nats(tmp_path):
    server = nats_server.start(store_dir=str(tmp_path / "nats"), die_with_parent=True,
                               auth=nats_server.ServerAuth(user=USER, password=PASSWORD))
    yield server
    server.stop()


async def echo_over(url: str, **credentials) -> None:
    """A request/reply round trip between two Buses connected with `credentials`."""
    server = await Bus.connect(url, "echo-server", connect_timeout_s=5, **credentials)
    client = await Bus.connect(url, "echo-client", connect_timeout_s=5, **credentials)
    try:
        async def on_stats(_: StatsRequest) -> WorkerStats:
            return WorkerStats(worker_id="w", role="decode", num_requests_served=3)

        await server.serve("t.stats", StatsRequest, on_stats)
        reply = await client.request("t.stats", StatsRequest(), WorkerStats, timeout_s=5)
        assert reply.num_requests_served == 3
    finally:
        await client.close()
        await server.close()


async def refused(url: str, **credentials) -> tuple[str, float]:
    started = time.monotonic()
    with pytest.raises(BusError) as e:
        await Bus.connect(url, "svc", connect_timeout_s=15, **credentials)
    return str(e.value), time.monotonic() - started


async def test_user_and_password(auth_nats):
    await echo_over(auth_nats.url, user=USER, password=PASSWORD)
    for credentials, given in (({}, "requires credentials"), ({"user": USER, "password": "wrong"}, "were refused"),
                               ({"token": PASSWORD}, "were refused")):
        message, seconds = await refused(auth_nats.url, **credentials)
        assert seconds < 5, "refused credentials must not wait out the connect timeout"
        assert "Authorization Violation" in message and given in message
        assert "--nats-user" in message and "PDSERVE_NATS_PASSWORD" in message and "--nats-token" in message
        assert PASSWORD not in message


async def test_token(tmp_path):
    server = nats_server.start(store_dir=str(tmp_path / "nats"), auth=nats_server.ServerAuth(token=TOKEN))
    try:
        await echo_over(server.url, token=TOKEN)
        message, _ = await refused(server.url)
        assert "--nats-token" in message
    finally:
        server.stop()


def test_service_without_credentials_exits_naming_the_fix(auth_nats, tmp_path):
    for name, argv in (("router", ["router", "--port", str(free_port())]), ("kv-broker", ["kv-broker"]),
                       ("prefill-worker", ["prefill-worker"])):
        service = Service([*argv, "--nats", auth_nats.url], str(tmp_path / f"{name}.log"))
        try:
            assert service.process.wait(timeout=20) == 1, service.output()
        finally:
            service.stop()
        out = service.output()
        assert "Authorization Violation" in out and "--nats-user" in out, out
        assert "Traceback" not in out, out


def test_pdserve_up_passes_credentials_to_every_service(auth_nats, tmp_path):
    up = PdserveUp(tmp_path, free_port(), "--nats", auth_nats.url, env={"PDSERVE_NATS_USER": USER,
                                                                       "PDSERVE_NATS_PASSWORD": PASSWORD})
    with up.running(1, 1):
        assert_serves(up)
        # the password never sits in an argv (ps shows those)
        assert_not_in_argv({up.process.pid, *up.children_seen}, PASSWORD)


def test_pdserve_up_without_credentials_fails_clearly(auth_nats, tmp_path):
    up = PdserveUp(tmp_path, free_port(), "--nats", auth_nats.url)
    assert up.process.wait(timeout=60) == 1
    up.stop()
    out = up.output()
    assert "exited with status 1 during start-up" in out and "Authorization Violation" in out
    assert "--nats-user" in out


def test_pdserve_up_own_nats_has_an_identity_per_role_and_refuses_anonymous(tmp_path):
    up = PdserveUp(tmp_path, free_port())
    with up.running(1, 1):
        assert_serves(up)

        async def anonymous() -> None:
            with pytest.raises(Exception, match="Authorization Violation"):
                nc = await nats.connect(up.nats_url, allow_reconnect=False, connect_timeout=2)
                await nc.close()

        asyncio.run(anonymous())
        # every role's password sits in a private file, and in no process's argv
        for role in ("router", "prefill", "decode", "broker", "observer"):
            path = up.run_dir / "nats-credentials" / f"{role}.env"
            assert path.stat().st_mode & 0o077 == 0, f"{path} is readable by others"
            assert_not_in_argv({up.process.pid, *up.children_seen}, up.credentials(role)["password"])
    assert up.run_dir.exists(), "a --run-dir the user gave stays"


def test_pdserve_up_shared_credentials_are_for_an_external_nats(tmp_path):
    up = PdserveUp(tmp_path, free_port(), "--nats-token", TOKEN)
    assert up.process.wait(timeout=30) == 2
    up.stop()
    assert "--nats-user/--nats-token/--nats-credentials-dir are for an external NATS" in up.output()


def assert_not_in_argv(pids, secret: str) -> None:
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                assert secret.encode() not in f.read(), f"process {pid} has the secret in its argv"
        except FileNotFoundError:
            pass


def assert_serves(up: PdserveUp) -> None:
    import httpx

    r = httpx.post(f"{up.base_url}/v1/completions", json={"model": MOCK_MODEL, "prompt": "Hi", "max_tokens": 3},
                   timeout=30)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3, r.text


# ------------------------------------------------------------------------------------------- TLS


def write_pki(tmp_path) -> dict[str, str]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all signed by the CA (PEM files)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def cert(subject: str, key, issuer: str, issuer_key, *, ca: bool = False, server: bool = False):
        builder = (x509.CertificateBuilder().subject_name(name(subject)).issuer_name(name(issuer))
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if server:
            builder = builder.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                                            critical=False)
        if not ca:
            usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
            builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    paths = {}

    def write(label: str, certificate, key) -> None:
        paths[f"{label}_cert"] = str(tmp_path / f"{label}.pem")
        (tmp_path / f"{label}.pem").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        paths[f"{label}_key"] = str(tmp_path / f"{label}-key.pem")
        (tmp_path / f"{label}-key.pem").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))

    ca_key, server_key, client_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    write("ca", cert("pdserve test CA", ca_key, "pdserve test CA", ca_key, ca=True), ca_key)
    write("server", cert("nats", server_key, "pdserve test CA", ca_key, server=True), server_key)
    write("client", cert("pdserve", client_key, "pdserve test CA", ca_key), client_key)
    return paths


def bus_options(url: str, **tls) -> cfg.BusOptions:
    return cfg.build(cfg.BusOptions, {"nats": url, "connect_timeout_s": "3", **tls}, env={})


async def test_tls_and_client_certificates(tmp_path):
    pki = write_pki(tmp_path)
    server = nats_server.start(store_dir=str(tmp_path / "nats"), auth=nats_server.ServerAuth(
        tls_cert=pki["server_cert"], tls_key=pki["server_key"], tls_ca=pki["ca_cert"]))  # verifies clients too
    try:
        with_cert = bus_options(server.url, nats_tls_ca=pki["ca_cert"], nats_tls_cert=pki["client_cert"],
                                nats_tls_key=pki["client_key"])
        bus = await Bus.connect_with(with_cert, "tls-client")
        await bus.close()
        with pytest.raises(BusError, match="--nats-tls-ca"):  # the system's CAs do not know ours
            await Bus.connect_with(bus_options(server.url), "no-ca")
        with pytest.raises(BusError):  # the server wants a client certificate
            await Bus.connect_with(bus_options(server.url, nats_tls_ca=pki["ca_cert"]), "no-client-cert")
    finally:
        server.stop()


def test_pdserve_up_over_tls(tmp_path):
    pki = write_pki(tmp_path)
    server = nats_server.start(store_dir=str(tmp_path / "nats"), die_with_parent=True, auth=nats_server.ServerAuth(
        user=USER, password=PASSWORD, tls_cert=pki["server_cert"], tls_key=pki["server_key"]))
    up = PdserveUp(tmp_path, free_port(), "--nats", server.url, "--nats-tls-ca", pki["ca_cert"],
                   "--nats-user", USER, env={"PDSERVE_NATS_PASSWORD": PASSWORD})
    try:
        with up.running(1, 1):
            assert_serves(up)
    finally:
        server.stop()


def test_tls_settings_are_checked_at_start(tmp_path):
    with pytest.raises(cfg.ConfigError, match="--nats-tls-key"):
        cfg.build(cfg.BusOptions, {"nats_tls_cert": str(tmp_path)}, env={})
    with pytest.raises(cfg.ConfigError, match="not a readable file"):
        cfg.build(cfg.BusOptions, {"nats_tls_ca": str(tmp_path / "missing.pem")}, env={})
    with pytest.raises(cfg.ConfigError, match="--nats-user"):
        cfg.build(cfg.BusOptions, {"nats_password": "x"}, env={})
    assert PASSWORD not in repr(cfg.build(cfg.BusOptions, {"nats_user": USER, "nats_password": PASSWORD}, env={}))


def test_nats_config_for_a_nats_users_run(tmp_path):
    """`pdserve nats-config` output included in a nats-server's own configuration; `pdserve up --nats URL
    --nats-credentials-dir` gives each service its role's identity; the observer can watch, not serve."""
    creds = tmp_path / "creds"
    done = subprocess.run([sys.executable, "-m", "pdserve.cli", "nats-config", "--out", str(creds)],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert "include nats-authorization.conf" in done.stdout
    again = subprocess.run([sys.executable, "-m", "pdserve.cli", "nats-config", "--out", str(creds)],
                           capture_output=True, text=True, timeout=30)
    assert again.returncode == 1 and "--force" in again.stderr  # never overwrites identities in use
    store = tmp_path / "nats"
    store.mkdir()
    shutil.copy(creds / "nats-authorization.conf", store / "nats-authorization.conf")
    server = nats_server.start(store_dir=str(store), die_with_parent=True,
                               authorization="include ./nats-authorization.conf\n")
    try:
        up = PdserveUp(tmp_path, free_port(), "--nats", server.url, "--nats-credentials-dir", str(creds))
        with up.running(1, 1):
            assert_serves(up)
            for role in ("router", "prefill", "decode", "broker", "observer"):
                assert_not_in_argv(up.children_seen, nats_auth.read_credentials_file(
                    str(creds / f"{role}.env"))[1])
        status = subprocess.run([sys.executable, "-m", "pdserve.cli", "status", "--nats", server.url,
                                 "--nats-credentials-file", str(creds / "observer.env"), "--listen-s", "0.2"],
                                capture_output=True, text=True, timeout=30)
        assert status.returncode == 0, status.stderr
    finally:
        server.stop()
