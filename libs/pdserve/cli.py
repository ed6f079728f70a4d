"""`pdserve`: one command for every service, and `pdserve up` for the whole system.

    pdserve up [--engine mock] [--prefill N] [--decode M] [--port 8000]
    pdserve router --nats URL [--port 8000]
    pdserve prefill-worker --nats URL
    pdserve decode-worker --nats URL
    pdserve kv-broker --nats URL
    pdserve model pull | path
    pdserve nats-config --out DIR          (NATS identities per role, for a NATS you run)
    pdserve status [--json] [--watch]      pdserve doctor
    pdserve bench [--endpoint URL] [--concurrency N | --rate R] [--out FILE.json] [--plot FILE.png]
"""

from __future__ import annotations

import argparse
import sys

from pdserve import config as cfg
from pdserve.service import run, setup_logging


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdserve", description="LLM serving with prefill/decode disaggregation")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    cfg.add_arguments(sub.add_parser("up", help="start NATS, the KV broker, the router and workers on this machine"),
                      cfg.UpConfig)
    cfg.add_arguments(sub.add_parser("router", help="the OpenAI HTTP API"), cfg.RouterConfig)
    for role in ("prefill", "decode"):
        cfg.add_arguments(sub.add_parser(f"{role}-worker", help=f"a {role} worker"), cfg.WorkerConfig, skip=("role",))
    cfg.add_arguments(sub.add_parser("kv-broker", help="the KV block index and handover book"), cfg.BrokerConfig)
    from pdserve import doctor, status
    from pdserve.models import add_model_arguments

    add_model_arguments(sub.add_parser("model", help="fetch the default model (pull) or show where it is (path)"))
    from pdserve import nats_auth

    nats_auth.add_config_arguments(sub.add_parser(
        "nats-config", help="write a NATS server's authorization block and one identity per role (least privilege)"))
    status.add_arguments(sub.add_parser("status", help="live table of workers and brokers, from NATS heartbeats"))
    doctor.add_arguments(sub.add_parser("doctor", help="pre-flight checks that name the fix"))
    from pdserve.bench import cli as bench_cli

    bench_cli.add_arguments(sub.add_parser("bench", help="load-test an OpenAI-compatible endpoint (TTFT, goodput)"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    command = args.__dict__.pop("command")
    try:
        if command == "model":
            from pdserve.models import model_command

            return model_command(args)
        if command == "nats-config":
            from pdserve import nats_auth

            return nats_auth.config_command(args)
        if command in ("status", "doctor"):
            from pdserve import doctor, status

            return (status if command == "status" else doctor).run(args)
        if command == "bench":
            from pdserve.bench import cli as bench_cli

            return bench_cli.run(args)
        if command == "router":
            from services.router.main import serve

            config = cfg.build(cfg.RouterConfig, args)
        elif command in ("prefill-worker", "decode-worker"):
            from services.decode_worker.main import serve as serve_decode
            from services.prefill_worker.main import serve as serve_prefill

            config = cfg.build(cfg.WorkerConfig, args, role=command.split("-")[0])
            serve = serve_prefill if config.role == "prefill" else serve_decode
        elif command == "up":
            from pdserve.launcher import up

            config = cfg.build(cfg.UpConfig, args)
        else:
            from services.kv_broker.main import serve

            config = cfg.build(cfg.BrokerConfig, args)
    except cfg.ConfigError as e:
        print(f"pdserve {command}: {e}", file=sys.stderr)
        return 2
    if command == "up":
        return up(config)  # its own output, no service log setup: its children log to its stderr
    setup_logging(config.log_level, command)
    return run(lambda: serve(config))


if __name__ == "__main__":
    sys.exit(main())
