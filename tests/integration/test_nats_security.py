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
import time

import nats
import pytest

from pdserve import config as cfg
from pdserve import nats_server
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


def test_pdserve_up_own_nats_asks_for_the_token(tmp_path):
    up = PdserveUp(tmp_path, free_port(), "--nats-token", TOKEN)
    with up.running(1, 1):
        assert_serves(up)
        url = re.search(r"NATS at (nats://\S+);", up.output()).group(1)

        async def anonymous() -> None:
            with pytest.raises(Exception):
                nc = await nats.connect(url, allow_reconnect=False, connect_timeout=2)
                await nc.close()

        asyncio.run(anonymous())
        # `pdserve up` itself has what the user typed; its children get the env
        assert_not_in_argv(up.children_seen, TOKEN)


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
