"""The compose test's stand-in for Jaeger: an OTLP/HTTP receiver that records spans and shows them as JSON.

Jaeger's image cannot be pulled here, so the compose test runs this instead under the same service name
(`jaeger`, port 4318), in an image made from Debian packages. It takes what every pdserve service exports
(`POST /v1/traces`, OTLP protobuf, as OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf sends it) and answers
`GET /spans` with [{"trace_id", "span_id", "name", "service"}, ...]. Standard library only: the protobuf wire
format is read field by field (only the fields named below; the rest is skipped as the format allows).
"""

from __future__ import annotations

import gzip
import json
import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# Field numbers from opentelemetry/proto (trace/v1/trace.proto, resource/v1, common/v1).
REQUEST_RESOURCE_SPANS = 1  # ExportTraceServiceRequest.resource_spans
RESOURCE_SPANS_RESOURCE, RESOURCE_SPANS_SCOPE_SPANS = 1, 2
RESOURCE_ATTRIBUTES = 1
SCOPE_SPANS_SPANS = 2
SPAN_TRACE_ID, SPAN_SPAN_ID, SPAN_NAME = 1, 2, 5
KEY_VALUE_KEY, KEY_VALUE_VALUE = 1, 2
ANY_VALUE_STRING = 1

_spans: list[dict] = []
_lock = threading.Lock()


def _varint(data: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, i
        shift += 7


def fields(data: bytes):
    """(field number, value) of one protobuf message: bytes for length-delimited fields, ints otherwise."""
    i = 0
    while i < len(data):
        key, i = _varint(data, i)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, i = _varint(data, i)
        elif wire_type == 1:
            value, i = int.from_bytes(data[i:i + 8], "little"), i + 8
        elif wire_type == 2:
            length, i = _varint(data, i)
            value, i = data[i:i + length], i + length
        elif wire_type == 5:
            value, i = int.from_bytes(data[i:i + 4], "little"), i + 4
        else:
            raise ValueError(f"protobuf wire type {wire_type} is not used by OTLP")
        yield number, value


def _attribute(key_value: bytes) -> tuple[str, str]:
    key, value = "", ""
    for number, field in fields(key_value):
        if number == KEY_VALUE_KEY:
            key = field.decode()
        elif number == KEY_VALUE_VALUE:
            value = next((v.decode() for n, v in fields(field) if n == ANY_VALUE_STRING), "")
    return key, value


def spans_of(request: bytes) -> list[dict]:
    """The spans of an ExportTraceServiceRequest, each with its resource's service.name."""
    found = []
    for number, resource_spans in fields(request):
        if number != REQUEST_RESOURCE_SPANS:
            continue
        service, scope_spans = "", []
        for n, value in fields(resource_spans):
            if n == RESOURCE_SPANS_RESOURCE:
                attributes = dict(_attribute(kv) for a, kv in fields(value) if a == RESOURCE_ATTRIBUTES)
                service = attributes.get("service.name", "")
            elif n == RESOURCE_SPANS_SCOPE_SPANS:
                scope_spans.append(value)
        for scope in scope_spans:
            for n, span in fields(scope):
                if n != SCOPE_SPANS_SPANS:
                    continue
                record = {"service": service}
                for f, value in fields(span):
                    if f == SPAN_TRACE_ID:
                        record["trace_id"] = value.hex()
                    elif f == SPAN_SPAN_ID:
                        record["span_id"] = value.hex()
                    elif f == SPAN_NAME:
                        record["name"] = value.decode()
                found.append(record)
    return found


class Handler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        if self.path != "/v1/traces":
            self.send_error(404)
            return
        try:
            spans = spans_of(body)
        except (ValueError, IndexError, UnicodeDecodeError) as e:
            self.send_error(400, f"not an OTLP protobuf trace request: {e}")
            return
        with _lock:
            _spans.extend(spans)
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self) -> None:  # noqa: N802
        if self.path not in ("/spans", "/healthz"):
            self.send_error(404)
            return
        with _lock:
            body = json.dumps(_spans if self.path == "/spans" else {"ok": True}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:  # noqa: A002
        pass  # one line per export batch would drown the compose log


if __name__ == "__main__":
    # PID 1 in its container: without a handler SIGTERM is ignored, and `docker compose down` waits its whole
    # grace period before it kills.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 4318
    print(f"OTLP recorder (the compose test's stand-in for Jaeger) on :{port}", flush=True)
    ThreadingHTTPServer(("0.0.0.0", port), Handler).serve_forever()
