"""Router: the OpenAI HTTP API in front of the prefill and decode workers.

Life: config -> tracing (when an OTLP endpoint is set) -> NATS -> membership view (heartbeats) ->
orchestrator -> FastAPI app under uvicorn on --host/--port (the only fixed port besides NATS'; 0 picks a
free one) -> SIGTERM (uvicorn stops taking requests, in-flight ones finish) -> drain NATS -> flush spans.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Iterator

import uvicorn
from prometheus_client import CollectorRegistry

from pdserve import netaddr
from pdserve.bus import Bus
from pdserve.config import RouterConfig
from pdserve.membership import Membership
from pdserve.metrics import RouterMetrics
from pdserve.service import shutdown_event
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


async def _serve(config: RouterConfig, tracing_on: bool) -> None:
    stop = shutdown_event()
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
