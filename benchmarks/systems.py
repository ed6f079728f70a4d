"""The serving systems the benchmarks compare, each started as subprocesses and stopped by process group.

Every system serves the same model under the same name with the same engine settings (fp32, 32-token blocks,
eager, 4096-token context), so only the architecture differs:
  pdserve      `pdserve up --engine vllm`: router + 1 prefill + 1 decode worker (pinned to one core each)
  vllm         one plain `vllm.entrypoints.openai.api_server` on the given cores
  vllm-disagg  vLLM's own disaggregation: two api_servers with the built-in ExampleConnector (KV through a
               shared directory) behind benchmarks/vllm_disagg_proxy.py, producer and consumer one core each
Each context manager yields the base URL; server output goes to a log file whose tail is in any start error.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import httpx

HERE = Path(__file__).resolve().parent
ENGINE_ARGS = ["--dtype", "float32", "--block-size", "32", "--enforce-eager", "--max-model-len", "4096",
               "--disable-log-stats"]
START_TIMEOUT_S = 600.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(argv: list[str], log_path: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    log = open(log_path, "w")
    try:
        return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, **(env or {})}, start_new_session=True)
    finally:
        log.close()


def stop(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


def tail(log_path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(log_path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def wait_ready(url: str, processes: list[tuple[subprocess.Popen, Path]]) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        for process, log_path in processes:
            if process.poll() is not None:
                raise RuntimeError(f"{' '.join(process.args[:4])} exited with {process.returncode} while starting; "
                                   f"its log ({log_path}) ends:\n{tail(log_path)}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        time.sleep(0.5)
    logs = "\n".join(f"--- {p}\n{tail(p)}" for _, p in processes)
    raise RuntimeError(f"{url} not ready within {START_TIMEOUT_S:.0f}s; logs:\n{logs}")


def _vllm_server(model_dir: str, model_name: str, port: int, cores: str, log_path: Path,
                 extra: list[str] = ()) -> subprocess.Popen:
    env = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": cores}
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
            "--served-model-name", model_name, "--port", str(port), *ENGINE_ARGS, *extra]
    return spawn(argv, log_path, env)


@contextlib.contextmanager
def pdserve_1p1d(model_dir: str, model_name: str, log_dir: Path) -> Iterator[str]:
    port = free_port()
    log_path = log_dir / "pdserve-up.log"
    # pdserve serves a model directory under the directory's name: the other systems are given the same name.
    assert Path(model_dir).name == model_name, f"pdserve serves {model_dir} as {Path(model_dir).name}"
    up = spawn([sys.executable, "-m", "pdserve.cli", "up", "--engine", "vllm", "--model", model_dir,
                 "--port", str(port)], log_path)
    try:
        # /health answers 200 only once a prefill and a decode worker are in.
        wait_ready(f"http://127.0.0.1:{port}/health", [(up, log_path)])
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(up)


@contextlib.contextmanager
def plain_vllm(model_dir: str, model_name: str, log_dir: Path, cores: str = "0-1") -> Iterator[str]:
    port = free_port()
    log_path = log_dir / "vllm.log"
    server = _vllm_server(model_dir, model_name, port, cores, log_path)
    try:
        wait_ready(f"http://127.0.0.1:{port}/health", [(server, log_path)])
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(server)


@contextlib.contextmanager
def vllm_example_disagg(model_dir: str, model_name: str, log_dir: Path) -> Iterator[str]:
    storage = log_dir / "example-connector-kv"
    storage.mkdir(parents=True, exist_ok=True)
    kv_config = json.dumps({"kv_connector": "ExampleConnector", "kv_role": "kv_both",
                            "kv_connector_extra_config": {"shared_storage_path": str(storage)}})
    ports = [free_port() for _ in range(3)]
    started: list[tuple[subprocess.Popen, Path]] = []
    try:
        for name, port, core in (("producer", ports[1], "0"), ("consumer", ports[2], "1")):
            log_path = log_dir / f"vllm-{name}.log"
            started.append((_vllm_server(model_dir, model_name, port, core, log_path,
                                         ["--kv-transfer-config", kv_config]), log_path))
        proxy_log = log_dir / "vllm-disagg-proxy.log"
        started.append((spawn([sys.executable, str(HERE / "vllm_disagg_proxy.py"), "--port", str(ports[0]),
                                "--producer", f"http://127.0.0.1:{ports[1]}",
                                "--consumer", f"http://127.0.0.1:{ports[2]}"], proxy_log), proxy_log))
        wait_ready(f"http://127.0.0.1:{ports[0]}/health", started)
        yield f"http://127.0.0.1:{ports[0]}"
    finally:
        for process, _ in reversed(started):
            stop(process)


SYSTEMS = {"pdserve": pdserve_1p1d, "vllm": plain_vllm, "vllm-disagg": vllm_example_disagg}
