"""What every request in the router shares, given to each RouterRequest at its start: the bus, the routing
policy and planner, the membership view, the token streams, the watch on workers that die, the tokenizers and
the metrics. Nothing per request lives here."""

from __future__ import annotations

from dataclasses import dataclass

from pdserve.bus import Bus
from pdserve.config import RouterConfig
from pdserve.membership import Membership
from pdserve.metrics import RouterMetrics
from pdserve.protocol import ModelCard
from services.router.models import Tokenizers
from services.router.policy import KVAwarePolicy
from services.router.prefix_reuse import PrefixReuse
from services.router.route_planner import RoutePlanner
from services.router.token_streams import TokenStreams
from services.router.worker_watch import WorkerWatch


@dataclass(frozen=True)
class Shared:
    config: RouterConfig
    bus: Bus
    membership: Membership
    metrics: RouterMetrics
    policy: KVAwarePolicy
    planner: RoutePlanner
    prefix_reuse: PrefixReuse
    streams: TokenStreams
    watch: WorkerWatch
    tokenizers: Tokenizers

    def models(self) -> list[ModelCard]:
        """The models live workers serve, one card each."""
        cards: dict[str, ModelCard] = {}
        for hb in self.membership.live():
            if hb.model is not None:
                cards.setdefault(hb.model.name, hb.model)
        return list(cards.values())

    def card(self, model: str) -> ModelCard:
        return next(c for c in self.models() if c.name == model)
