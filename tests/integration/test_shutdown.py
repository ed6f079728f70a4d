"""A service stops cleanly on SIGTERM even when NATS went away first (no hang, no traceback)."""

import signal
import time

import pytest

from tests.e2e.conftest import Service


READY = {"prefill-worker": "KV transfer endpoint", "decode-worker": "KV transfer endpoint",
         "kv-broker": "KV broker", "router": "OpenAI API on"}


@pytest.mark.parametrize("role", list(READY))
def test_sigterm_after_nats_is_gone_exits_cleanly(nats, tmp_path, role, free_port):
    extra = ["--port", str(free_port)] if role == "router" else []
    service = Service([role, "--nats", nats.url, *extra], str(tmp_path / f"{role}.log"))
    try:
        deadline = time.monotonic() + 60
        while READY[role] not in service.output():
            assert service.process.poll() is None and time.monotonic() < deadline, service.output()
            time.sleep(0.2)
        nats.stop()
        time.sleep(1.0)
        start = time.monotonic()
        service.process.send_signal(signal.SIGTERM)
        service.process.wait(timeout=30)
        assert service.process.returncode == 0, service.output()[-2000:]
        assert time.monotonic() - start < 15
        assert "Traceback" not in service.output()
    finally:
        if service.process.poll() is None:
            service.process.kill()
            service.process.wait()
        service.log.close()
