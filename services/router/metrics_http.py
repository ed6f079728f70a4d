"""The router's /metrics endpoint and the HTTP response counter around the app.

The counter is plain ASGI (not Starlette's BaseHTTPMiddleware, which would move streaming responses into
another task and break the API layer's own disconnect handling).
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.requests import Request
from starlette.responses import Response

from pdserve.metrics import RouterMetrics


def metrics_endpoint(registry: CollectorRegistry):
    async def metrics(_: Request) -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return metrics


def count_responses(app, metrics: RouterMetrics):
    async def counted(scope, receive, send):
        if scope["type"] != "http":
            return await app(scope, receive, send)

        async def send_counting(message):
            if message["type"] == "http.response.start":
                metrics.http_responses.labels(code=str(message["status"])).inc()
            await send(message)

        await app(scope, receive, send_counting)

    return counted
