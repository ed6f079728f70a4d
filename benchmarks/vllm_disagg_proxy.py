"""vLLM's own disaggregation, the way its examples drive it: a proxy in front of two vLLM servers.

Both servers run vLLM's built-in `ExampleConnector` (KV saved to and loaded from a shared directory as
safetensors files, one per layer). For each completion request the proxy first sends the prompt to the
producer with max_tokens=1 (prefill; the connector saves the KV), then forwards the original request to the
consumer (the connector finds the saved KV and loads it instead of recomputing) and streams its answer back.
This mirrors vLLM's disaggregated-prefill example proxy; it is a benchmark baseline, not part of pdserve.

    python benchmarks/vllm_disagg_proxy.py --port 8100 --producer http://127.0.0.1:8101 --consumer http://127.0.0.1:8102
"""

from __future__ import annotations

import argparse

import httpx
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse


def create_app(producer: str, consumer: str, timeout_s: float) -> FastAPI:
    app = FastAPI()
    client = httpx.AsyncClient(timeout=timeout_s, limits=httpx.Limits(max_connections=256))

    @app.get("/health")
    async def health() -> Response:
        for base in (producer, consumer):
            try:
                r = await client.get(f"{base}/health", timeout=2)
            except httpx.HTTPError as e:  # still starting
                return JSONResponse({"status": f"{base}: {type(e).__name__}"}, status_code=503)
            if r.status_code != 200:
                return JSONResponse({"status": f"{base} answers {r.status_code}"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/v1/models")
    async def models() -> Response:
        r = await client.get(f"{consumer}/v1/models")
        return Response(r.content, status_code=r.status_code, media_type="application/json")

    async def disaggregated(request: Request, path: str) -> Response:
        body = await request.json()
        prefill = {**body, "max_tokens": 1, "stream": False}
        prefill.pop("stream_options", None)
        prefill.pop("max_completion_tokens", None)
        r = await client.post(f"{producer}{path}", json=prefill)
        if r.status_code != 200:
            return Response(r.content, status_code=r.status_code, media_type="application/json")
        if not body.get("stream"):
            r = await client.post(f"{consumer}{path}", json=body)
            return Response(r.content, status_code=r.status_code, media_type="application/json")
        upstream = await client.send(client.build_request("POST", f"{consumer}{path}", json=body), stream=True)

        async def relay():
            try:
                async for chunk in upstream.aiter_raw():
                    yield chunk
            finally:
                await upstream.aclose()

        return StreamingResponse(relay(), status_code=upstream.status_code, media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await disaggregated(request, "/v1/completions")

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await disaggregated(request, "/v1/chat/completions")

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--producer", required=True, help="base URL of the prefill (KV producer) vLLM server")
    parser.add_argument("--consumer", required=True, help="base URL of the decode (KV consumer) vLLM server")
    parser.add_argument("--timeout-s", type=float, default=600.0)
    args = parser.parse_args()
    uvicorn.run(create_app(args.producer, args.consumer, args.timeout_s), host=args.host, port=args.port,
                log_level="warning")


if __name__ == "__main__":
    main()
