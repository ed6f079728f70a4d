"""run_bench: sends the workload to the endpoint in a closed loop (fixed concurrency) or an open loop
(Poisson arrivals) and returns the result dict. No printing and no files: the CLI does those."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime, timezone
from typing import Any, Awaitable, Callable, Iterator

import httpx
import numpy as np

from pdserve.bench.client import RequestResult, request_body, send_request
from pdserve.bench.config import BenchConfig
from pdserve.bench.report import build_result
from pdserve.bench.workload import ARRIVALS, WorkItem, build_workload, rng_for

OnRequestDone = Callable[[RequestResult], None]
Send = Callable[[WorkItem], Awaitable[RequestResult]]
MODELS_TIMEOUT_S = 30.0  # listing models is instant on a live server; do not wait a generation's deadline


class BenchError(Exception):
    """The run could not start (endpoint unreachable, no model to benchmark, tokenizer not found)."""


def arrival_times(seed: int, num_requests: int, rate: float) -> list[float]:
    """Seconds after the start at which each request is sent: a Poisson process (exponential gaps)."""
    gaps = rng_for(seed, ARRIVALS).exponential(1.0 / rate, size=num_requests)
    gaps[0] = 0.0  # the first request goes at once; a run should not open with idle time
    return [float(t) for t in np.cumsum(gaps)]


async def discover_model(http: httpx.AsyncClient, base_url: str, timeout_s: float) -> str:
    """The first model id the endpoint lists at GET /v1/models."""
    url = f"{base_url}/v1/models"
    try:
        response = await asyncio.wait_for(http.get(url), timeout_s)
        response.raise_for_status()
        models = response.json().get("data") or []
    except (httpx.HTTPError, TimeoutError, ValueError, AttributeError) as e:
        raise BenchError(f"cannot list the models at {url} ({type(e).__name__}: {e}); "
                         "is the server up? or pass --model") from e
    if not models or not models[0].get("id"):
        raise BenchError(f"{url} lists no model: start a worker, or pass --model")
    return str(models[0]["id"])


async def run_bench(config: BenchConfig, *, on_request_done: OnRequestDone | None = None) -> dict[str, Any]:
    """Runs the benchmark described by `config`; returns the result dict (schema "pdserve.bench/1").

    Failed requests are part of the result, never an exception. BenchError: the run could not start.
    `on_request_done` is called with each finished request (the CLI's progress bar).
    """
    try:
        workload = await asyncio.to_thread(build_workload, config)  # a tokenizer loads for seconds
    except ValueError as e:
        raise BenchError(str(e)) from e
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    # Connections are opened as needed; an open loop may hold as many as it has requests in flight.
    limits = httpx.Limits(max_connections=config.concurrency, max_keepalive_connections=config.concurrency)
    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=httpx.Timeout(config.timeout_s)) as http:
        model = config.model or await discover_model(http, config.base_url, min(config.timeout_s, MODELS_TIMEOUT_S))
        path = "/v1/chat/completions" if config.api == "chat" else "/v1/completions"
        url = config.base_url + path
        bodies = {item.index: request_body(item, config.api, model, config.ignore_eos) for item in workload}
        started_at = datetime.now(timezone.utc).isoformat()
        clock_zero = time.perf_counter()

        async def send(item: WorkItem) -> RequestResult:
            result = await send_request(http, url, bodies[item.index], item, config.timeout_s, clock_zero)
            if on_request_done is not None:
                on_request_done(result)
            return result

        if config.rate is None:
            results = await _closed_loop(workload, config.concurrency or 1, send)
        else:
            results = await _open_loop(workload, arrival_times(config.seed, len(workload), config.rate),
                                       config.concurrency, send, clock_zero)
        duration_s = time.perf_counter() - clock_zero
    return build_result(config, model, started_at, duration_s, results)


async def _closed_loop(workload: list[WorkItem], concurrency: int, send: Send) -> list[RequestResult]:
    """`concurrency` senders take the next request as soon as their last one finished."""
    results: list[RequestResult] = []
    pending: Iterator[WorkItem] = iter(workload)

    async def sender() -> None:
        for item in pending:  # one shared iterator: each item goes to exactly one sender
            results.append(await send(item))

    async with asyncio.TaskGroup() as group:
        for _ in range(min(concurrency, len(workload))):
            group.create_task(sender())
    return results


async def _open_loop(workload: list[WorkItem], arrivals: list[float], max_in_flight: int | None, send: Send,
                     clock_zero: float) -> list[RequestResult]:
    """Each request is sent at its arrival time whatever the server does; with `max_in_flight`, an arrival
    waits for a free slot (and its latency is timed from when it is actually sent)."""
    slots = asyncio.Semaphore(max_in_flight) if max_in_flight else None

    async def one(item: WorkItem) -> RequestResult:
        if slots is None:
            return await send(item)
        async with slots:
            return await send(item)

    tasks: list[asyncio.Task[RequestResult]] = []
    try:
        for item, at in zip(workload, arrivals):
            delay = clock_zero + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(item)))
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()  # only matters when we were cancelled: finished tasks ignore it
