"""Build a worker's engine from its config."""

from __future__ import annotations

from pdserve.config import WorkerConfig
from pdserve.engine.base import Engine
from pdserve.protocol import KVLayout, ModelCard


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


def create_engine(config: WorkerConfig, *, advertise_host: str, bind_host: str) -> Engine:
    if config.engine == "mock":
        from pdserve.engine.mock import MockEngine

        return MockEngine(
            worker_id=config.worker_id, card=mock_card(config), num_kv_blocks=config.num_kv_blocks,
            ms_per_prompt_token=config.mock_ms_per_prompt_token, ms_per_decode_step=config.mock_ms_per_decode_step,
            advertise_host=advertise_host, bind_host=bind_host, kv_pull_timeout_s=config.kv_pull_timeout_s,
            kv_transport=config.kv_transport, prefix_caching=config.prefix_caching,
        )
    if config.engine == "vllm":
        from pdserve.engine.vllm_engine import VllmEngine
        from pdserve.models import resolve_model

        return VllmEngine(
            worker_id=config.worker_id, model_path=resolve_model(config.model),
            served_model_name=config.served_model_name, max_model_len=config.max_model_len,
            block_size=config.block_size, dtype=config.dtype, advertise_host=advertise_host, bind_host=bind_host,
            kv_lease_s=config.kv_lease_s, kv_pull_timeout_s=config.kv_pull_timeout_s, kv_transport=config.kv_transport,
            kv_cache_gib=config.kv_cache_gib, cpu_cores=config.cpu_cores, enforce_eager=config.enforce_eager,
            prefix_caching=config.prefix_caching,
        )
    raise ValueError(f"unknown engine {config.engine!r}; use --engine vllm or --engine mock")
