"""Fuzzing the router's OpenAI API from its own OpenAPI schema (schemathesis + hypothesis), against a real
`pdserve up --engine mock`: whatever a client sends, the answer is never a 5xx and never a hang, the router
does not crash, and a normal request is served afterwards.

Bounded: the mock decodes a token in 0.1 ms and serves a 256-token context (so max_tokens cannot make a
request long), each request has a 10 s client timeout, and each operation gets at most 50 examples of data
that fits the schema and 40 that does not (half of them with the served model's name, so generation is
reached and not only the 404 of an unknown model).
"""

from __future__ import annotations


import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from pdserve.config import MOCK_MODEL
from tests.e2e.conftest import PdserveUp, free_port, get_json

pytestmark = pytest.mark.e2e

MAX_EXAMPLES = 50
REQUEST_TIMEOUT_S = 10


@pytest.fixture(scope="module")
def system(tmp_path_factory):
    up = PdserveUp(tmp_path_factory.mktemp("fuzz"), free_port(), "--log-level", "WARNING",
                   env={"PDSERVE_MOCK_MS_PER_DECODE_STEP": "0.1", "PDSERVE_MAX_MODEL_LEN": "256",
                        "PDSERVE_REQUEST_TIMEOUT_S": "30"})
    with up.running(1, 1):
        yield up


def with_served_model(case, use_model: bool):
    """Half the bodies name the served model, so requests get past the model lookup into generation."""
    if use_model and isinstance(case.body, dict) and "model" in case.body:
        case.body["model"] = MOCK_MODEL
    return case


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_input_makes_the_router_fail(system, mode):
    schema = schemathesis.openapi.from_url(f"{system.base_url}/openapi.json")
    failures: list[str] = []
    statuses: list[int] = []
    session = httpx.Client(base_url=system.base_url, timeout=REQUEST_TIMEOUT_S)

    for operation in schema.get_all_operations():
        op = operation.ok()

        @settings(max_examples=MAX_EXAMPLES, deadline=None, phases=[Phase.generate], database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=op.as_strategy(generation_mode=mode), use_model=st.booleans())
        def call(case, use_model):
            case = with_served_model(case, use_model)
            kwargs = case.as_transport_kwargs(base_url=system.base_url)
            try:
                r = session.request(kwargs["method"], kwargs["url"], headers=kwargs.get("headers"),
                                    params=kwargs.get("params"), json=kwargs.get("json"),
                                    content=kwargs.get("data"))
            except httpx.TimeoutException:
                failures.append(f"{op.method.upper()} {op.path}: no answer within {REQUEST_TIMEOUT_S}s: {case.body!r:.300}")
                return
            statuses.append(r.status_code)
            if r.status_code >= 500:
                failures.append(f"{op.method.upper()} {op.path} -> {r.status_code} {r.text[:300]} for {case.body!r:.300}")
            if r.status_code >= 400 and r.headers.get("content-type", "").startswith("application/json"):
                error = r.json().get("error")
                if not isinstance(error, dict) or set(error) != {"message", "type", "param", "code"}:
                    failures.append(f"{op.path}: not OpenAI's error shape: {r.text[:300]}")
                if "Traceback" in r.text:
                    failures.append(f"{op.path}: traceback in the body: {r.text[:300]}")

        try:
            call()
        except Unsatisfiable:
            # Only in negative mode: an operation without parameters or body (GET /health) cannot be sent invalid.
            assert mode == GenerationMode.NEGATIVE, op.path
    session.close()
    assert not failures, "\n".join(failures[:10])
    print(f"{mode}: {len(statuses)} requests, statuses {sorted(set(statuses))}")
    assert len(statuses) >= MAX_EXAMPLES  # the fuzzer really sent requests
    if mode == GenerationMode.POSITIVE:
        assert 200 in statuses  # and some of them were served, not all refused

    # The router survived and still serves a normal request; every service is still announced.
    assert system.process.poll() is None and "exited with status" not in system.output()
    r = httpx.post(f"{system.base_url}/v1/chat/completions", timeout=REQUEST_TIMEOUT_S,
                   json={"model": MOCK_MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5, r.text
    status, health = get_json(f"{system.base_url}/health")
    assert status == 200 and sorted(w["role"] for w in health["workers"]) == ["decode", "prefill"]
