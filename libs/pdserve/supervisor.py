"""`pdserve up`'s children, watched: a child that dies is restarted with backoff and a line that says so; one
that keeps dying ends the whole system with its last log lines.

Algorithm of `Supervisor.check()` (called every fraction of a second by `pdserve up`):
1. A child whose process ended (and is not being stopped) is reaped, its death recorded, and a restart is
   scheduled after a backoff that doubles with each death in the last `window_s` (first_backoff_s ..
   max_backoff_s). One line says who died, how, and when it comes back.
2. A child that died `max_deaths` times within `window_s` is not restarted: check() returns a GaveUp naming it
   with its last log lines, and `pdserve up` stops everything and exits non-zero.
3. A child whose restart time came is started again (same command, same port where it has a fixed one).
"""

from __future__ import annotations

import collections
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import IO, Callable

TAIL_LINES = 20


@dataclass(frozen=True)
class RestartPolicy:
    max_deaths: int = 5
    window_s: float = 120.0
    first_backoff_s: float = 0.5
    max_backoff_s: float = 8.0

    def backoff_s(self, num_recent_deaths: int) -> float:
        return min(self.max_backoff_s, self.first_backoff_s * 2 ** max(0, num_recent_deaths - 1))


@dataclass(frozen=True)
class GaveUp:
    name: str
    num_deaths: int
    tail: list[str]


@dataclass
class Child:
    """One supervised process. `spawn()` starts it; `tail()` gives its last log lines."""

    name: str
    spawn: Callable[[], subprocess.Popen]
    tail: Callable[[], list[str]]
    process: subprocess.Popen | None = None
    deaths: collections.deque = field(default_factory=collections.deque)  # monotonic times
    restart_at: float | None = None

    def start(self) -> None:
        self.process = self.spawn()
        self.restart_at = None


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with status {returncode}"


class Supervisor:
    def __init__(self, say: Callable[[str], None], policy: RestartPolicy = RestartPolicy()):
        self.say = say
        self.policy = policy
        self.children: list[Child] = []

    def add(self, child: Child) -> Child:
        child.start()
        self.children.append(child)
        return child

    def check(self) -> GaveUp | None:
        now = time.monotonic()
        for child in self.children:
            process = child.process
            if child.restart_at is None and process is not None and process.poll() is not None:
                while child.deaths and child.deaths[0] < now - self.policy.window_s:
                    child.deaths.popleft()
                child.deaths.append(now)
                if len(child.deaths) >= self.policy.max_deaths:
                    self.say(f"{child.name} (pid {process.pid}) {describe_exit(process.returncode)}: its "
                             f"{len(child.deaths)}th death within {self.policy.window_s:.0f}s; giving up")
                    return GaveUp(child.name, len(child.deaths), child.tail())
                backoff_s = self.policy.backoff_s(len(child.deaths))
                child.restart_at = now + backoff_s
                self.say(f"{child.name} (pid {process.pid}) {describe_exit(process.returncode)}; restarting it in "
                         f"{backoff_s:.1f}s (death {len(child.deaths)} of {self.policy.max_deaths} allowed within "
                         f"{self.policy.window_s:.0f}s)")
            elif child.restart_at is not None and now >= child.restart_at:
                try:
                    child.start()
                except Exception as e:  # e.g. its port is taken now: counts as one more death
                    child.restart_at = None
                    self.say(f"{child.name} could not be restarted: {e}")
                    child.process = _Failed()
                    continue
                self.say(f"{child.name} restarted (pid {child.process.pid})")
        return None


class _Failed:
    """Stands for a process that could not be started: it has already ended."""

    pid = 0
    returncode = 1

    def poll(self) -> int:
        return 1


class OutputTail:
    """Copies a child's output to ours line by line (from a thread) and keeps its last lines."""

    def __init__(self, sink: IO[bytes], max_lines: int = TAIL_LINES):
        self._sink = sink
        self._lines: collections.deque[str] = collections.deque(maxlen=max_lines)
        self._lock = threading.Lock()

    def follow(self, stream: IO[bytes]) -> None:
        threading.Thread(target=self._copy, args=(stream,), daemon=True, name="child-output").start()

    def _copy(self, stream: IO[bytes]) -> None:
        with stream:
            for line in iter(stream.readline, b""):
                with self._lock:
                    self._lines.append(line.decode(errors="replace").rstrip("\n"))
                    try:
                        self._sink.write(line)
                        self._sink.flush()
                    except (OSError, ValueError):  # our own output is gone; keep the tail anyway
                        pass

    def lines(self) -> list[str]:
        with self._lock:
            return list(self._lines)


def file_tail(path: str, max_lines: int = TAIL_LINES) -> list[str]:
    """The last lines of a log file (nats-server writes its own)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - 64 * 1024))
            return [line.decode(errors="replace") for line in f.read().splitlines()[-max_lines:]]
    except OSError:
        return []
