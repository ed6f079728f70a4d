"""Several mock workers of one role in one process: 50 workers on a 2-core machine without 50 interpreters.

    python -m tests.multihost.many_workers --role decode --count 10 --id-prefix decode-d --nats URL [worker flags]

Each worker is what `pdserve <role>-worker` runs (a `WorkerRuntime` with its role's handlers, as the services'
serve() builds it), minus the process-wide set-up (signal handlers, tracing). The workers share an event loop and
nothing else: each has its own NATS connection, engine, KV transfer endpoint, metrics server and heartbeats.

Churn on command, by signal (a harness process has no stdin):
- SIGUSR1: the oldest worker stops cleanly (WorkerRuntime.__aexit__: goodbye, engine stopped, NATS drained);
- SIGUSR2: one new worker starts;
- SIGTERM / SIGINT: every worker stops cleanly, then the process exits (0, or 1 if a worker failed).
Each change is one log line the test waits for: `worker ID started (N running)`, `worker ID stopped (N running)`.
Worker ids are `<id-prefix>-<n>`, n counting from 0 in start order.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from collections import deque
from dataclasses import dataclass, field

from pdserve import config as cfg
from pdserve import subjects
from pdserve.config import WorkerConfig
from pdserve.protocol import CancelRequest, DecodeRequest, KVRelease, PrefillRequest
from pdserve.service import setup_logging
from pdserve.worker import WorkerRuntime
from services.decode_worker.main import DecodeHandlers
from services.prefill_worker.main import PrefillHandlers

log = logging.getLogger("many_workers")


async def serve_role(rt: WorkerRuntime) -> None:
    """Subscribe the role's handlers (as services/<role>_worker/main.py serve() does), then announce."""
    if rt.config.role == "prefill":
        prefill = PrefillHandlers(rt)
        await rt.bus.serve(subjects.prefill_request(rt.worker_id), PrefillRequest, prefill.on_prefill)
        await rt.bus.subscribe(subjects.kv_release(rt.worker_id), KVRelease, prefill.on_release)
        await rt.bus.subscribe(subjects.CANCEL, CancelRequest, prefill.on_cancel)
    else:
        decode = DecodeHandlers(rt)
        await rt.bus.serve(subjects.decode_request(rt.worker_id), DecodeRequest, decode.on_decode)
        await rt.bus.subscribe(subjects.CANCEL, CancelRequest, decode.on_cancel)
    await rt.announce()


@dataclass
class HostedWorker:
    """One worker of this process: its task runs the runtime until `stop` is set."""

    worker_id: str
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    announced: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task | None = None


class WorkerHost:
    def __init__(self, base: dict, role: str, id_prefix: str):
        self.base, self.role, self.id_prefix = base, role, id_prefix
        self.running: deque[HostedWorker] = deque()  # oldest first
        self.num_started = 0
        self.num_failed = 0

    async def start_one(self) -> HostedWorker | None:
        """A new worker, once it heartbeats; None (logged) if it could not start."""
        worker = HostedWorker(f"{self.id_prefix}-{self.num_started}")
        self.num_started += 1
        config = cfg.build(WorkerConfig, self.base, role=self.role, worker_id=worker.worker_id)
        worker.task = asyncio.create_task(self._run(config, worker), name=worker.worker_id)
        self.running.append(worker)  # in start order, whichever announces first
        announced = asyncio.create_task(worker.announced.wait())
        await asyncio.wait({worker.task, announced}, return_when=asyncio.FIRST_COMPLETED)
        announced.cancel()
        if not worker.announced.is_set():
            self.num_failed += 1
            self.running.remove(worker)
            log.error("worker %s failed to start: %r", worker.worker_id, worker.task.exception())
            return None
        log.info("worker %s started (%d running)", worker.worker_id, len(self.running))
        return worker

    async def _run(self, config: WorkerConfig, worker: HostedWorker) -> None:
        async with WorkerRuntime(config) as rt:
            await serve_role(rt)
            worker.announced.set()
            await worker.stop.wait()

    async def stop(self, worker: HostedWorker) -> None:
        """Clean stop: the runtime's exit says goodbye, stops the engine and drains NATS."""
        assert worker.task is not None
        worker.stop.set()
        try:
            await worker.task
        except Exception:
            self.num_failed += 1
            log.exception("worker %s failed while stopping", worker.worker_id)
        with contextlib.suppress(ValueError):
            self.running.remove(worker)
        log.info("worker %s stopped (%d running)", worker.worker_id, len(self.running))

    async def stop_oldest(self) -> None:
        if self.running:
            await self.stop(self.running[0])
        else:
            log.warning("no worker left to stop")


async def main(args: argparse.Namespace, base: dict) -> int:
    host = WorkerHost(base, args.role, args.id_prefix or f"{args.role}-{socket.gethostname()}-{os.getpid()}")
    commands: asyncio.Queue[str] = asyncio.Queue()
    loop = asyncio.get_running_loop()
    for sig, command in ((signal.SIGUSR1, "stop"), (signal.SIGUSR2, "start"),
                         (signal.SIGTERM, "exit"), (signal.SIGINT, "exit")):
        loop.add_signal_handler(sig, commands.put_nowait, command)
    started = await asyncio.gather(*(host.start_one() for _ in range(args.count)))
    if not all(started):
        await asyncio.gather(*(host.stop(w) for w in list(host.running)))
        return 1
    log.info("all %d %s workers started", args.count, args.role)
    # Commands run one at a time, in the order their signals came.
    while (command := await commands.get()) != "exit":
        if command == "stop":
            await host.stop_oldest()
        else:
            await host.start_one()
    await asyncio.gather(*(host.stop(w) for w in list(host.running)))
    log.info("exiting: %d workers started, %d failed", host.num_started, host.num_failed)
    return 1 if host.num_failed else 0


def parse(argv: list[str] | None = None) -> tuple[argparse.Namespace, dict]:
    parser = argparse.ArgumentParser(prog="many_workers", description=__doc__.split("\n\n")[0])
    parser.add_argument("--role", choices=("prefill", "decode"), required=True)
    parser.add_argument("--count", type=int, default=1, help="workers to start at once")
    parser.add_argument("--id-prefix", default="", help="worker ids are <prefix>-<n>")
    cfg.add_arguments(parser, WorkerConfig, skip=("role", "worker_id"))
    args = parser.parse_args(argv)
    base = {k: v for k, v in vars(args).items() if k not in ("role", "count", "id_prefix") and v is not None}
    return args, base


if __name__ == "__main__":
    args, base = parse()
    try:
        checked = cfg.build(WorkerConfig, base, role=args.role)  # flags checked once, before anything starts
    except cfg.ConfigError as e:
        print(f"many_workers: {e}", file=sys.stderr)
        sys.exit(2)
    setup_logging(checked.log_level, f"many-{args.role}-workers")
    sys.exit(asyncio.run(main(args, base)))
