"""`pdserve doctor`: pre-flight checks of a cluster, each answered OK / WARN / FAIL (or SKIP) with the fix.

    pdserve doctor [--nats URL] [--model PATH] [--timeout-s 3] [--listen-s 1.5] [--probe-timeout-s 1.5]

Each check is a small function over heartbeats (or a path) that returns a CheckResult, so each can be tested
with hand-made heartbeats. They cover the failures operators of disaggregated serving hit most: NATS not
reachable, endpoints this host cannot reach (every one named, with why and the fix: transfer endpoints' control
and byte-stream ports, metrics endpoints, each NATS server of a list), a loopback address advertised to other
machines, workers of one model that disagree on the KV layout (every transfer would be refused and recomputed),
model files missing, clocks far enough apart to spoil KV leases, and this host's RDMA ports (none, or none ACTIVE,
is said with the path KV takes instead). Probes run concurrently, each bounded by --probe-timeout-s, so a cluster
of many dead endpoints is diagnosed in seconds. Exit status 1 on any FAIL, else 0 (WARN and SKIP do not fail); 2
for a bad --nats URL.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal
from urllib.parse import urlsplit

from pdserve import config as cfg
from pdserve import models, netaddr, probes, rdma_devices, status
from pdserve.bus import Bus, BusError
from pdserve.protocol import Heartbeat

Verdict = Literal["OK", "WARN", "FAIL", "SKIP"]
PROBE_TIMEOUT_S = 1.5  # each connect (and each hello) of the reachability checks
# Leases (--kv-lease-s) are 30 s by default and compared across machines by wall clock: a few seconds of
# skew only shortens them, ten or more eats a third of a lease.
SKEW_WARN_S = 2.0
SKEW_FAIL_S = 10.0
_NTP_FIX = "sync the clocks with NTP (chrony or systemd-timesyncd)"


@dataclass(frozen=True)
class CheckResult:
    """One check's verdict; a message of several lines is a summary naming the fix, then one finding a line."""

    name: str
    status: Verdict
    message: str


def _listing(summary: str, findings: list[str]) -> str:
    return "\n".join([summary, *findings])


# ------------------------------------------------------------------------------------------ checks


async def check_nats(options: cfg.BusOptions, timeout_s: float,
                     probe_timeout_s: float = PROBE_TIMEOUT_S) -> tuple[CheckResult, Bus | None]:
    """1. NATS answers within timeout_s; returns the open Bus for the checks that read heartbeats. Of a list of
    servers, each one this host cannot reach is named (a client connected to one fails over to the others)."""
    url = ",".join(options.nats_servers)
    servers = options.nats_servers
    connecting = asyncio.create_task(status.connect(options, "pdserve doctor", timeout_s))
    problems = await probes.nats_problems(servers, probe_timeout_s) if len(servers) > 1 else []
    try:
        bus = await connecting
    except BusError as e:
        return CheckResult("nats", "FAIL", _listing(str(e).removeprefix("pdserve doctor: "), problems)), None
    if problems:
        summary = (f"connected, but {len(problems)} of {len(servers)} NATS servers are unreachable from here (services "
                   "on this host cannot fail over to them): fix their URLs in --nats, or open their ports to this host")
        return CheckResult("nats", "WARN", _listing(summary, problems)), bus
    return CheckResult("nats", "OK", f"reachable at {url}"), bus


def check_members(heartbeats: list[Heartbeat], nats_url: str, listen_s: float) -> CheckResult:
    """Someone heartbeats: at least one prefill and one decode worker, and a KV broker."""
    roles = [hb.role for hb in heartbeats]
    counts = ", ".join(f"{roles.count(r)} {r}" for r in ("prefill", "decode", "broker"))
    if not heartbeats:
        return CheckResult("members", "WARN", f"no worker or broker heartbeats on {nats_url} within {listen_s:g}s: "
                           "start them with --nats pointing at this server (or pass the --nats they use)")
    missing = [r for r in ("prefill", "decode") if r not in roles]
    if missing:
        return CheckResult("members", "WARN", f"{counts}: no {' or '.join(missing)} worker, so requests cannot be "
                           f"served disaggregated; start `pdserve {missing[0]}-worker --nats {nats_url}`")
    if "broker" not in roles:
        return CheckResult("members", "WARN", f"{counts}: no KV broker, so routing ignores cached prefixes; "
                           f"start `pdserve kv-broker --nats {nats_url}`")
    return CheckResult("members", "OK", f"{counts} heartbeating")


async def check_transfer_endpoints(heartbeats: list[Heartbeat], timeout_s: float = PROBE_TIMEOUT_S) -> CheckResult:
    """2. Each advertised transfer endpoint takes connections from here: its control port, and the port of its
    byte stream, which the endpoint names when asked as a client asks (hello on the control socket; no KV is read).
    An unreachable control port fails (no pull can be made); an unreachable stream port warns, since pulls then
    go as ZeroMQ frames, slower."""
    workers = [hb for hb in heartbeats if hb.transfer_address]
    if not workers:
        return CheckResult("transfer", "SKIP", "no worker advertises a transfer endpoint")
    answers = await probes.probe_transfer_endpoints(workers, timeout_s)
    fails = [p.fail for p in answers if p.fail]
    warns = [p.warn for p in answers if p.warn]
    num_unchecked = sum(p.stream_unchecked for p in answers)
    note = (f" ({num_unchecked} did not say where their byte stream listens within {timeout_s:g}s: not checked)"
            if num_unchecked else "")
    if fails:
        return CheckResult("transfer", "FAIL", _listing(
            f"{len(fails)} of {len(workers)} transfer endpoint(s) unreachable from here, so workers here cannot pull "
            "their KV: open their ports to the other workers (firewall, security group), or restart each with "
            f"--advertise-host set to an address the others reach it at (and --bind-host 0.0.0.0 behind NAT){note}",
            fails + warns))
    if warns:
        return CheckResult("transfer", "WARN", _listing(
            f"{len(warns)} of {len(workers)} transfer endpoint(s) take control connections from here but not their "
            f"byte stream, so their KV comes as ZeroMQ frames, slower{note}", warns))
    return CheckResult("transfer", "OK", f"{len(workers)} transfer endpoint(s) reachable from here{note}")


async def check_metrics_endpoints(heartbeats: list[Heartbeat], timeout_s: float = PROBE_TIMEOUT_S) -> CheckResult:
    """3. Each advertised /metrics endpoint takes a TCP connection from here (a Prometheus here could scrape it);
    serving does not need them, so an unreachable one warns."""
    members = [hb for hb in heartbeats if hb.metrics_address]
    if not members:
        return CheckResult("metrics", "SKIP", "no worker advertises a metrics endpoint")
    problems = [p for p in await asyncio.gather(*(probes.metrics_problem(hb, timeout_s) for hb in members)) if p]
    if problems:
        return CheckResult("metrics", "WARN", _listing(
            f"{len(problems)} of {len(members)} metrics endpoint(s) unreachable from here, so a Prometheus on this "
            "host cannot scrape them (serving is not affected); they listen where the transfer endpoints do "
            "(--bind-host, --advertise-host)", problems))
    return CheckResult("metrics", "OK", f"{len(members)} metrics endpoint(s) reachable from here")


def check_advertised_hosts(heartbeats: list[Heartbeat], nats_servers: list[str]) -> CheckResult:
    """4. No worker advertises an address other machines cannot use while NATS (and so the cluster) is remote."""
    nats_hosts = [urlsplit(u).hostname or "127.0.0.1" for u in nats_servers]
    nats_remote = not all(netaddr.is_loopback(h) for h in nats_hosts)
    problems = []
    for hb in heartbeats:
        if not hb.transfer_address:
            continue
        try:
            host, _ = probes.parse_transfer_address(hb.transfer_address)
        except ValueError as e:
            problems.append(f"{hb.worker_id}: {e}")
            continue
        if _is_unspecified(host):
            problems.append(f"{hb.worker_id} advertises {hb.transfer_address}, which names no machine")
        elif nats_remote and netaddr.is_loopback(host):
            problems.append(f"{hb.worker_id} advertises loopback {hb.transfer_address} while NATS is at "
                            f"{','.join(nats_servers)}: workers on other machines cannot pull its KV")
    if problems:
        return CheckResult("advertise", "FAIL", _listing(
            f"{len(problems)} worker(s) advertise a transfer address other machines cannot use: restart each with "
            "--advertise-host set to its address on the network the other workers use", problems))
    where = "NATS is remote" if nats_remote else "NATS is on loopback, so all on one machine"
    return CheckResult("advertise", "OK", f"advertised transfer addresses fit the setup ({where})")


def _is_unspecified(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


_LAYOUT_FIELDS: tuple[tuple[str, Callable], ...] = tuple(
    (f"kv_layout.{name}", lambda card, name=name: getattr(card.kv_layout, name))
    for name in ("block_size", "dtype", "dtype_bytes", "num_layers", "num_kv_heads", "head_dim")
) + (("max_model_len", lambda card: card.max_model_len),)


def check_model_agreement(heartbeats: list[Heartbeat]) -> CheckResult:
    """5. Workers serving one model name agree on its KV layout, context limit and tokenizer."""
    by_model: dict[str, list[Heartbeat]] = {}
    for hb in heartbeats:
        if hb.model is not None:
            by_model.setdefault(hb.model.name, []).append(hb)
    if not by_model:
        return CheckResult("models", "SKIP", "no worker announces a model")
    fails, warns = [], []
    for name, hbs in sorted(by_model.items()):
        for field, get in _LAYOUT_FIELDS:
            if shown := _disagreement(hbs, lambda hb: get(hb.model)):
                fails.append(f"model {name!r}, {field}: {shown}")
        tokenizers = {hb.model.tokenizer for hb in hbs}
        if len(tokenizers) > 1:
            shown = _disagreement(hbs, lambda hb: hb.model.tokenizer)
            # Two paths may be copies of one model on two hosts; "byte" next to a path never is.
            (warns if "byte" not in tokenizers else fails).append(f"model {name!r}, tokenizer: {shown}")
    if fails:
        return CheckResult("models", "FAIL", _listing(
            "workers of one model disagree, so KV cannot move between them (every transfer is refused and "
            "recomputed) and the router's limits fit only some: start them all with the same --model, --dtype, "
            "--block-size and --max-model-len (and --mock-* flags on the mock engine)", fails + warns))
    if warns:
        return CheckResult("models", "WARN", _listing(
            "workers of one model name different tokenizer directories: fine if they are copies of the same "
            "files on different hosts, else serve each model under its own --served-model-name", warns))
    summary = ", ".join(f"{name} ({len(hbs)} worker(s), block_size {hbs[0].model.kv_layout.block_size}, "
                        f"{hbs[0].model.kv_layout.dtype})" for name, hbs in sorted(by_model.items()))
    return CheckResult("models", "OK", f"workers agree: {summary}")


def _disagreement(heartbeats: list[Heartbeat], get: Callable[[Heartbeat], object]) -> str | None:
    """'d1 has 16; d2, p1 have 32' (up to 3 workers named per value) when values differ, else None."""
    by_value: dict[object, list[str]] = {}
    for hb in sorted(heartbeats, key=lambda hb: hb.worker_id):
        by_value.setdefault(get(hb), []).append(hb.worker_id)
    if len(by_value) < 2:
        return None

    def who(ids: list[str]) -> str:
        more = f" and {len(ids) - 3} more" if len(ids) > 3 else ""
        return f"{', '.join(ids[:3])}{more} {'has' if len(ids) == 1 else 'have'}"

    return "; ".join(f"{who(ids)} {value!r}" for value, ids in by_value.items())


def check_model_files(heartbeats: list[Heartbeat], model: str | None) -> CheckResult:
    """6. --model, and each worker's model directory found on this machine, is a complete HF directory."""
    paths: list[str] = [model] if model else []
    elsewhere, num_mock = [], 0
    for hb in heartbeats:
        if hb.model is None:
            continue
        tokenizer = hb.model.tokenizer
        if tokenizer == "byte":  # the mock engine's tokenizer has no files
            num_mock += 1
        elif tokenizer not in paths and tokenizer not in elsewhere:
            (paths if Path(tokenizer).is_dir() else elsewhere).append(tokenizer)
    notes = ([f"{num_mock} mock worker(s) need no files"] if num_mock else []) + (
        [f"{len(elsewhere)} worker model path(s) not on this machine: {', '.join(elsewhere)}"] if elsewhere else [])
    note = f" ({'; '.join(notes)})" if notes else ""
    if not paths:
        return CheckResult("model-files", "SKIP", f"nothing to check here: no --model PATH given{note}")
    problems = [p for p in map(_model_problem, paths) if p]
    if problems:
        return CheckResult("model-files", "FAIL", _listing(f"{len(problems)} model directory(ies) unusable:", problems))
    return CheckResult("model-files", "OK", f"complete: {', '.join(paths)}{note}")


def _model_problem(model: str) -> str | None:
    if model == models.DEFAULT_MODEL:  # resolve_model would download it: doctor only looks
        target = models.default_cache_dir() / models.DEFAULT_MODEL
        if models.read_marker(target) is None:
            return f"{models.DEFAULT_MODEL} is not pulled into {target}: run `pdserve model pull`"
        model = str(target)
    try:
        models.resolve_model(model)
    except models.ModelError as e:
        return str(e)
    return None


def check_clock_skew(members: list[status.Seen]) -> CheckResult:
    """7. Each heartbeat's sent_at is close to when it arrived here (wall clocks agree)."""
    if not members:
        return CheckResult("clock", "SKIP", "no heartbeats to compare clocks with")
    skews = sorted(((s.received_at - s.heartbeat.sent_at, s.heartbeat.worker_id) for s in members),
                   key=lambda x: -abs(x[0]))
    worst = abs(skews[0][0])
    bad = [f"{worker_id} is {abs(skew):.1f}s {'behind' if skew > 0 else 'ahead of'} this machine"
           for skew, worker_id in skews if abs(skew) > SKEW_WARN_S]
    if not bad:
        return CheckResult("clock", "OK", f"largest skew {worst:.2f}s ({skews[0][1]})")
    verdict = "FAIL" if worst > SKEW_FAIL_S else "WARN"
    return CheckResult("clock", verdict, _listing(
        f"clocks differ by up to {worst:.1f}s, and KV leases (--kv-lease-s, 30 s by default) are wall-clock "
        f"deadlines across machines: {_NTP_FIX} (when every worker is off by the same amount, fix this machine's)",
        bad))


def check_rdma(scan: rdma_devices.Scan) -> CheckResult:
    """8. This host's RDMA ports: each listed with its state, link layer and GID 0, or the line that says there is
    none. None at all is OK (KV goes over TCP between hosts, as it does without NIXL); ports none of which is ACTIVE,
    or that libibverbs cannot open, warn: whoever fitted the NIC expects KV to use it."""
    findings = [p.describe() for p in scan.ports]
    if scan.ports and scan.source == "sysfs" and scan.note is None:
        findings.append("pyverbs is not installed, so what libibverbs (and NIXL/UCX) sees is not checked: "
                        "`make install` as root adds python3-pyverbs")
    message = rdma_devices.summary(scan.ports, scan.source)
    if scan.note is not None:
        return CheckResult("rdma", "WARN", _listing(f"{len(scan.ports)} RDMA port(s) in {rdma_devices.SYSFS_ROOT}, "
                                                    f"but {scan.note}", findings))
    verdict: Verdict = "WARN" if scan.ports and not rdma_devices.has_active_port(scan.ports) else "OK"
    return CheckResult("rdma", verdict, _listing(message, findings))


# ------------------------------------------------------------------------------------------ driver


async def diagnose(options: cfg.BusOptions, model: str | None, timeout_s: float, listen_s: float,
                   probe_timeout_s: float = PROBE_TIMEOUT_S) -> list[CheckResult]:
    """Every check, in order; those that need heartbeats are skipped when NATS is unreachable. The reachability
    probes run at once, so that each waits for its own timeout only."""
    nats, bus = await check_nats(options, timeout_s, probe_timeout_s)
    if bus is None:
        skipped = [CheckResult(name, "SKIP", "needs NATS")
                   for name in ("members", "transfer", "metrics", "advertise", "models")]
        return [nats, *skipped, check_model_files([], model), CheckResult("clock", "SKIP", "needs NATS"),
                check_rdma(rdma_devices.scan())]
    try:
        members = await status.collect(bus, listen_s)
    finally:
        await bus.close()
    heartbeats = [s.heartbeat for s in members]
    transfer, metrics = await asyncio.gather(check_transfer_endpoints(heartbeats, probe_timeout_s),
                                             check_metrics_endpoints(heartbeats, probe_timeout_s))
    return [
        nats,
        check_members(heartbeats, ",".join(options.nats_servers), listen_s),
        transfer,
        metrics,
        check_advertised_hosts(heartbeats, options.nats_servers),
        check_model_agreement(heartbeats),
        check_model_files(heartbeats, model),
        check_clock_skew(members),
        check_rdma(rdma_devices.scan()),
    ]


def format_result(result: CheckResult) -> str:
    head = f"{result.status:<5} {result.name:<12} "
    lines = result.message.splitlines() or [""]
    return head + lines[0] + "".join(f"\n{'':<{len(head)}}- {line}" for line in lines[1:])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    status.add_nats_arguments(parser)
    parser.add_argument("--model", default=None, metavar="PATH",
                        help=f"also check this model directory (or {models.DEFAULT_MODEL}: is it pulled?)")
    parser.add_argument("--timeout-s", type=float, default=3.0, help="how long to wait for NATS [default 3]")
    parser.add_argument("--listen-s", type=float, default=status.DEFAULT_LISTEN_S,
                        help=f"how long to listen for heartbeats [default {status.DEFAULT_LISTEN_S:g}]")
    parser.add_argument("--probe-timeout-s", type=float, default=PROBE_TIMEOUT_S,
                        help="how long each connect to an endpoint may take (all run at once) "
                             f"[default {PROBE_TIMEOUT_S:g}]")


def run(args: argparse.Namespace) -> int:
    """`pdserve doctor`; returns 1 on any FAIL, else 0."""
    try:
        options = status.bus_options(args.nats, args.nats_credentials_file)
    except cfg.ConfigError as e:
        print(f"pdserve doctor: {e}", file=sys.stderr)
        return 2
    try:
        results = asyncio.run(diagnose(options, args.model, args.timeout_s, args.listen_s, args.probe_timeout_s))
    except KeyboardInterrupt:
        return 130
    for result in results:
        print(format_result(result))
    verdicts = [r.status for r in results]
    print("\n" + ", ".join(f"{verdicts.count(v)} {v}" for v in ("OK", "WARN", "FAIL", "SKIP") if v in verdicts))
    return 1 if "FAIL" in verdicts else 0


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="pdserve doctor", description=__doc__.split("\n")[0])
    add_arguments(_parser)
    sys.exit(run(_parser.parse_args()))
