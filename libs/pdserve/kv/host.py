"""Where a process runs, as far as moving memory goes: the identity of its host and what it can reach there.

Two processes may move KV through each other's memory (the shm path) only if they share a kernel, see each
other's pids and would pick each other's addresses: the host identity is the kernel's boot id with the
process's network and pid namespaces. Two containers on one machine differ in both, so they use TCP.
"""

from __future__ import annotations

import functools
import os


@functools.lru_cache(maxsize=None)
def host_id() -> str:
    """Stable for every process of one machine (or one container), different across machines and containers."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        return ""  # not Linux: no same-host paths
    namespaces = []
    for ns in ("net", "pid"):
        try:
            namespaces.append(str(os.stat(f"/proc/self/ns/{ns}").st_ino))
        except OSError:
            namespaces.append("?")
    return f"{boot}/{'/'.join(namespaces)}"


def yama_ptrace_scope() -> int:
    """The kernel's Yama ptrace restriction (0 when Yama is absent): 1 lets a process read another's memory
    only if that one allows it (prctl PR_SET_PTRACER), 2 and 3 not at all without privileges."""
    try:
        with open("/proc/sys/kernel/yama/ptrace_scope") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return 0
