"""The Backend the router's HTTP layer calls: it builds what requests share (shared.Shared: bus, policy and
planner, membership, token streams, the watch on workers that die, tokenizers, metrics), wires it to the
membership and bus events, answers models and health, and runs each request as one
router_request.RouterRequest, which holds its own state and runs its algorithm (opened there). Nothing per
request lives here.
"""

from __future__ import annotations

from typing import AsyncIterator

from pdserve.bus import Bus
from pdserve.config import RouterConfig
from pdserve.membership import Membership
from pdserve.metrics import RouterMetrics
from pdserve.protocol import ModelCard
from pdserve.tokenizer import Tokenizer
from services.router.backend import GenerateDelta, GenerateRequest
from services.router.models import Tokenizers
from services.router.policy import CostWeights, KVAwarePolicy
from services.router.prefix_reuse import PrefixReuse
from services.router.route_planner import RoutePlanner
from services.router.router_request import RouterRequest
from services.router.shared import Shared
from services.router.token_streams import TokenStreams
from services.router.worker_watch import WorkerWatch


class Orchestrator:
    def __init__(self, config: RouterConfig, bus: Bus, membership: Membership, metrics: RouterMetrics):
        policy = KVAwarePolicy(
            membership, CostWeights(config.route_w_recompute, config.route_w_queue, config.route_w_running,
                                    config.route_w_kv),
            config.routing, config.local_prefill_max_tokens, config.prefill_queue_limit)
        self.shared = Shared(config=config, bus=bus, membership=membership, metrics=metrics, policy=policy,
                             planner=RoutePlanner(config, bus, membership, policy, metrics),
                             prefix_reuse=PrefixReuse(config, bus, membership),
                             streams=TokenStreams(bus, config.router_id), watch=WorkerWatch(membership),
                             tokenizers=Tokenizers())
        self.metrics = metrics
        membership.on_join.append(self.shared.tokenizers.on_worker_joined)
        # A worker gone: every request waiting on it (its answer, its next chunk) moves on now.
        membership.on_gone.extend((self.shared.streams.on_worker_gone, self.shared.watch.on_worker_gone))
        # NATS came back: what was published meanwhile is lost; waits shrink to a silent worker's allowance.
        bus.on_reconnect.extend((self.shared.streams.on_reconnect, self.shared.watch.on_reconnect))
        membership.on_reconnected.extend((self.shared.streams.on_worker_reconnected,
                                          self.shared.watch.on_worker_reconnected))

    async def start(self) -> None:
        await self.shared.streams.start()

    def models(self) -> list[ModelCard]:
        return self.shared.models()

    def tokenizer(self, model: str) -> Tokenizer:
        return self.shared.tokenizers.get(self.shared.card(model))

    def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateDelta]:
        return RouterRequest(self.shared, request).run()

    def health(self) -> dict:
        config, bus, tokenizers = self.shared.config, self.shared.bus, self.shared.tokenizers
        live = self.shared.membership.live()
        workers = [{"worker_id": hb.worker_id, "role": hb.role, "model": hb.model.name if hb.model else None,
                    "num_requests_served": hb.num_requests_served, "num_queued": hb.num_queued,
                    "num_running": hb.num_running, "kv_usage": hb.kv_usage,
                    "transfer_address": hb.transfer_address, "metrics_address": hb.metrics_address,
                    "unreachable_peer_ids": list(hb.unreachable_peer_ids), "rdma_ports": list(hb.rdma_ports)}
                   for hb in live if hb.role != "broker"]
        brokers = [hb.worker_id for hb in live if hb.role == "broker"]
        roles = {w["role"] for w in workers}
        problems = []  # each names what is missing and what it costs
        if not bus.connected:
            problems.append("NATS: this router lost its connection and is reconnecting; requests get 503 meanwhile")
        if "decode" not in roles:
            problems.append("no live decode worker: requests get 503")
        if not all(tokenizers.has(hb.model.tokenizer) for hb in live if hb.model):
            problems.append("loading a model's tokenizer")
        serving = not problems
        if "prefill" not in roles:
            problems.append("no live prefill worker: decode workers serve whole requests (prefill included)")
        problems += [f"{w['worker_id']} cannot reach the KV endpoints of {', '.join(w['unreachable_peer_ids'])}: "
                     "routers do not pair them; `pdserve doctor` on its host says why"
                     for w in workers if w["unreachable_peer_ids"]]
        if not brokers and config.routing == "kv":
            problems.append("no live KV broker: KV-aware routing is off, requests are routed by load alone")
        return {"status": "ok" if not problems else "degraded", "serving": serving, "problems": problems,
                "router_id": config.router_id, "nats_connected": bus.connected, "workers": workers,
                "kv_brokers": brokers}
