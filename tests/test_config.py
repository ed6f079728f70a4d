import argparse

import pytest

from pdserve import config as cfg


def parse(cls, argv):
    parser = argparse.ArgumentParser()
    cfg.add_arguments(parser, cls)
    return parser.parse_args(argv)


def test_defaults():
    router = cfg.build(cfg.RouterConfig, {}, env={})
    assert (router.host, router.port, router.nats) == ("127.0.0.1", 8000, cfg.DEFAULT_NATS)
    assert router.router_id.startswith("router-")


def test_flag_beats_env_beats_default():
    env = {"PDSERVE_PORT": "9001", "PDSERVE_PREFILL_TIMEOUT_S": "7.5"}
    router = cfg.build(cfg.RouterConfig, parse(cfg.RouterConfig, ["--port", "9002"]), env=env)
    assert router.port == 9002
    assert router.prefill_timeout_s == 7.5


def test_worker_from_env():
    worker = cfg.build(cfg.WorkerConfig, {}, env={"PDSERVE_NATS": "nats://h:1", "PDSERVE_BLOCK_SIZE": "32"}, role="decode")
    assert (worker.nats_servers, worker.block_size, worker.role) == (["nats://h:1"], 32, "decode")
    assert worker.worker_id.startswith("decode-")


@pytest.mark.parametrize("cls, values, names", [
    (cfg.RouterConfig, {"port": "http"}, ["--port", "PDSERVE_PORT", "int"]),
    (cfg.RouterConfig, {"port": "70000"}, ["--port", "1-65535"]),
    (cfg.RouterConfig, {"nats": "localhost:4222"}, ["--nats", "PDSERVE_NATS", "nats://"]),
    (cfg.RouterConfig, {"prefill_timeout_s": "0"}, ["--prefill-timeout-s", "> 0"]),
    (cfg.WorkerConfig, {"engine": "tensorrt"}, ["--engine", "mock"]),
    (cfg.WorkerConfig, {"worker_id": "a.b"}, ["--worker-id", "letters"]),
    (cfg.WorkerConfig, {"num_kv_blocks": "2", "max_model_len": "4096"}, ["--num-kv-blocks", "at least 128"]),
    (cfg.BrokerConfig, {"log_level": "LOUD"}, ["--log-level", "DEBUG"]),
])
def test_errors_name_the_setting_and_the_fix(cls, values, names):
    with pytest.raises(cfg.ConfigError) as e:
        cfg.build(cls, values, env={})
    for name in names:
        assert name in str(e.value)


def test_configs_are_frozen():
    router = cfg.build(cfg.RouterConfig, {}, env={})
    with pytest.raises(Exception):
        router.port = 1
