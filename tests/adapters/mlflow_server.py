"""Run a real ``mlflow server`` on 127.0.0.1 for the MLflow adapter tests.

The server gets its own process group (``start_new_session=True``) so that
stopping it also stops the workers it forks; its job workers are switched off
(``MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false``), which keeps it at two processes
and about 500 MB instead of ten processes and 1.9 GB.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

START_TIMEOUT_S = 90.0
"""Measured start-up is 7-17 s on a 2-core machine; leave room for a busy one."""


@dataclass(frozen=True)
class MlflowServer:
    """A running server: its URL and where it keeps its data."""

    url: str
    backend_store_uri: str
    artifacts_dir: Path
    log_file: Path


def free_port() -> int:
    """Ask the kernel for a free TCP port on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def running_mlflow_server(root: Path) -> Iterator[MlflowServer]:
    """Start ``mlflow server`` with all its state under ``root``; stop it after.

    Args:
        root: an empty directory for the SQLite backend, artifacts and the log.

    Yields:
        The running server, healthy.

    Raises:
        RuntimeError: if the server exits or is not healthy within
            ``START_TIMEOUT_S`` seconds; the message carries its log's tail.
    """
    port = free_port()
    server = MlflowServer(
        url=f"http://127.0.0.1:{port}",
        backend_store_uri=f"sqlite:///{root / 'server.db'}",
        artifacts_dir=root / "artifacts",
        log_file=root / "server.log",
    )
    server.artifacts_dir.mkdir(parents=True, exist_ok=True)
    command = [
        *(sys.executable, "-m", "mlflow", "server"),
        *("--host", "127.0.0.1", "--port", str(port)),
        *("--backend-store-uri", server.backend_store_uri),
        *("--artifacts-destination", str(server.artifacts_dir)),
        *("--workers", "1"),
    ]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    with server.log_file.open("wb") as log:
        process = subprocess.Popen(
            command,
            cwd=root,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        _wait_healthy(server, process)
        yield server
    finally:
        _stop(process)


def _wait_healthy(server: MlflowServer, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"mlflow server exited with code {process.returncode} before "
                f"it was healthy; its log ends with:\n{_tail(server.log_file)}"
            )
        try:
            with urllib.request.urlopen(f"{server.url}/health", timeout=2) as reply:
                if reply.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            # Not listening yet: keep polling until the deadline.
            pass
        time.sleep(0.25)
    raise RuntimeError(
        f"mlflow server at {server.url} was not healthy after {START_TIMEOUT_S:.0f} "
        f"s; its log ends with:\n{_tail(server.log_file)}"
    )


def _stop(process: subprocess.Popen[bytes]) -> None:
    # The server forks workers into its process group: stop the whole group.
    for sig, wait_s in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            process.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            continue
        # The leader is gone; make sure no worker of its group survives it.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        break


def _tail(path: Path, lines: int = 30) -> str:
    text = path.read_text(errors="replace") if path.exists() else "(no log)"
    return "\n".join(text.splitlines()[-lines:])
