"""Build a worker's engine from its config: one frozen engine config made from WorkerConfig, and the KV event
sink the worker relays to the broker, given at construction."""

from __future__ import annotations

from pathlib import Path

from pdserve.config import MOCK_NUM_KV_BLOCKS, WorkerConfig
from pdserve.engine.base import Engine
from pdserve.kv.events import KVEventSink
from pdserve.protocol import KVLayout, ModelCard

_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def mock_card(config: WorkerConfig) -> ModelCard:
    return ModelCard(
        name=config.served_model_name,
        tokenizer="byte",
        max_model_len=config.max_model_len,
        kv_layout=KVLayout(
            num_layers=config.mock_num_layers, num_kv_heads=config.mock_num_kv_heads, head_dim=config.mock_head_dim,
            dtype=f"mock{8 * config.mock_dtype_bytes}", dtype_bytes=config.mock_dtype_bytes,
            block_size=config.block_size,
        ),
    )


def vllm_card(config: WorkerConfig, model_path: Path) -> ModelCard:
    """The served model's card, its KV shape read from the model's Hugging Face config."""
    from transformers import AutoConfig  # vLLM depends on transformers

    hf = AutoConfig.from_pretrained(model_path)
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    layout = KVLayout(num_layers=hf.num_hidden_layers,
                      num_kv_heads=getattr(hf, "num_key_value_heads", hf.num_attention_heads), head_dim=head_dim,
                      dtype=config.dtype, dtype_bytes=_DTYPE_BYTES[config.dtype], block_size=config.block_size)
    return ModelCard(name=config.served_model_name, tokenizer=str(model_path), max_model_len=config.max_model_len,
                     kv_layout=layout)


def offers_nixl(config: WorkerConfig) -> bool:
    """Whether this worker's transfer endpoint offers the nixl path: asked for or auto, NIXL there, and the bus
    authenticated (or the operator insisted: nixl_path.transport_offered says why that matters)."""
    from pdserve.kv import nixl_path

    return nixl_path.transport_offered(config.kv_transport,
                                       nats_authenticated=bool(config.nats_user or config.nats_token))


def create_engine(config: WorkerConfig, *, advertise_host: str, bind_host: str,
                  kv_events: KVEventSink | None = None) -> Engine:
    if config.engine == "mock":
        from pdserve.engine.mock import MockEngine, MockEngineConfig

        return MockEngine(MockEngineConfig(
            worker_id=config.worker_id, card=mock_card(config),
            num_kv_blocks=config.num_kv_blocks or MOCK_NUM_KV_BLOCKS,
            ms_per_prompt_token=config.mock_ms_per_prompt_token, ms_per_decode_step=config.mock_ms_per_decode_step,
            advertise_host=advertise_host, bind_host=bind_host, kv_pull_timeout_s=config.kv_pull_timeout_s,
            kv_connect_timeout_s=config.kv_connect_timeout_s, kv_transport=config.kv_transport,
            offer_nixl=offers_nixl(config), prefix_caching=config.prefix_caching,
            host_cache_gib=config.kv_host_cache_gib,
        ), kv_events=kv_events)
    if config.engine == "vllm":
        from pdserve.engine.vllm_engine import VllmEngine, VllmEngineConfig
        from pdserve.models import resolve_model

        model_path = resolve_model(config.model)
        return VllmEngine(VllmEngineConfig(
            worker_id=config.worker_id, model_path=model_path, card=vllm_card(config, model_path),
            advertise_host=advertise_host, bind_host=bind_host, kv_lease_s=config.kv_lease_s,
            kv_pull_timeout_s=config.kv_pull_timeout_s, kv_connect_timeout_s=config.kv_connect_timeout_s,
            kv_transport=config.kv_transport, offer_nixl=offers_nixl(config),
            kv_cache_gib=config.kv_cache_gib, cpu_cores=config.cpu_cores, enforce_eager=config.enforce_eager,
            prefix_caching=config.prefix_caching, num_kv_blocks=config.num_kv_blocks or None,
            host_cache_gib=config.kv_host_cache_gib,
        ), kv_events=kv_events)
    raise ValueError(f"unknown engine {config.engine!r}; use --engine vllm or --engine mock")
