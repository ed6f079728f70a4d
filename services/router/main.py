"""Router: the OpenAI HTTP API in front of the prefill and decode workers.

Life: config -> tracing (when an OTLP endpoint is set) -> NATS -> membership view (heartbeats) ->
orchestrator -> FastAPI app under uvicorn on --host/--port (the only fixed port besides NATS'; 0 picks a
free one) -> SIGTERM (uvicorn stops taking requests, in-flight ones finish) -> drain NATS -> flush spans.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
from typing import Iterator

import uvicorn
from prometheus_client import CollectorRegistry

from pdserve import netaddr
from pdserve.bus import Bus
from pdserve.config import RouterConfig
from pdserve.membership import Membership
from pdserve.metrics import RouterMetrics
from pdserve.service import StartupError, shutdown_event
from pdserve.tracing import setup_tracing, shutdown_tracing
from services.router.api import create_app
from services.router.auth import ApiKeys
from services.router.http_limits import limited_http_protocol
from services.router.metrics_http import count_responses, metrics_endpoint
from services.router.orchestrator import Orchestrator
from services.router.trace_http import trace_requests

log = logging.getLogger(__name__)


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: after a graceful stop it re-raises SIGTERM, which would end
    the process before NATS is drained. SIGTERM / SIGINT set our shutdown event instead."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def serve(config: RouterConfig) -> None:
    tracing_on = setup_tracing("router")
    try:
        await _serve(config, tracing_on)
    finally:
        shutdown_tracing()  # after the last request's spans ended


def check_listen_address(host: str, port: int) -> None:
    """StartupError, one line naming the flag, when the HTTP server could not listen on host:port (uvicorn would
    end in a traceback); checked before NATS, so nothing else is started for nothing."""
    problem = netaddr.bind_problem(host)
    if problem is not None:
        raise StartupError(f"--host {host} {problem}; pass one of this host's addresses, 127.0.0.1 (this machine "
                           "only) or 0.0.0.0 (every interface)")
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise StartupError(f"--port {port} on {host} is taken by another process; pass another --port (0: "
                                   "any free one) or stop what listens there") from e
            raise StartupError(f"--port {port} on {host} cannot be bound ({e.strerror or e}); pass another --port") from e


async def _serve(config: RouterConfig, tracing_on: bool) -> None:
    stop = shutdown_event()
    check_listen_address(config.host, config.port)
    bus = await Bus.connect_with(config, config.router_id)
    membership = Membership()
    try:
        await membership.start(bus)
        registry = CollectorRegistry()
        orchestrator = Orchestrator(config, bus, membership, RouterMetrics(registry))
        await orchestrator.start()
        keys = config.api_key_set
        app = create_app(orchestrator, request_timeout_s=config.request_timeout_s, max_body_bytes=config.max_body_bytes,
                         max_inflight=config.max_inflight, api_keys=ApiKeys(keys) if keys else None)
        app.add_route("/metrics", metrics_endpoint(registry), include_in_schema=False)
        traced = trace_requests(app) if tracing_on else app  # off: the client's traceparent still travels
        counted = count_responses(traced, orchestrator.metrics)
        http = limited_http_protocol(header_timeout_s=config.header_timeout_s, max_header_bytes=config.max_header_bytes)
        server = _Server(uvicorn.Config(counted, host=config.host, port=config.port, log_config=None, http=http,
                                        access_log=False, timeout_graceful_shutdown=10))
        serving = asyncio.create_task(server.serve())
        while not server.started and not serving.done():
            await asyncio.sleep(0.05)
        if server.started:
            port = server.servers[0].sockets[0].getsockname()[1]
            host = "127.0.0.1" if config.host in ("0.0.0.0", "::") else config.host
            log.info("router %s: OpenAI API on http://%s:%d/v1", config.router_id, host, port)
            if keys:
                log.info("router %s: /v1 requires one of %d API key(s) (Authorization: Bearer)", config.router_id,
                         len(keys))
            if not netaddr.is_loopback(config.host):
                if keys:
                    log.info("router listens on %s, reachable from other machines", config.host)
                else:
                    log.warning("router listens on %s, reachable from other machines, without API keys: anyone who "
                                "reaches it can use it; set --api-keys-file or PDSERVE_API_KEYS", config.host)
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
        server.should_exit = True  # stop taking requests; uvicorn lets those in flight finish
        await serving
        stopping.cancel()
    finally:
        await membership.stop()
        await bus.close()
