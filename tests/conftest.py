"""Shared fixtures: a real nats-server on a free port (JetStream on, temp store), free TCP ports."""

from __future__ import annotations

import socket

import pytest

from pdserve import nats_server


@pytest.fixture
def nats(tmp_path):
    """A real nats-server for one test; yields it (url, port, stop())."""
    server = nats_server.start(store_dir=str(tmp_path / "nats"), die_with_parent=True)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
