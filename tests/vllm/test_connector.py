"""pdserve's vLLM KV connector with two real vLLM engines and the real model.

A prefill engine (blocks held by reference count, the default) and a decode engine (holding, when asked to,
with vLLM's delay_free instead), each pinned to its own core. Prefill runs the prompt with max_tokens=1 and
kv_transfer_params {"do_remote_decode": True}; decode gets the prompt plus the first token and
{"do_remote_prefill": True, "pdserve": <KVTransferParams>}, pulls the KV and decodes. Greedy fp32 decoding
must give exactly the tokens one engine gives alone, whether the KV arrived or was recomputed after a
failed, corrupted, refused or mismatched load; and nothing stays allocated afterwards.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time

import pytest

from pdserve.protocol import KVLayout, KVTransferParams
from tests.kv.ucx import UCX_TCP
from tests.vllm.conftest import BLOCK_SIZE, MODEL_DIR, skip_reason

pytestmark = [pytest.mark.vllm, pytest.mark.skipif(skip_reason() is not None, reason=str(skip_reason()))]

LEASE_S = 8.0
PULL_TIMEOUT_S = 2.0
MAX_TOKENS = 12
PROMPT_LENGTHS = (5, 31, 32, 33, 64, 150)  # under, at and over block boundaries; 150 spans 5 blocks
TEXT = (
    "The history of the river town begins in the early medieval period, when a handful of farmers settled "
    "on the dry ground above a ford. Over the following centuries a market grew around the crossing, then a "
    "stone bridge, a church with a square tower, two mills and a guild hall where wool merchants met every "
    "Thursday. In the eighteenth century a canal linked the town to the coast, and barges carried grain, coal "
    "and pottery in both directions. The railway arrived in 1847 and the canal slowly fell silent; today its "
    "towpath is a footpath lined with willows, and the old warehouses hold studios, a brewery and a small museum "
    "that tells the story of the families who worked the locks for five generations."
)


def blocks_for(num_tokens: int) -> int:
    return -(-num_tokens // BLOCK_SIZE)


# ------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def stats_path(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("kv-stats") / "prefill-0.json")


@pytest.fixture(scope="module")
def load_reports(vllm_harness):
    """The decode engine's pushed load reports, read on the engines' loop as the pdserve worker reads them."""
    from pdserve.kv.vllm_reports import LoadReports, report_endpoint

    reports = LoadReports(report_endpoint(f"test-decode-{os.getpid()}"))

    async def start():
        reports.start()

    vllm_harness.run(start())
    try:
        yield reports
    finally:
        vllm_harness.run(reports.stop())


@pytest.fixture(scope="module")
def engines(vllm_harness, stats_path, load_reports):
    cores = ("0", "1") if (os.cpu_count() or 1) >= 2 else ("0", "0")
    # nixl between the engines over UCX's TCP transport, as between hosts without RDMA NICs (the processes copy the
    # environment when they are spawned). On one host UCX would take shared memory, whose READs the reader does
    # alone: a frozen prefill could not hold one up.
    saved_tls = os.environ.get("UCX_TLS")
    os.environ["UCX_TLS"] = UCX_TCP
    try:
        prefill, decode = vllm_harness.start_engines([
            dict(name="prefill-0", cores=cores[0], extra={"lease_s": LEASE_S, "hold_blocks": "refcount",
                                                         "stats_path": stats_path, "offer_nixl": True}),
            dict(name="decode-0", cores=cores[1], extra={"lease_s": LEASE_S, "hold_blocks": "delay_free",
                                                        "pull_timeout_s": PULL_TIMEOUT_S,
                                                        "reports_endpoint": load_reports.endpoint}),
        ])
    finally:
        if saved_tls is None:
            os.environ.pop("UCX_TLS", None)
        else:
            os.environ["UCX_TLS"] = saved_tls
    try:
        yield prefill, decode
    finally:
        vllm_harness.stop_engines([prefill, decode])


@pytest.fixture(scope="module")
def prompts() -> dict[int, list[int]]:
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(str(MODEL_DIR))(TEXT + " " + TEXT)["input_ids"]
    assert len(ids) > max(PROMPT_LENGTHS) + len(PROMPT_LENGTHS)
    # Different prompts, not prefixes of each other: each starts further into the text.
    return {n: ids[k:k + n] for k, n in enumerate(PROMPT_LENGTHS)}


@pytest.fixture(scope="module")
def references(vllm_harness, engines, prompts) -> dict[int, list[int]]:
    """What one engine alone generates for each prompt (greedy, fp32)."""
    _, decode = engines
    return {n: vllm_harness.run(generate(decode, f"ref-{n}", ids, MAX_TOKENS)) for n, ids in prompts.items()}


@pytest.fixture(scope="module")
def layout() -> KVLayout:
    config = json.loads((MODEL_DIR / "config.json").read_text())
    return KVLayout(num_layers=config["num_hidden_layers"], num_kv_heads=config["num_key_value_heads"],
                    head_dim=config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"],
                    dtype="float32", dtype_bytes=4, block_size=BLOCK_SIZE)


# -------------------------------------------------------------------------------------------- helpers


def sampling(max_tokens: int, kv_transfer_params: dict | None = None, **kwargs):
    from vllm import SamplingParams

    extra = {"kv_transfer_params": kv_transfer_params} if kv_transfer_params else None
    kwargs.setdefault("ignore_eos", True)
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, extra_args=extra, **kwargs)


async def generate_output(engine, request_id: str, ids: list[int], max_tokens: int, kv_transfer_params=None, **kwargs):
    final = None
    async for out in engine.llm.generate({"prompt_token_ids": list(ids)}, sampling(max_tokens, kv_transfer_params, **kwargs),
                                         request_id=request_id):
        final = out
    return final


async def generate(engine, request_id: str, ids: list[int], max_tokens: int, kv_transfer_params=None) -> list[int]:
    out = await generate_output(engine, request_id, ids, max_tokens, kv_transfer_params)
    return list(out.outputs[0].token_ids)


async def rpc(engine, method: str, *args):
    (result,) = await engine.llm.collective_rpc(method, args=args)
    return result


async def prefill(engine, request_id: str, ids: list[int]) -> tuple[int, KVTransferParams]:
    out = await generate_output(engine, request_id, ids, 1, {"do_remote_decode": True})
    assert out.kv_transfer_params and "pdserve" in out.kv_transfer_params, out.kv_transfer_params
    return out.outputs[0].token_ids[0], KVTransferParams.model_validate(out.kv_transfer_params["pdserve"])


async def decode(engine, request_id: str, ids: list[int], first: int, params: KVTransferParams | dict) -> list[int]:
    wire = params.model_dump(mode="json") if isinstance(params, KVTransferParams) else params
    tokens = await generate(engine, request_id, list(ids) + [first], MAX_TOKENS - 1,
                            {"do_remote_prefill": True, "pdserve": wire})
    return [first] + tokens


async def kv_usage_now(engine, tag: str) -> float:
    """vLLM's own KV cache usage, as its scheduler reports it after two small requests (the first step of an
    idle engine is where blocks released meanwhile go back to vLLM's pool)."""
    for i in range(2):
        await generate(engine, f"probe-{tag}-{i}", [1, 2, 3], 1)
    await asyncio.sleep(0.2)  # AsyncLLM records a step's stats after it has handed out the step's outputs
    return engine.kv_usage[-1]


async def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.05)


def engine_core_process(worker_address: str):
    """The EngineCore process (psutil.Process) of the engine whose worker listens on `worker_address`."""
    import psutil  # comes with vLLM; the base install has neither

    port = int(worker_address.rsplit(":", 1)[1])
    for child in psutil.Process().children(recursive=True):
        try:
            if any(c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN for c in child.net_connections("tcp")):
                return child.parent()
        except psutil.Error:
            continue
    raise AssertionError(f"no child process listens on {worker_address}")


# ---------------------------------------------------------------------------------------------- tests


def test_engines_run_pinned_to_their_own_cores(vllm_harness, engines):
    if (os.cpu_count() or 1) < 2:
        pytest.skip("one core: nothing to pin apart")
    affinities = []
    for engine in engines:
        address = vllm_harness.run(rpc(engine, "pdserve_transfer_address"))
        worker = [c for c in engine_core_process(address).children() if "Worker" in c.name()]
        assert len(worker) == 1, [c.name() for c in engine_core_process(address).children()]
        affinities.append(worker[0].cpu_affinity())
    assert affinities == [[0], [1]]


def test_decode_after_transfer_gives_the_tokens_of_one_engine(vllm_harness, engines, prompts, references, layout,
                                                              stats_path, load_reports):
    """Also: each load's report is pushed (what the pdserve worker uses, off the token stream) and says what
    the connector's own record says."""
    prefill_engine, decode_engine = engines

    async def scenario():
        sent_before = (await rpc(prefill_engine, "pdserve_stats"))["num_kv_blocks_sent"]
        before = await rpc(decode_engine, "pdserve_stats")
        results = {}
        for n, ids in prompts.items():
            first, params = await prefill(prefill_engine, f"t1-p{n}", ids)
            assert params.num_tokens == n and len(params.block_ids) == blocks_for(n)
            assert params.kv_layout == layout and params.worker_id == "prefill-0"
            assert params.lease_expires_at > time.time()
            pushed = load_reports.expect(f"t1-d{n}")
            tokens = await decode(decode_engine, f"t1-d{n}", ids, first, params)
            pushed = await load_reports.wait(f"t1-d{n}", pushed, 5.0)
            report = await rpc(decode_engine, "pdserve_load_report", f"t1-d{n}")
            released = await rpc(prefill_engine, "pdserve_release", f"t1-p{n}")
            results[n] = tokens, report, released, pushed
        return sent_before, before, results, await rpc(prefill_engine, "pdserve_stats"), await rpc(decode_engine, "pdserve_stats")

    sent_before, before, results, prefill_stats, decode_stats = vllm_harness.run(scenario())
    for n, (tokens, report, released, pushed) in results.items():
        assert tokens == references[n], f"prompt of {n} tokens"
        assert report["recomputed"] is False and report["error"] is None, report
        assert pushed == report, f"prompt of {n} tokens: pushed {pushed}, recorded {report}"
        assert report["num_blocks"] == blocks_for(n) and report["num_bytes"] == blocks_for(n) * layout.bytes_per_block
        assert released is True
    num_blocks = sum(blocks_for(n) for n in prompts)
    assert decode_stats["num_kv_blocks_received"] - before["num_kv_blocks_received"] == num_blocks
    assert decode_stats["num_kv_bytes_received"] - before["num_kv_bytes_received"] == num_blocks * layout.bytes_per_block
    assert decode_stats["num_recomputes"] == before["num_recomputes"]
    assert prefill_stats["num_kv_blocks_sent"] - sent_before == num_blocks
    assert prefill_stats["num_held_blocks"] == 0

    # The same counters, published to a file for readers that must not wake vLLM's worker.
    from pdserve.kv.connector_stats import read_published_stats

    async def published():
        on_file = read_published_stats(stats_path) or {}
        return {k: on_file.get(k) for k in prefill_stats} == prefill_stats
    vllm_harness.run(wait_for(published, 3, f"the stats file to show {prefill_stats}"))
    assert time.time() - read_published_stats(stats_path)["published_at"] < 10


def test_a_pull_over_nixl_gives_the_tokens_of_one_engine(vllm_harness, engines, prompts, references):
    """The decode engine pulls over NIXL (UCX's TCP transport: see the engines fixture): greedy tokens as one engine
    alone, and the load report names the path. The prefill engine offers nixl for the whole
    module (decode's auto picks shm on one host, so the other tests are unchanged)."""
    prefill_engine, decode_engine = engines
    n = max(prompts)

    async def scenario():
        await rpc(decode_engine, "pdserve_pull_over_for_tests", "nixl")
        try:
            first, params = await prefill(prefill_engine, f"nixl-p{n}", prompts[n])
            assert "nixl" in params.transports, params.transports
            tokens = await decode(decode_engine, f"nixl-d{n}", prompts[n], first, params)
            report = await rpc(decode_engine, "pdserve_load_report", f"nixl-d{n}")
            await rpc(prefill_engine, "pdserve_release", f"nixl-p{n}")
            return tokens, report
        finally:
            await rpc(decode_engine, "pdserve_pull_over_for_tests", "auto")

    tokens, report = vllm_harness.run(scenario())
    assert tokens == references[n]
    assert report["transport"] == "nixl" and report["recomputed"] is False and report["error"] is None, report
    assert report["num_blocks"] == blocks_for(n)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


FAILURES = {
    # case: (how the params or the prefill side are spoiled, text the load report's error must contain)
    "released_before_pull": "TransferRefused (released)",
    "unknown_transfer": "TransferRefused (unknown)",
    "dead_address": "TransferTimeout",
    "bad_token": "TransferRefused (bad_token)",
    "layout_mismatch": "KV layout mismatch",
}


@pytest.mark.parametrize("case", FAILURES)
def test_failed_load_is_recomputed_locally(vllm_harness, engines, prompts, references, case, load_reports):
    prefill_engine, decode_engine = engines
    n = 64
    ids = prompts[n]

    async def scenario():
        before = await rpc(decode_engine, "pdserve_stats")
        first, params = await prefill(prefill_engine, f"t2-{case}-p", ids)
        wire = params.model_dump(mode="json")
        if case == "released_before_pull":
            assert await rpc(prefill_engine, "pdserve_release", f"t2-{case}-p") is True
        elif case == "dead_address":
            wire["address"] = f"tcp://127.0.0.1:{_free_port()}"
        elif case == "unknown_transfer":
            wire["transfer_id"] = "never-allowed"
        elif case == "bad_token":
            wire["token"] = "not-the-token"
        elif case == "layout_mismatch":
            wire["kv_layout"] = dict(wire["kv_layout"], head_dim=wire["kv_layout"]["head_dim"] * 2)
        started = time.monotonic()
        pushed = load_reports.expect(f"t2-{case}-d")
        tokens = await decode(decode_engine, f"t2-{case}-d", ids, first, wire)
        seconds = time.monotonic() - started
        pushed = await load_reports.wait(f"t2-{case}-d", pushed, 5.0)
        report = await rpc(decode_engine, "pdserve_load_report", f"t2-{case}-d")
        await rpc(prefill_engine, "pdserve_release", f"t2-{case}-p")
        return tokens, report, pushed, seconds, before, await rpc(decode_engine, "pdserve_stats")

    tokens, report, pushed, seconds, before, after = vllm_harness.run(scenario())
    assert tokens == references[n]
    assert report["recomputed"] is True and FAILURES[case] in report["error"], report
    assert pushed == report, f"pushed {pushed}, recorded {report}"
    assert after["num_recomputes"] - before["num_recomputes"] == 1
    assert after["num_kv_blocks_received"] == before["num_kv_blocks_received"]
    assert seconds < PULL_TIMEOUT_S + 5, "a failed load must end in a recompute, not a hang"
    if case == "layout_mismatch":
        assert "head_dim=128" in report["error"] and "head_dim=64" in report["error"], "names both layouts"


def test_corrupted_kv_is_detected_and_recomputed(vllm_harness, engines, prompts, references):
    prefill_engine, decode_engine = engines
    n = 150
    ids = prompts[n]

    async def scenario():
        before = await rpc(decode_engine, "pdserve_stats")
        first, params = await prefill(prefill_engine, "t3-p", ids)
        await rpc(prefill_engine, "pdserve_corrupt_next_send_for_tests")
        tokens = await decode(decode_engine, "t3-d", ids, first, params)
        report = await rpc(decode_engine, "pdserve_load_report", "t3-d")
        await rpc(prefill_engine, "pdserve_release", "t3-p")
        return tokens, report, before, await rpc(decode_engine, "pdserve_stats")

    tokens, report, before, after = vllm_harness.run(scenario())
    assert report["recomputed"] is True and "TransferIntegrityError" in report["error"], report
    assert after["num_recomputes"] - before["num_recomputes"] == 1
    assert tokens == references[n], "the corrupted KV must not have been decoded"


@pytest.mark.parametrize("end", ["release", "lease_expiry"])
def test_held_blocks_return_to_vllm_after_release_or_lease_expiry(vllm_harness, engines, prompts, references, end):
    """Both hold modes: prefill-0 keeps its own reference on the blocks, decode-0 uses vLLM's delay_free.
    Each engine holds for the other; the steps run one engine at a time, so no probe sees the other's work."""
    n = 150
    ids = prompts[n]

    async def scenario():
        results = {}
        for engine in engines:
            results[engine.name] = r = {"baseline": await kv_usage_now(engine, f"t4-{end}-{engine.name}-0")}
            r["first"], r["params"] = await prefill(engine, f"t4-{end}-{engine.name}", ids)
            r["held"] = (await rpc(engine, "pdserve_stats"))["num_held_blocks"]
            r["while_held"] = await kv_usage_now(engine, f"t4-{end}-{engine.name}-1")
        for engine in engines:
            if end == "release":
                assert await rpc(engine, "pdserve_release", f"t4-{end}-{engine.name}") is True
                assert await rpc(engine, "pdserve_release", f"t4-{end}-{engine.name}") is False
        if end == "lease_expiry":
            expiry = max(r["params"].lease_expires_at for r in results.values())
            await asyncio.sleep(max(expiry - time.time(), 0) + 0.5)
        for engine in engines:
            r = results[engine.name]
            r["after_stats"] = await rpc(engine, "pdserve_stats")
            r["after"] = await kv_usage_now(engine, f"t4-{end}-{engine.name}-2")
        for engine, peer in (engines, engines[::-1]):  # a pull after the end is refused; the peer recomputes
            r = results[engine.name]
            r["tokens"] = await decode(peer, f"t4-{end}-{engine.name}-late", ids, r["first"], r["params"])
            r["report"] = await rpc(peer, "pdserve_load_report", f"t4-{end}-{engine.name}-late")
        return results

    for name, r in vllm_harness.run(scenario()).items():
        assert r["held"] == blocks_for(n), name
        assert r["while_held"] > r["baseline"], f"{name}: vLLM's pool must count the held blocks as used"
        assert r["after_stats"]["num_held_blocks"] == 0, name
        assert r["after"] == pytest.approx(r["baseline"]), f"{name}: the blocks must be back in vLLM's free pool"
        assert r["tokens"] == references[n], name
        # At lease end the worker releases the transfer itself (a pull in flight must stop before vLLM reuses
        # the blocks), so a late pull is refused as "released" either way.
        assert r["report"]["recomputed"] is True and "TransferRefused (released)" in r["report"]["error"], r["report"]


def test_nothing_is_held_when_the_first_token_ends_the_request(vllm_harness, engines, prompts, references):
    prefill_engine, _ = engines
    ids = prompts[33]

    async def scenario():
        out = await generate_output(prefill_engine, "t5-p", ids, 1, {"do_remote_decode": True}, ignore_eos=False,
                                    stop_token_ids=[references[33][0]])
        return out, await rpc(prefill_engine, "pdserve_stats")

    out, stats = vllm_harness.run(scenario())
    assert out.outputs[0].finish_reason == "stop"
    assert not (out.kv_transfer_params or {}).get("pdserve")
    assert stats["num_held_blocks"] == 0


def test_abort_during_pull_frees_the_decode_blocks(vllm_harness, engines, prompts):
    prefill_engine, decode_engine = engines
    n = 150
    ids = prompts[n]

    async def scenario():
        baseline = await kv_usage_now(decode_engine, "t6-0")
        first, params = await prefill(prefill_engine, "t6-p", ids)
        await rpc(prefill_engine, "pdserve_pause_endpoint_for_tests", 3.0)  # the pull stalls
        task = asyncio.create_task(decode(decode_engine, "t6-d", ids, first, params))

        async def pulling():
            return (await rpc(decode_engine, "pdserve_stats"))["num_loads_in_flight"] == 1
        await wait_for(pulling, 5, "the pull to start")
        await decode_engine.llm.abort("t6-d")
        started = time.monotonic()

        async def stopped():
            return (await rpc(decode_engine, "pdserve_stats"))["num_loads_in_flight"] == 0
        await wait_for(stopped, 2, "the aborted pull to stop")
        stop_s = time.monotonic() - started
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        after = await kv_usage_now(decode_engine, "t6-1")
        await rpc(prefill_engine, "pdserve_release", "t6-p")
        return baseline, after, stop_s

    baseline, after, stop_s = vllm_harness.run(scenario())
    assert stop_s < 1.0, "the pull stops at once, not at its timeout"
    assert after == pytest.approx(baseline)


def test_engine_core_sleeps_while_it_holds_blocks(vllm_harness, engines, prompts):
    """vLLM steps its engine loop every ~1 ms while a finished request holds blocks through delay_free
    (measured: EngineCore ~40% and its worker ~100% of a core, for the whole lease). With our own reference
    on the blocks the engine has nothing to step and sleeps."""
    prefill_engine, _ = engines

    async def scenario():
        await prefill(prefill_engine, "t7-p", prompts[150])
        core = engine_core_process(await rpc(prefill_engine, "pdserve_transfer_address"))
        await asyncio.sleep(0.5)
        cpu_before, started = sum(core.cpu_times()[:2]), time.monotonic()
        await asyncio.sleep(3.0)
        share = (sum(core.cpu_times()[:2]) - cpu_before) / (time.monotonic() - started)
        held = (await rpc(prefill_engine, "pdserve_stats"))["num_held_blocks"]
        await rpc(prefill_engine, "pdserve_release", "t7-p")
        return share, held

    share, held = vllm_harness.run(scenario())
    assert held == blocks_for(150)
    assert share < 0.15, f"EngineCore used {share:.0%} of a core while only holding blocks"


def listening_process(address: str):
    """The process (psutil.Process) that listens on the port of `address` (a transfer endpoint's)."""
    import psutil

    port = int(address.rsplit(":", 1)[1])
    for child in psutil.Process().children(recursive=True):
        try:
            if any(c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN for c in child.net_connections("tcp")):
                return child
        except psutil.Error:
            continue
    raise AssertionError(f"no child process listens on {address}")


def test_a_prefill_frozen_mid_read_holds_the_blocks_and_the_engine_prefills_anew(vllm_harness, engines, layout,
                                                                                  load_reports):
    """A pull over nixl READs straight into vLLM's blocks. The prefill's worker process is stopped right after the
    decode posted its first READ (a hook in the decode's NIXL agent), so the READ is in flight: the pull fails at its deadline, the connector reports the load failed with READs still running, and
    vLLM keeps the request waiting for its KV, and its blocks, until they end. pdserve's vLLM engine does not wait:
    it aborts that request and prefills the prompt anew (same greedy tokens as one engine alone). Once the prefill
    runs again the READs end and vLLM gets its blocks back."""
    from transformers import AutoTokenizer

    from pdserve.engine.base import KVLoadReport, TokenOutput
    from pdserve.engine.vllm_engine import VllmEngine, VllmEngineConfig
    from pdserve.protocol import ModelCard, SamplingParams

    prefill_engine, decode_engine = engines
    # ~2,000 tokens, 63 blocks of 1.4 MiB: a first READ of 64 MiB
    ids = AutoTokenizer.from_pretrained(str(MODEL_DIR))(" ".join([TEXT] * 14))["input_ids"][:2000]
    card = ModelCard(name="m", tokenizer="unused", max_model_len=2048, kv_layout=layout)
    engine = VllmEngine(VllmEngineConfig(worker_id="test-frozen", model_path=MODEL_DIR, card=card,
                                         advertise_host="127.0.0.1", bind_host="127.0.0.1", kv_lease_s=LEASE_S,
                                         kv_pull_timeout_s=PULL_TIMEOUT_S))
    engine._llm, engine._load_reports = decode_engine.llm, load_reports  # over the module's decode engine

    async def scenario():
        reference = await generate(decode_engine, "frozen-ref", ids, MAX_TOKENS)
        baseline = await kv_usage_now(decode_engine, "frozen-0")
        await rpc(decode_engine, "pdserve_pull_over_for_tests", "nixl")
        first, params = await prefill(prefill_engine, "frozen-p", ids)
        worker = listening_process(params.address)
        await rpc(decode_engine, "pdserve_stop_process_after_next_read_for_tests", worker.pid)
        outputs, started = [], time.monotonic()
        try:
            async for out in engine.generate("frozen-d", tuple(ids), SamplingParams(
                    max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True), first, params):
                outputs.append(out)
            seconds = time.monotonic() - started
            fenced = (await rpc(decode_engine, "pdserve_stats"))["num_fenced_loads"]
            usage_while_frozen = await kv_usage_now(decode_engine, "frozen-1")
        finally:
            worker.resume()
            await rpc(decode_engine, "pdserve_pull_over_for_tests", "auto")

        async def reads_ended():
            await kv_usage_now(decode_engine, "frozen-2")  # steps of the engine deliver finished_recving
            return (await rpc(decode_engine, "pdserve_stats"))["num_fenced_loads"] == 0
        await wait_for(reads_ended, 10, "the READs to end once the prefill runs again")
        after = await kv_usage_now(decode_engine, "frozen-3")
        await rpc(prefill_engine, "pdserve_release", "frozen-p")
        return reference, first, outputs, seconds, fenced, baseline, usage_while_frozen, after

    reference, first, outputs, seconds, fenced, baseline, usage_while_frozen, after = vllm_harness.run(scenario())
    reports = [o for o in outputs if isinstance(o, KVLoadReport)]
    assert len(reports) == 1 and reports[0].recomputed and reports[0].reads_in_flight > 0, reports
    assert "TransferTimeout" in reports[0].error
    assert [first] + [t for o in outputs if isinstance(o, TokenOutput) for t in o.token_ids] == reference
    assert engine.stats()["num_computed_prompt_tokens"] == len(ids) + 1  # prompt and first token, once
    assert seconds < PULL_TIMEOUT_S + 10, "the engine prefilled anew instead of waiting for the frozen prefill"
    assert fenced == 1
    assert usage_while_frozen > baseline  # the failed load's blocks stay with vLLM's waiting request
    assert after == pytest.approx(baseline)
