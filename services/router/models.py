"""The models the router serves: the names clients may ask for (live workers' models plus their aliases) and the
tokenizers of those models, loaded off the event loop as soon as a worker of a new model joins."""

from __future__ import annotations

import asyncio
import logging
import time

from pdserve.protocol import Heartbeat, ModelCard
from pdserve.tokenizer import Tokenizer, load_tokenizer
from services.router.backend import Backend
from services.router.errors import ModelNotFound, NoWorkerError

log = logging.getLogger(__name__)


class ServedModels:
    """The public model names: the backend's live models plus their configured aliases."""

    def __init__(self, backend: Backend, aliases: dict[str, str]):
        self.backend = backend
        self.aliases = aliases
        self.created = int(time.time())

    def _public(self) -> dict[str, ModelCard]:
        cards = {card.name: card for card in self.backend.models()}
        names = dict(cards)
        names.update({alias: cards[target] for alias, target in self.aliases.items() if target in cards})
        return names

    def entries(self) -> list[dict]:
        return [
            {"id": name, "object": "model", "created": self.created, "owned_by": "pdserve",
             "max_model_len": card.max_model_len}
            for name, card in sorted(self._public().items())
        ]

    def not_found(self, name: str) -> ModelNotFound:
        served = ", ".join(sorted(self._public())) or "none"
        return ModelNotFound(f"The model `{name}` does not exist. Served models: {served}.", param="model")

    def resolve(self, name: str) -> ModelCard:
        names = self._public()
        if name in names:
            return names[name]
        if not names:
            # Workers register at runtime: while none is up, 503 tells clients to retry, 404 would not.
            raise NoWorkerError(f"No live worker serves any model yet (requested `{name}`); "
                                "start prefill and decode workers or wait for them to register.")
        raise self.not_found(name)


class Tokenizers:
    """The tokenizer of each model that live workers serve, by name (ModelCard.tokenizer).

    A new model's tokenizer is loaded off the event loop as soon as its first worker joins, before its first
    request: a Hugging Face one takes seconds, and a blocked loop would also stall heartbeats and make every
    worker look gone. A request that comes first loads it then and there.
    """

    def __init__(self) -> None:
        self._loaded: dict[str, Tokenizer] = {}
        self._loading: dict[str, asyncio.Task] = {}

    def get(self, card: ModelCard) -> Tokenizer:
        if card.tokenizer not in self._loaded:
            self._loaded[card.tokenizer] = load_tokenizer(card.tokenizer)
        return self._loaded[card.tokenizer]

    def has(self, name: str) -> bool:
        return name in self._loaded

    def on_worker_joined(self, hb: Heartbeat) -> None:
        name = hb.model.tokenizer if hb.model else None
        if name is None or name in self._loaded or name in self._loading:
            return

        async def load() -> None:
            try:
                self._loaded[name] = await asyncio.to_thread(load_tokenizer, name)
                log.info("tokenizer %s loaded", name)
            except ValueError as e:
                log.error("cannot load tokenizer %s: %s", name, e)
            finally:
                self._loading.pop(name, None)

        self._loading[name] = asyncio.get_running_loop().create_task(load())
