"""What every service process shares: logging set-up and a shutdown event set by SIGTERM / SIGINT."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from typing import Awaitable, Callable

log = logging.getLogger(__name__)


def setup_logging(level: str, service: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format=f"%(asctime)s %(levelname)s {service}[%(process)d] %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )
    # nats-py logs every reconnect attempt at ERROR; our callbacks already say what happens.
    logging.getLogger("nats.aio.client").setLevel(logging.CRITICAL)


_stop_asked = False  # a SIGTERM / SIGINT came (run() reads it when start-up fails)


def shutdown_event() -> asyncio.Event:
    """An event set on SIGTERM or SIGINT: services finish what they are doing and leave cleanly."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        global _stop_asked
        _stop_asked = True
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    return stop


class StartupError(Exception):
    """A service cannot start as configured (an address this host cannot bind, say); the message is one line that
    names the flag to change or the fix, and is all the operator sees of it."""


def run(main: Callable[[], Awaitable[None]]) -> int:
    """Runs a service to its end; exit status 1, with one line that names the fix, when NATS cannot be used or the
    service cannot start as configured."""
    from pdserve.bus import BusError

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
    except (BusError, StartupError) as e:  # NATS unreachable, credentials, TLS, addresses: the message says the fix
        if _stop_asked:  # told to stop while still starting (a wait on NATS that went away ended it): as asked
            log.info("stopped while starting (%s)", e)
            return 0
        log.error("%s", e)
        return 1
    return 0
