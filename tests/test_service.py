"""pdserve.service.run: the exit status of a service whose start-up fails, with and without a SIGTERM first."""

import asyncio
import os
import signal

import pytest

from pdserve import service
from pdserve.bus import BusError


@pytest.fixture(autouse=True)
def fresh_flag(monkeypatch):
    monkeypatch.setattr(service, "_stop_asked", False, raising=False)


async def start_up_that_fails(*, sigterm_first: bool) -> None:
    stop = service.shutdown_event()
    if sigterm_first:
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(stop.wait(), timeout=5)
    raise BusError("test: NATS send buffer did not drain within 5s; is NATS reachable?")


def test_start_up_that_fails_on_nats_exits_1_naming_the_fix():
    assert service.run(lambda: start_up_that_fails(sigterm_first=False)) == 1


def test_a_sigterm_during_start_up_ends_it_with_status_0_even_if_the_wait_it_ended_fails():
    """A service told to stop while still subscribing to a NATS that went away: stopping was asked for, so 0
    (tests/integration/test_shutdown.py met this when NATS stopped between a worker's ready line and its last
    subscriptions)."""
    assert service.run(lambda: start_up_that_fails(sigterm_first=True)) == 0
