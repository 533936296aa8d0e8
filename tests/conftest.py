"""Session-wide setup: one throwaway LaminDB instance, isolated settings.

The LaminDB settings folder is read when ``lamindb_setup`` is imported, so the
environment is prepared here, at conftest import, before any test module
imports lamindb. The instance itself is created by ``lamin init`` in a
subprocess (importing lamindb before init breaks ``ln.track`` under pytest).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

SESSION_ROOT = Path(tempfile.mkdtemp(prefix="lamin-lightning-tests-"))
INSTANCE = f"ll-tests-{os.getpid()}"
os.environ["LAMIN_SETTINGS_DIR"] = str(SESSION_ROOT / "settings")
os.environ["LAMIN_CACHE_DIR"] = str(SESSION_ROOT / "cache")
os.environ.pop("LAMIN_CURRENT_INSTANCE", None)
# The third-party recorder plugin (tests/recorder_plugin) stays silent unless
# a test points it at a file.
os.environ.pop("LL_RECORDER_FILE", None)
for name in ("LAMIN_LIGHTNING_DISABLE_PLUGINS", "LAMIN_LIGHTNING_DISABLE_AUTOLOAD"):
    os.environ.pop(name, None)


@pytest.fixture(scope="session", autouse=True)
def lamin_instance() -> Iterator[str]:
    """Create the session's LaminDB instance before any test runs."""
    subprocess.run(
        [
            sys.executable,  # the lamin CLI of this interpreter, PATH or not
            "-m",
            "lamin_cli",
            "init",
            "--storage",
            str(SESSION_ROOT / "storage"),
            "--name",
            INSTANCE,
        ],
        check=True,
        capture_output=True,
        cwd=SESSION_ROOT,  # lamin init leaves a marker in its working directory
    )
    os.environ["LAMIN_CURRENT_INSTANCE"] = f"anonymous/{INSTANCE}"
    yield INSTANCE
    shutil.rmtree(SESSION_ROOT, ignore_errors=True)


@pytest.fixture(scope="session")
def ln(lamin_instance: str) -> ModuleType:
    """The ``lamindb`` module, connected to the session instance, offline-safe."""
    from lamin_lightning_adapters.lamindb import mark_local_instance_offline_safe

    mark_local_instance_offline_safe()
    import lamindb

    return lamindb


def track(ln: ModuleType) -> Any:
    """Start a new ``ln.track()`` run and return it.

    lamindb keys the transform of a pytest session by the pytest script but
    hashes the source of the file that calls ``ln.track()``; calling it from
    this one file keeps that hash stable within a session.
    """
    ln.track()
    return ln.context.run


@pytest.fixture
def tracked_run(ln: ModuleType) -> Iterator[Any]:
    """A fresh ``ln.track()`` run for one test."""
    yield track(ln)
    ln.finish()


@pytest.fixture
def new_run(ln: ModuleType) -> Any:
    """A function that finishes the current run and starts another one."""

    def start() -> Any:
        ln.finish()  # closes the run's log capture before the next run opens one
        return track(ln)

    return start


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Record and refuse every outgoing connection attempt but loopback."""
    import socket

    attempts: list[Any] = []
    real_connect = socket.socket.connect

    def guarded(self: socket.socket, address: Any) -> Any:
        host = address[0] if isinstance(address, tuple) else address
        if isinstance(host, str) and host in ("127.0.0.1", "::1", "localhost"):
            return real_connect(self, address)
        attempts.append(address)
        raise OSError(f"network disabled in this test: {address}")

    monkeypatch.setattr(socket.socket, "connect", guarded)
    return attempts
