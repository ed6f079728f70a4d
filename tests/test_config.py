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
    (cfg.WorkerConfig, {"kv_host_cache_gib": "-1"}, ["--kv-host-cache-gib", ">= 0"]),
    (cfg.WorkerConfig, {"num_kv_blocks": "-1"}, ["--num-kv-blocks", ">= 0"]),
    (cfg.WorkerConfig, {"num_kv_blocks": "16", "engine": "vllm"}, ["--num-kv-blocks", "at least 128"]),
    (cfg.WorkerConfig, {"kv_host_cache_gib": "2", "prefix_caching": "false"}, ["--kv-host-cache-gib", "prefix caching"]),
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


def test_prefix_caching_is_on_by_default_and_can_be_turned_off():
    assert cfg.build(cfg.WorkerConfig, {}, env={}).prefix_caching is True
    assert cfg.build(cfg.WorkerConfig, parse(cfg.WorkerConfig, ["--no-prefix-caching"]), env={}).prefix_caching is False
    assert cfg.build(cfg.WorkerConfig, {}, env={"PDSERVE_PREFIX_CACHING": "0"}).prefix_caching is False
    # the flag beats the environment both ways
    on = parse(cfg.WorkerConfig, ["--prefix-caching"])
    assert cfg.build(cfg.WorkerConfig, on, env={"PDSERVE_PREFIX_CACHING": "0"}).prefix_caching is True
    off = parse(cfg.WorkerConfig, ["--no-prefix-caching"])
    assert cfg.build(cfg.WorkerConfig, off, env={"PDSERVE_PREFIX_CACHING": "1"}).prefix_caching is False


def cli_config(argv: list[str], env: dict[str, str] | None = None):
    """The config `pdserve <argv>` would run with, parsed by the CLI's own parser."""
    from pdserve.cli import _parser

    args = _parser().parse_args(argv)
    command = args.__dict__.pop("command")
    cls = {"up": cfg.UpConfig, "router": cfg.RouterConfig, "kv-broker": cfg.BrokerConfig}.get(command, cfg.WorkerConfig)
    return cfg.build(cls, args, env=env or {})


@pytest.mark.parametrize("command", ["up", "prefill-worker", "decode-worker"])
def test_every_worker_and_up_take_both_prefix_caching_flags(command):
    assert cli_config([command]).prefix_caching is True
    assert cli_config([command, "--prefix-caching"]).prefix_caching is True
    assert cli_config([command, "--no-prefix-caching"]).prefix_caching is False
    assert cli_config([command], env={"PDSERVE_PREFIX_CACHING": "0"}).prefix_caching is False


def test_up_defaults_and_flags():
    up = cli_config(["up"])
    assert (up.nats, up.host, up.port, up.prefill, up.decode, up.engine, up.model) == (
        None, "127.0.0.1", 8000, 1, 1, "mock", "")
    assert (up.kv_transport, up.log_level, up.run_dir, up.startup_timeout_s) == ("auto", "INFO", None, 60.0)
    assert cli_config(["up", "--engine", "vllm"]).startup_timeout_s == 600.0
    up = cli_config(["up", "--prefill", "3", "--decode", "2", "--port", "9000", "--startup-timeout-s", "5",
                     "--kv-transport", "tcp"], env={"PDSERVE_PORT": "9001", "PDSERVE_DECODE": "4"})
    assert (up.prefill, up.decode, up.port, up.startup_timeout_s, up.kv_transport) == (3, 2, 9000, 5.0, "tcp")
    assert cli_config(["up"], env={"PDSERVE_NATS": "nats://h:1", "PDSERVE_DECODE": "4"}).decode == 4


def test_up_keeps_its_secrets_out_of_repr():
    up = cfg.build(cfg.UpConfig, {"nats": "nats://h:1", "nats_user": "u", "nats_password": "hunter2"}, env={})
    assert up.nats_password == "hunter2" and "hunter2" not in repr(up)


@pytest.mark.parametrize("values, names", [
    ({"prefill": "0"}, ["--prefill", "PDSERVE_PREFILL", "at least 1"]),
    ({"decode": "two"}, ["--decode", "int"]),
    ({"port": "0"}, ["--port", "1-65535"]),
    ({"engine": "tensorrt"}, ["--engine", "mock"]),
    ({"kv_transport": "rdma"}, ["--kv-transport", "shm"]),
    ({"startup_timeout_s": "-1"}, ["--startup-timeout-s", "> 0"]),
    ({"log_level": "LOUD"}, ["--log-level", "DEBUG"]),
    ({"prefix_caching": "maybe"}, ["--prefix-caching", "PDSERVE_PREFIX_CACHING", "bool"]),
    ({"nats": "localhost:4222"}, ["--nats", "nats://"]),
    ({"nats_token": "t"}, ["--nats-user/--nats-token/--nats-credentials-dir are for an external NATS"]),
    ({"nats": "nats://h:1", "nats_password": "p"}, ["--nats-password needs --nats-user"]),
    ({"nats": "nats://h:1", "nats_credentials_dir": "/nonexistent", "nats_user": "u"}, ["one way"]),
    ({"nats_tls_ca": "/ca.pem"}, ["--nats-tls-*", "--nats URL"]),
    ({"api_keys_file": "/nonexistent/keys"}, ["--api-keys-file", "cannot read"]),
])
def test_up_errors_name_the_setting_and_the_fix(values, names):
    with pytest.raises(cfg.ConfigError) as e:
        cfg.build(cfg.UpConfig, values, env={})
    for name in names:
        assert name in str(e.value)


def test_up_refuses_a_bad_config_before_starting_anything(capsys):
    from pdserve.cli import main

    assert main(["up", "--prefill", "0"]) == 2
    assert "pdserve up: --prefill / PDSERVE_PREFILL: must be at least 1" in capsys.readouterr().err


def test_up_config_is_frozen():
    with pytest.raises(Exception):
        cfg.build(cfg.UpConfig, {}, env={}).port = 1
