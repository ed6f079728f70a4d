"""`pdserve status`: a live table of the cluster, read from the heartbeats on NATS.

    pdserve status [--nats URL] [--json] [--watch [SECONDS]] [--timeout-s 3] [--listen-s 1.5]

Nothing keeps a membership list anywhere: every worker and broker announces itself each heartbeat interval
(1 s by default), so listening a little longer than one interval sees everyone alive. The table has one
row per worker and broker; `--json` prints the same rows as a JSON list with the glossary's field names. Under
the table, each worker's RDMA ports as its heartbeat gives them, or "no RDMA device (KV over TCP)".
`last_heartbeat_s` is timed with this machine's clock from when the heartbeat arrived, so it is not
distorted by clock skew (`pdserve doctor` reports that separately).

Exit status: 0 with the table, also when nobody heartbeats (the table says "no workers", --json prints []);
1 when NATS cannot be reached; 2 for a bad --nats URL.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from dataclasses import dataclass

import orjson

from pdserve import config as cfg
from pdserve import subjects
from pdserve.bus import Bus, BusError
from pdserve.membership import subscribe_membership
from pdserve.protocol import Goodbye, Heartbeat

log = logging.getLogger(__name__)

DEFAULT_LISTEN_S = 1.5  # one default heartbeat interval (1 s) plus margin for a busy worker
DEFAULT_WATCH_S = 2.0
_ROLE_ORDER = {"prefill": 0, "decode": 1, "broker": 2}
_CLEAR = "\x1b[H\x1b[2J"


@dataclass
class Seen:
    """The latest heartbeat of one member and when it arrived here."""

    heartbeat: Heartbeat
    received_at: float  # time.time(): compared with the heartbeat's sent_at for clock skew
    last_seen: float  # time.monotonic(): for ages and expiry, immune to clock steps

    @property
    def age_s(self) -> float:
        return time.monotonic() - self.last_seen

    @property
    def alive(self) -> bool:
        return self.age_s <= subjects.HEARTBEAT_MISSES * self.heartbeat.interval_s


class HeartbeatCollector:
    """Keeps the latest heartbeat per worker id; a goodbye removes the worker at once."""

    def __init__(self) -> None:
        self._seen: dict[str, Seen] = {}

    async def start(self, bus: Bus) -> None:
        await subscribe_membership(bus, self._on_heartbeat, self._on_goodbye)

    async def _on_heartbeat(self, hb: Heartbeat) -> None:
        self._seen[hb.worker_id] = Seen(hb, time.time(), time.monotonic())

    async def _on_goodbye(self, bye: Goodbye) -> None:
        self._seen.pop(bye.worker_id, None)

    def members(self) -> list[Seen]:
        """Live members, prefill first, then decode, then brokers, each by worker id."""
        self._seen = {k: s for k, s in self._seen.items() if s.alive}
        return sorted(self._seen.values(),
                      key=lambda s: (_ROLE_ORDER.get(s.heartbeat.role, 9), s.heartbeat.worker_id))


def bus_options(nats: str | None, credentials_file: str | None = None) -> cfg.BusOptions:
    """--nats, else PDSERVE_NATS, else the default; the identity from --nats-credentials-file, else credentials
    and TLS from PDSERVE_NATS_* as services take them."""
    return cfg.build(cfg.BusOptions, {"nats": nats, "nats_credentials_file": credentials_file})


def add_nats_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nats", default=None,
                        help=f"NATS server URL(s), comma-separated [env PDSERVE_NATS; default {cfg.DEFAULT_NATS}]")
    parser.add_argument("--nats-credentials-file", default=None,
                        help="NATS identity to use, e.g. the observer's file that `pdserve up` prints "
                             "[env PDSERVE_NATS_CREDENTIALS_FILE]")


async def connect(options: cfg.BusOptions, name: str, timeout_s: float) -> Bus:
    """Bus.connect bounded by timeout_s; raises BusError whose message names the fix."""
    return await Bus.connect_with(options, name, connect_timeout_s=timeout_s)


async def collect(bus: Bus, listen_s: float) -> list[Seen]:
    """Everyone who heartbeats within listen_s."""
    collector = HeartbeatCollector()
    await collector.start(bus)
    await asyncio.sleep(listen_s)
    return collector.members()


# ------------------------------------------------------------------------------------------ output


def row(seen: Seen) -> dict:
    hb = seen.heartbeat
    return {
        "worker_id": hb.worker_id,
        "role": hb.role,
        "model": hb.model.name if hb.model else None,
        "transfer_address": hb.transfer_address,
        "num_queued": hb.num_queued,
        "num_running": hb.num_running,
        "kv_usage": hb.kv_usage,
        "num_held_blocks": hb.num_held_blocks,
        "num_requests_served": hb.num_requests_served,
        "kv_transports": list(hb.kv_transports),
        "num_kv_pulls": dict(hb.num_kv_pulls),
        "unreachable_peer_ids": list(hb.unreachable_peer_ids),
        "rdma_ports": list(hb.rdma_ports),
        "last_heartbeat_s": round(seen.age_s, 2),
    }


_COLUMNS = (  # (header, row key, formatter)
    ("WORKER", "worker_id", str),
    ("ROLE", "role", str),
    ("MODEL", "model", lambda v: v or "-"),
    ("TRANSFER", "transfer_address", lambda v: v or "-"),
    ("QUEUED", "num_queued", str),
    ("RUNNING", "num_running", str),
    ("KV%", "kv_usage", lambda v: f"{100 * v:.1f}"),
    ("HELD", "num_held_blocks", str),
    ("LAST_HB", "last_heartbeat_s", lambda v: f"{v:.1f}s"),
    ("SERVED", "num_requests_served", str),
    ("KV_PATHS", "kv_transports", lambda v: "+".join(v) or "-"),
    ("KV_PULLS", "num_kv_pulls", lambda v: " ".join(f"{k}:{n}" for k, n in sorted(v.items()) if n) or "-"),
)


_WORKER_ONLY = {"num_queued", "num_running", "kv_usage", "num_held_blocks", "kv_transports", "num_kv_pulls"}


def format_table(rows: list[dict]) -> str:
    cells = [[header for header, _, _ in _COLUMNS]]
    # A broker has no queue, engine or KV: dashes say so better than zeros.
    cells += [["-" if r["role"] == "broker" and key in _WORKER_ONLY else fmt(r[key]) for _, key, fmt in _COLUMNS]
              for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(_COLUMNS))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in cells)


def render(members: list[Seen], nats_url: str, listen_s: float, as_json: bool) -> str:
    rows = [row(s) for s in members]
    if as_json:
        return orjson.dumps(rows).decode()
    if not rows:
        return (f"no workers: nothing heartbeated on {nats_url} within {listen_s:g}s; start workers with "
                "--nats pointing at this server, or pass the --nats URL they use")
    roles = [r["role"] for r in rows]
    summary = ", ".join(f"{roles.count(role)} {role}" for role in _ROLE_ORDER if role in roles)
    return f"{format_table(rows)}\n\n{summary} on {nats_url}{rdma_lines(rows)}{unreachable_lines(rows)}"


NO_RDMA = "no RDMA device (KV over TCP)"


def rdma_lines(rows: list[dict]) -> str:
    """Each worker's RDMA ports as its heartbeat gives them, workers of the same ports on one line (so a cluster of
    alike hosts takes one), or that it has none: a host without a usable NIC is not silent."""
    by_ports: dict[str, list[str]] = {}
    for r in rows:
        if r["role"] == "broker":  # it moves no KV
            continue
        ports = r["rdma_ports"]
        shown = ", ".join(ports) or NO_RDMA
        if ports and not any(p.split()[1:2] == ["ACTIVE"] for p in ports):  # "mlx5_0/1 ACTIVE RoCE"
            shown += " (none ACTIVE: KV over TCP)"
        by_ports.setdefault(shown, []).append(r["worker_id"])
    if not by_ports:
        return ""
    return ("\n\nRDMA ports (for KV between hosts; `pdserve doctor` on a host lists their GIDs):\n"
            + "\n".join(f"  {', '.join(ids)}: {shown}" for shown, ids in by_ports.items()))


def unreachable_lines(rows: list[dict]) -> str:
    """One line per worker that cannot reach some prefill workers' KV endpoints (empty when every path works)."""
    lines = [f"  {r['worker_id']} cannot reach {', '.join(r['unreachable_peer_ids'])}"
             for r in rows if r.get("unreachable_peer_ids")]
    if not lines:
        return ""
    return ("\n\nunreachable KV paths (routers avoid these pairs; a probe clears a mark once it connects; "
            "`pdserve doctor` on the decode host says why):\n" + "\n".join(lines))


# -------------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_nats_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print a JSON list of workers (one list per line with --watch)")
    parser.add_argument("--watch", nargs="?", type=float, const=DEFAULT_WATCH_S, default=None, metavar="SECONDS",
                        help=f"redraw every SECONDS (default {DEFAULT_WATCH_S:g}) until Ctrl-C")
    parser.add_argument("--timeout-s", type=float, default=3.0, help="how long to wait for NATS [default 3]")
    parser.add_argument("--listen-s", type=float, default=DEFAULT_LISTEN_S,
                        help=f"how long to listen for heartbeats; raise it past a longer --heartbeat-interval-s "
                             f"[default {DEFAULT_LISTEN_S:g}]")


def run(args: argparse.Namespace) -> int:
    """`pdserve status`; returns the exit status."""
    try:
        options = bus_options(args.nats, args.nats_credentials_file)
    except cfg.ConfigError as e:
        print(f"pdserve status: {e}", file=sys.stderr)
        return 2
    if args.watch is not None and args.watch <= 0:
        print("pdserve status: --watch takes a positive number of seconds", file=sys.stderr)
        return 2
    try:
        return asyncio.run(_status(args, options))
    except BusError as e:  # its message starts with the bus name, "pdserve status"
        print(e, file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # the way --watch ends
        return 0


async def _status(args: argparse.Namespace, options: cfg.BusOptions) -> int:
    nats_url = ",".join(options.nats_servers)
    bus = await connect(options, "pdserve status", args.timeout_s)
    try:
        collector = HeartbeatCollector()
        await collector.start(bus)
        await asyncio.sleep(args.listen_s)
        clear = args.watch is not None and not args.json and sys.stdout.isatty()
        while True:
            text = render(collector.members(), nats_url, args.listen_s, args.json)
            if args.watch is not None and not args.json:
                stamp = time.strftime("%H:%M:%S")
                state = "" if bus.connected else "  (NATS disconnected: reconnecting; rows may be stale)"
                text = f"pdserve status  {stamp}  every {args.watch:g}s, Ctrl-C to stop{state}\n\n{text}\n"
            print((_CLEAR if clear else "") + text, flush=True)
            if args.watch is None:
                return 0
            await asyncio.sleep(args.watch)
    finally:
        await bus.close()


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="pdserve status", description=__doc__.split("\n")[0])
    add_arguments(_parser)
    sys.exit(run(_parser.parse_args()))
