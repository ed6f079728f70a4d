"""`pdserve up` and single services as real subprocesses, owned by the tests (by pid and process group)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Iterator

import orjson
import pytest

from pdserve.config import MOCK_MODEL


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def stream_completion(http, base_url: str, prompt: str, max_tokens: int) -> str:
    """The text of a streamed greedy completion of the mock model (httpx client `http`); no event may be an error."""
    text = []
    async with http.stream("POST", f"{base_url}/v1/completions", json={
            "model": MOCK_MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                event = orjson.loads(line[6:])
                assert "error" not in event, event
                text += [c["text"] for c in event["choices"]]
    return "".join(text)


def get_json(url: str) -> tuple[int, dict | None]:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")
    except (OSError, ValueError):
        return 0, None


def descendants(pid: int) -> set[int]:
    """Every live process below pid, from /proc (children of children too)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
                parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def service_pids(up: "Service", command: str) -> list[int]:
    """Pids of the processes below `up` running `pdserve <command>` (e.g. prefill-worker): by pid, never by name."""
    pids = []
    for pid in sorted(descendants(up.process.pid)):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if command.encode() in f.read().split(b"\0"):
                    pids.append(pid)
        except OSError:
            pass
    return pids


@contextlib.contextmanager
def frozen(pids: list[int]):
    """SIGSTOP the processes (a hung process keeps its sockets open: the worst case for a waiter), SIGCONT after."""
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)


def thaw_and_stop(up: "PdserveUp") -> None:
    """End a module's system whatever a test froze: SIGCONT to every process below it, stop, nothing left."""
    for pid in descendants(up.process.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
    up.stop()
    assert not up.kill_leftovers()


class Service:
    """A pdserve command in its own process group; stop() sends SIGTERM and checks nothing is left."""

    def __init__(self, argv: list[str], log_path: str, env: dict | None = None, wrapper: tuple[str, ...] = ()):
        """wrapper: a command that execs the service, e.g. ("ip", "netns", "exec", NS) to run it on another host."""
        self.log_path = log_path
        self.log = open(log_path, "wb")
        self.process = subprocess.Popen([*wrapper, sys.executable, "-m", "pdserve.cli", *argv], stdout=self.log,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                                        env={**os.environ, **(env or {})})
        self.children_seen: set[int] = set()

    def output(self) -> str:
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")

    def remember_children(self) -> None:
        self.children_seen |= descendants(self.process.pid)

    def stop(self, timeout_s: float = 20) -> None:
        if self.process.poll() is None:
            self.remember_children()
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
                raise AssertionError(f"{self.process.args} did not stop within {timeout_s}s on SIGTERM")
            finally:
                self.log.close()

    def kill_leftovers(self) -> list[int]:
        left = [pid for pid in self.children_seen if alive(pid)]
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        return left


class PdserveUp(Service):
    def __init__(self, tmp_path, port: int, *args: str, name: str = "up", env: dict | None = None):
        # Its own run directory, so that tests find the NATS identities of the roles (when it starts its NATS).
        self.run_dir = tmp_path / f"{name}-run"
        super().__init__(["up", "--engine", "mock", "--port", str(port), "--run-dir", str(self.run_dir), *args],
                         str(tmp_path / f"{name}.log"), env)
        self.port = port
        self.base_url = f"http://127.0.0.1:{port}"

    @property
    def nats_url(self) -> str:
        match = re.search(r"NATS at (nats://\S+);", self.output())
        assert match, self.output()
        return match.group(1)

    def credentials_file(self, role: str) -> str:
        """The NATS identity of a role (router, prefill, decode, broker, observer) of its own NATS."""
        return str(self.run_dir / "nats-credentials" / f"{role}.env")

    def credentials(self, role: str) -> dict:
        """Keyword arguments for Bus.connect / nats.connect as that role."""
        from pdserve import nats_auth

        user, password = nats_auth.read_credentials_file(self.credentials_file(role))
        return {"user": user, "password": password}

    def wait_ready(self, num_prefill: int, num_decode: int, timeout_s: float = 60) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"pdserve up exited early:\n{self.output()[-3000:]}"
            status, health = get_json(f"{self.base_url}/health")
            if status == 200 and health and "ready:" in self.output():
                roles = [w["role"] for w in health["workers"]]
                if roles.count("prefill") >= num_prefill and roles.count("decode") >= num_decode:
                    self.remember_children()
                    return health
            time.sleep(0.2)
        raise AssertionError(f"pdserve up not ready within {timeout_s}s:\n{self.output()[-3000:]}")

    @contextlib.contextmanager
    def running(self, num_prefill: int, num_decode: int, *, ready_timeout_s: float = 60,
                stop_timeout_s: float = 20) -> Iterator["PdserveUp"]:
        """Ready with that many workers for the block; stopped after it, with no process left behind."""
        try:
            self.wait_ready(num_prefill, num_decode, timeout_s=ready_timeout_s)
            yield self
        finally:
            self.stop(timeout_s=stop_timeout_s)
            left = self.kill_leftovers()
            assert not left, f"processes left after pdserve up stopped: {left}"


@pytest.fixture(scope="module")
def system_2p2d(tmp_path_factory):
    """One `pdserve up --engine mock --prefill 2 --decode 2` for a module of tests, as a new user runs it."""
    tmp = tmp_path_factory.mktemp("up2p2d")
    with PdserveUp(tmp, free_port(), "--prefill", "2", "--decode", "2").running(2, 2) as up:
        yield up
