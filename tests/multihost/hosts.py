"""Hosts on one machine: network namespaces on a switch, each running what a user would run on its own machine.

A `Network` is a switch (a bridge in a namespace of its own) and the hosts plugged into it. The test process is
plugged in too, at `network.client_ip`: it reaches every host over the switch, as a client machine would. A
`Host` is a network namespace with one interface, eth0, on the switch; what runs there also gets a UTS namespace
whose hostname is the host's name (so default worker ids say where they run). Everything a test starts on a
host is a `HostProcess`: its own process group and log file, owned by pid. Faults:

- `host.link_down()` / `link_up()`: the host's cable out of the switch (its switch port down): the host and its
  peers see silence, nobody gets an error;
- `host.drop(...)` / `drop_port(...)` / `undrop()`: nftables rules in the host's namespace that drop packets
  (a firewall: connects time out, established connections stall);
- `host.start_delay_proxy(...)`: a slow link (this kernel has no netem qdisc): delay_proxy.py on a host, a TCP
  proxy that delays what it forwards by a fixed time per direction.

`Network.close()` (the context manager's exit, also after a failed test) stops every process (SIGTERM, then
SIGKILL), kills whatever is still in a host's namespace (by pid, `ip netns pids`) and deletes the namespaces,
which takes their links, the bridge and the firewall rules with them. The bridge lives in its own namespace,
not in the root one, so a Docker engine's iptables FORWARD policy (DROP, with bridge netfilter on) never sees
its frames; the FORWARD rule is added there anyway where that namespace's policy is DROP.

Names carry the owner's pid (`pdmh<pid>-<n>...`), so runs in parallel never collide, and the next Network
removes what a run that died before its teardown left (its pid is gone). Addresses come from 198.18.0.0/15
(RFC 2544), one /24 per network that the root namespace does not route yet.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import ipaddress
import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Literal, Mapping, Sequence, TypeVar

from pdserve import nats_server

REPO_ROOT = Path(__file__).resolve().parents[2]
DELAY_PROXY = Path(__file__).with_name("delay_proxy.py")
ADDRESS_POOL = ipaddress.ip_network("198.18.0.0/15")
FIRST_SUBNET = 16  # 198.18.0.0/20 is left to tests that pick their addresses by hand (tests/e2e/test_kv_paths.py)
PREFIX = "pdmh"  # every namespace and root-namespace link of this harness: pdmh<pid>-<n>[-<host>]
ALLOCATION_LOCK = "/tmp/pdserve-multihost.lock"
NFT_TABLE = "pdserve_test"
IFACE = "eth0"
STOP_ORDER = ("service", "proxy", "nats")  # servers last, so that services still reach NATS while they drain
SET_HOSTNAME = 'echo "$0" > /proc/sys/kernel/hostname && exec "$@"'

T = TypeVar("T")
Direction = Literal["in", "out", "both"]


class HarnessError(RuntimeError):
    """A harness command failed (the message has the command and its stderr)."""


# ---- requirements

@functools.lru_cache(maxsize=None)
def _namespaces_work() -> str | None:
    probe = f"{PREFIX}{os.getpid()}-probe"
    done = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, timeout=10)
    if done.returncode:
        return f"`ip netns add` fails here: {done.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=10)
    return None


def missing_requirements(*, nft: bool = False) -> str | None:
    """Why multi-host tests cannot run here (a skip reason), or None."""
    if sys.platform != "linux" or os.geteuid() != 0:
        return "multi-host tests need root on Linux (network namespaces, veth links, a bridge)"
    for tool, package in (("ip", "iproute2"), ("unshare", "util-linux")):
        if shutil.which(tool) is None:
            return f"multi-host tests need `{tool}` (Debian package {package}; .ci/run installs it)"
    if nft and shutil.which("nft") is None:
        return "this test needs nftables' `nft` (Debian package nftables; .ci/run installs it)"
    return _namespaces_work()


# ---- small helpers

def run(argv: Sequence[str], *, input: str | None = None, check: bool = True,
        timeout_s: float = 15) -> subprocess.CompletedProcess:
    done = subprocess.run(list(argv), input=input, capture_output=True, text=True, timeout=timeout_s)
    if check and done.returncode != 0:
        raise HarnessError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
    return done


def wait_until(predicate: Callable[[], T], timeout_s: float, what: str | Callable[[], str],
               interval_s: float = 0.1) -> T:
    """predicate's first truthy value; AssertionError naming `what` (a callable is asked then) after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"not within {timeout_s:g}s: {what() if callable(what) else what}")
        time.sleep(interval_s)


def _die_with_parent() -> None:
    """preexec_fn: SIGTERM when the thread that started the process ends (pytest killed: nothing stays behind)."""
    import ctypes

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _group_members(pgid: int) -> list[int]:
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                if int(fields[2]) == pgid and fields[0] != "Z":
                    members.append(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    return members


# ---- processes

class HostProcess:
    """A command running on a host: its own process group and log file, owned by pid.

    stop() sends SIGTERM and waits; with check (the default) it fails if SIGKILL was needed. kind orders the
    network's teardown: services first, then proxies, NATS last."""

    def __init__(self, host: Host, name: str, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
                 kind: str = "service"):
        self.host, self.name, self.argv, self.kind = host, name, list(argv), kind
        self.log_path = host.network.log_dir / f"{host.name}-{name}.log"
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            [*host.exec_prefix(), *self.argv], stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            cwd=REPO_ROOT, start_new_session=True, env={**os.environ, **(env or {})}, preexec_fn=_die_with_parent)
        self.how_it_ended: str | None = None  # "exited N", "SIGTERM", "SIGKILL" once stopped

    def __repr__(self) -> str:
        return f"<{self.host.name}/{self.name} pid {self.pid}>"

    @property
    def pid(self) -> int:
        return self.process.pid

    def running(self) -> bool:
        return self.process.poll() is None

    def output(self) -> str:
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")

    def wait_for(self, pattern: str, timeout_s: float = 30) -> re.Match:
        """The first match of the regex in this process's log; fails at once if the process ended first."""
        def found() -> re.Match | None:
            match = re.search(pattern, self.output())
            if match is None and not self.running():
                raise AssertionError(f"{self} exited ({self.process.returncode}) before logging {pattern!r}:\n"
                                     f"{self.output()[-3000:]}")
            return match

        return wait_until(found, timeout_s, lambda: f"{self} logged no {pattern!r}:\n{self.output()[-3000:]}")

    def signal(self, sig: int) -> None:
        """To the whole process group (while its leader lives: its pid is the group's id)."""
        if self.running():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, sig)

    def freeze(self) -> None:
        """SIGSTOP: a hung process, which keeps its sockets open."""
        self.signal(signal.SIGSTOP)

    def thaw(self) -> None:
        self.signal(signal.SIGCONT)

    def stop(self, timeout_s: float = 15, *, check: bool = True) -> int:
        """SIGTERM, wait up to timeout_s, then SIGKILL the group; the exit status. check: fail if SIGKILL was needed."""
        self.terminate()
        self.finish(time.monotonic() + timeout_s)
        if check and self.how_it_ended == "SIGKILL":
            raise AssertionError(f"{self} did not stop within {timeout_s:g}s of SIGTERM:\n{self.output()[-3000:]}")
        return self.process.returncode

    def terminate(self) -> None:
        if self.running():
            self.thaw()  # a frozen process would hold its SIGTERM until the end of time
            self.process.send_signal(signal.SIGTERM)
            self.how_it_ended = "SIGTERM"

    def finish(self, deadline: float) -> None:
        """Wait for the end until deadline (monotonic), SIGKILL the group after it; then kill what the group left.
        Once only: later calls return at once."""
        if self._log.closed:
            return
        try:
            self.process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            self.process.wait()
            self.how_it_ended = "SIGKILL"
        self.how_it_ended = self.how_it_ended or f"exited {self.process.returncode}"
        for pid in _group_members(self.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self._log.close()


class NatsProcess(HostProcess):
    """nats-server on a host; `url` is how other hosts reach it."""

    url: str


# ---- hosts

class Host:
    """A machine on the network: a namespace with eth0 at `ip`; what it runs, it runs as on its own machine."""

    def __init__(self, network: Network, name: str, ip: str, index: int):
        self.network, self.name, self.ip = network, name, ip
        self.netns = f"{network.tag}-{name}"
        self.switch_port = f"h{index}"  # its end of the cable, in the switch's namespace
        self.processes: list[HostProcess] = []
        self._names = itertools.count(2)
        self._chains: set[str] = set()

    def __repr__(self) -> str:
        return f"<host {self.name} {self.ip}>"

    def exec_prefix(self) -> list[str]:
        """What runs a command on this host: its network namespace and a UTS namespace named after it."""
        return ["ip", "netns", "exec", self.netns, "unshare", "--uts", "sh", "-c", SET_HOSTNAME, self.name]

    def run(self, argv: Sequence[str], *, input: str | None = None, check: bool = True,
            timeout_s: float = 30) -> subprocess.CompletedProcess:
        """A command on this host, to its end (text output captured)."""
        return run([*self.exec_prefix(), *argv], input=input, check=check, timeout_s=timeout_s)

    def start(self, name: str, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
              kind: str = "service", cls: type[HostProcess] = HostProcess) -> HostProcess:
        """A long-running command on this host (log: <log_dir>/<host>-<name>.log; a name used twice gets -2...)."""
        taken = {p.name for p in self.processes}
        unique = name
        while unique in taken:
            unique = f"{name}-{next(self._names)}"
        process = cls(self, unique, argv, env=env, kind=kind)
        self.processes.append(process)
        return process

    def start_service(self, service: str, *args: str, nats: str, env: Mapping[str, str] | None = None,
                      name: str | None = None) -> HostProcess:
        """`pdserve <service> --nats <nats> <args>`, as a user starts it on this machine."""
        return self.start(name or service, [*pdserve_command(), service, "--nats", nats, *args], env=env)

    def start_nats(self, port: int = 4222, *, routes: Sequence[Host | str] = (), cluster_port: int = 6222,
                   name: str = "nats", args: Sequence[str] = (), ready_timeout_s: float = 20) -> NatsProcess:
        """nats-server with JetStream on this host (all interfaces, `port`); routes: the other nodes of a cluster
        (hosts or addresses; each node names the others, at cluster_port). Ready when it says so."""
        store = self.network.log_dir / f"{self.name}-{name}-store"
        argv = [nats_server.find_binary(), "-a", "0.0.0.0", "-p", str(port), "-js", "-sd", str(store),
                "-n", f"{self.name}-{name}"]
        if routes:
            addresses = [r.ip if isinstance(r, Host) else r for r in routes]
            argv += ["--cluster_name", "pdserve", "--cluster", f"nats://0.0.0.0:{cluster_port}",
                     "--routes", ",".join(f"nats://{a}:{cluster_port}" for a in addresses)]
        process = self.start(name, [*argv, *args], kind="nats", cls=NatsProcess)
        assert isinstance(process, NatsProcess)
        process.url = f"nats://{self.ip}:{port}"
        process.wait_for(r"Server is ready", timeout_s=ready_timeout_s)
        return process

    def start_delay_proxy(self, delay_ms: float, forwards: Mapping[int, tuple[str, int]], *,
                          name: str = "proxy") -> HostProcess:
        """A slow link: delay_proxy.py listening on this host's `forwards` ports ({port: (target ip, target port)}),
        each byte forwarded delay_ms later, in each direction. Ready when it listens."""
        routes = [f"0.0.0.0:{port}={ip}:{target_port}" for port, (ip, target_port) in forwards.items()]
        process = self.start(name, [sys.executable, str(DELAY_PROXY), "--delay-ms", str(delay_ms), *routes],
                             kind="proxy")
        process.wait_for(r"(?m)^ready$", timeout_s=15)
        return process

    # ---- faults

    def link_down(self) -> None:
        """The cable out: this host's switch port down (no error on either side; packets just go nowhere)."""
        run(["ip", "-n", self.network.switch, "link", "set", self.switch_port, "down"])

    def link_up(self) -> None:
        run(["ip", "-n", self.network.switch, "link", "set", self.switch_port, "up"])

    def drop(self, port: int | None = None, *, direction: Direction = "in", peer: Host | str | None = None,
             proto: Literal["tcp", "udp"] = "tcp") -> None:
        """A firewall rule on this host that drops packets (silently: connects time out, connections stall).

        direction "in": packets arriving here (to local `port`, from `peer`); "out": packets leaving (to remote
        `port`, to `peer`); "both". port None: every port (of any protocol unless proto is given with it);
        peer None: every address. Rules add up; undrop() removes them all."""
        nft_missing = missing_requirements(nft=True)
        if nft_missing:
            raise HarnessError(nft_missing)
        peer_ip = peer.ip if isinstance(peer, Host) else peer
        script = []
        for chain, hook, addr, flow in (("input", "input", "saddr", "in"), ("output", "output", "daddr", "out")):
            if direction not in (flow, "both"):
                continue
            if chain not in self._chains:
                script += [f"add table inet {NFT_TABLE}",
                           f"add chain inet {NFT_TABLE} {chain} {{ type filter hook {hook} priority -10 ; }}"]
                self._chains.add(chain)
            match = (f"ip {addr} {peer_ip} " if peer_ip else "") + (f"{proto} dport {port} " if port else "")
            script.append(f"add rule inet {NFT_TABLE} {chain} {match}drop")
        self.run(["nft", "-f", "-"], input="\n".join(script) + "\n")

    def drop_port(self, port: int, direction: Direction = "in", *, proto: Literal["tcp", "udp"] = "tcp") -> None:
        """drop(port, direction=direction): "in" firewalls a server on this host, "out" this host's calls to it."""
        self.drop(port, direction=direction, proto=proto)

    def undrop(self) -> None:
        """Every rule of drop() gone."""
        if self._chains:
            self.run(["nft", "delete", "table", "inet", NFT_TABLE])
            self._chains.clear()

    # ---- looking

    def connect(self, ip: str, port: int, timeout_s: float = 1.0) -> str:
        """A TCP connect from this host: "connected", "refused", "timeout" or "unreachable ..." (the OSError)."""
        probe = ("import socket, sys\n"
                 "try:\n"
                 "    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])).close()\n"
                 "    print('connected')\n"
                 "except socket.timeout:\n    print('timeout')\n"
                 "except ConnectionRefusedError:\n    print('refused')\n"
                 "except OSError as e:\n    print('unreachable', e)\n")
        done = self.run([sys.executable, "-I", "-S", "-c", probe, ip, str(port), str(timeout_s)],
                        timeout_s=timeout_s + 15)
        return done.stdout.strip()

    def pids(self) -> list[int]:
        """Every process in this host's network namespace, whoever started it."""
        done = run(["ip", "netns", "pids", self.netns], check=False)
        return [int(p) for p in done.stdout.split()]


def pdserve_command() -> list[str]:
    """The `pdserve` a user runs: the console script of this environment (else the module)."""
    script = Path(sys.executable).with_name("pdserve")
    return [str(script)] if os.access(script, os.X_OK) else [sys.executable, "-m", "pdserve.cli"]


# ---- the network

class Network:
    """A switch and the hosts on it; a context manager whose exit removes all of it (see the module's docstring).

    log_dir: where each process's log (<host>-<name>.log) and NATS stores go: a test's tmp_path."""

    _numbers = itertools.count()

    def __init__(self, log_dir: str | os.PathLike):
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.tag = f"{PREFIX}{os.getpid()}-{next(self._numbers)}"  # <= 15 characters: a link name in the root ns
        assert len(self.tag) <= 15, self.tag
        self.switch = f"{self.tag}-switch"
        self.client_link = self.tag  # the test process's cable, in the root namespace
        self.hosts: dict[str, Host] = {}
        self.subnet: ipaddress.IPv4Network | None = None
        self.client_ip: str | None = None
        self.unclean_stops: list[str] = []  # processes that needed SIGKILL in close()
        self._started = False

    def __enter__(self) -> Network:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    def start(self) -> None:
        remove_stale()
        self._started = True
        try:
            run(["ip", "netns", "add", self.switch])
            run(["ip", "-n", self.switch, "link", "set", "lo", "up"])
            run(["ip", "-n", self.switch, "link", "add", "br0", "type", "bridge"])
            run(["ip", "-n", self.switch, "link", "set", "br0", "up"])
            with open(ALLOCATION_LOCK, "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)  # two networks never take one subnet (released on close)
                self.subnet = free_subnet()
                self.client_ip = str(self.subnet.network_address + 1)
                run(["ip", "link", "add", self.client_link, "type", "veth", "peer", "name", "client",
                     "netns", self.switch])
                run(["ip", "addr", "add", f"{self.client_ip}/{self.subnet.prefixlen}", "dev", self.client_link])
            run(["ip", "-n", self.switch, "link", "set", "client", "master", "br0", "up"])
            run(["ip", "link", "set", self.client_link, "up"])
            self._allow_bridged_traffic()
        except BaseException:
            self.close()
            raise

    def add_host(self, name: str) -> Host:
        """A new host, plugged in and up: name (lower-case letters, digits, dashes) and the next address."""
        assert self.subnet is not None, "Network.start() first (or use it as a context manager)"
        assert re.fullmatch(r"[a-z0-9][a-z0-9-]{0,30}", name) and name not in self.hosts and name != "switch", name
        index = len(self.hosts) + 1
        assert index + 10 < self.subnet.num_addresses - 1, "the /24 is full"
        host = Host(self, name, str(self.subnet.network_address + 10 + index), index)
        self.hosts[name] = host
        run(["ip", "netns", "add", host.netns])
        run(["ip", "link", "add", IFACE, "netns", host.netns, "type", "veth", "peer", "name", host.switch_port,
             "netns", self.switch])
        run(["ip", "-n", host.netns, "addr", "add", f"{host.ip}/{self.subnet.prefixlen}", "dev", IFACE])
        run(["ip", "-n", host.netns, "link", "set", IFACE, "up"])
        run(["ip", "-n", host.netns, "link", "set", "lo", "up"])
        run(["ip", "-n", self.switch, "link", "set", host.switch_port, "master", "br0", "up"])
        return host

    def unused_ip(self) -> str:
        """An address on this network's subnet that nothing answers (an advertised address nobody has)."""
        assert self.subnet is not None
        return str(self.subnet.broadcast_address - 1)

    def add_hosts(self, *names: str) -> list[Host]:
        return [self.add_host(name) for name in names]

    def processes(self) -> list[HostProcess]:
        return [p for host in self.hosts.values() for p in host.processes]

    def close(self, stop_timeout_s: float = 8) -> None:
        """Stop every process (services, then proxies, then NATS: SIGTERM, SIGKILL after stop_timeout_s per wave),
        kill what is left in the namespaces by pid, delete the namespaces and the root namespace's link."""
        if not self._started:
            return
        self._started = False
        try:
            processes = self.processes()
            waves = [[p for p in processes if p.kind == kind] for kind in STOP_ORDER]
            waves.append([p for p in processes if p.kind not in STOP_ORDER])
            for wave in waves:
                for p in wave:
                    p.terminate()
                deadline = time.monotonic() + stop_timeout_s
                for p in wave:
                    p.finish(deadline)
                    if p.how_it_ended == "SIGKILL":
                        self.unclean_stops.append(f"{p.host.name}/{p.name} (pid {p.pid})")
        finally:
            for host in self.hosts.values():
                for pid in host.pids():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                run(["ip", "netns", "del", host.netns], check=False)
            run(["ip", "netns", "del", self.switch], check=False)  # the bridge and the switch's cable ends with it
            run(["ip", "link", "del", self.client_link], check=False)

    def _allow_bridged_traffic(self) -> None:
        """Where iptables' FORWARD policy is DROP in the bridge's namespace (Docker's, with bridge netfilter on),
        let the bridge's own traffic through; the rule goes with the namespace."""
        if shutil.which("iptables") is None:
            return
        rules = run(["ip", "netns", "exec", self.switch, "iptables", "-S", "FORWARD"], check=False).stdout
        if "-P FORWARD DROP" in rules:
            run(["ip", "netns", "exec", self.switch, "iptables", "-I", "FORWARD", "-i", "br0", "-o", "br0",
                 "-j", "ACCEPT"])


def free_subnet() -> ipaddress.IPv4Network:
    """A /24 of ADDRESS_POOL that no address or route of the root namespace overlaps (call under ALLOCATION_LOCK)."""
    used = []
    for line in run(["ip", "-4", "-o", "addr", "show"]).stdout.splitlines() + \
            run(["ip", "-4", "route", "show", "table", "all"]).stdout.splitlines():
        for word in line.split():
            with contextlib.suppress(ValueError):
                if "/" in word or re.fullmatch(r"\d+\.\d+\.\d+\.\d+", word):
                    used.append(ipaddress.ip_network(word, strict=False))
    subnets = list(ADDRESS_POOL.subnets(new_prefix=24))[FIRST_SUBNET:]
    start = os.getpid() % len(subnets)
    for subnet in subnets[start:] + subnets[:start]:
        if not any(subnet.overlaps(u) for u in used if u.prefixlen > 0):
            return subnet
    raise HarnessError(f"no free /24 left in {ADDRESS_POOL}")


def remove_stale() -> None:
    """Namespaces and links of runs whose process is gone (a run killed before its teardown)."""
    owner = re.compile(rf"^{PREFIX}(\d+)-")
    for line in run(["ip", "netns", "list"], check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        match = owner.match(name)
        if match and not _pid_alive(int(match.group(1))):
            for pid in run(["ip", "netns", "pids", name], check=False).stdout.split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            run(["ip", "netns", "del", name], check=False)
    for line in run(["ip", "-o", "link", "show"], check=False).stdout.splitlines():
        parts = line.split(": ")
        name = parts[1].split("@")[0] if len(parts) > 1 else ""
        match = owner.match(name)
        if match and not _pid_alive(int(match.group(1))):
            run(["ip", "link", "del", name], check=False)


def leftovers(tag: str) -> list[str]:
    """Namespaces and root-namespace links whose name starts with tag (a network's, after its close: none)."""
    names = [line.split()[0] for line in run(["ip", "netns", "list"]).stdout.splitlines() if line.split()]
    links = [line.split(": ")[1].split("@")[0] for line in run(["ip", "-o", "link", "show"]).stdout.splitlines()]
    return [n for n in names + links if n == tag or n.startswith(f"{tag}-")]
