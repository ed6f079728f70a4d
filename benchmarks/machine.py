"""What a benchmark's JSON says about where and how it ran: CPU, Python, host, date, command, commit, load."""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import shlex
import socket
import subprocess
import sys


def machine_info() -> dict:
    model = ""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    commit = None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        commit = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=5).stdout.strip() or None
    return {
        "cpu_count": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)), "cpu_model": model,
        "platform": platform.platform(), "python": platform.python_version(), "hostname": socket.gethostname(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command_line": shlex.join([sys.executable, *sys.argv]), "git_commit": commit,
        "load_average_at_start": list(os.getloadavg()),
    }
