"""Two fits at once against one LaminDB instance on a real PostgreSQL server.

Two "machines" (working folders) train with the same configuration, so their
checkpoint files have the same names; only the run UID in the key tells them
apart. The server is a throwaway cluster on 127.0.0.1 that this module starts
and stops; ``.ci/run`` installs its binaries. Without them the test is
skipped on a developer machine and fails in CI (``CI`` set).

The test process is connected to the session's SQLite instance, so the fits
and the final check run in subprocesses (``pg_fit.py``) with the PostgreSQL
instance's own LaminDB settings folder.
"""

from __future__ import annotations

import glob
import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from lamin_lightning_core._journal import find_journals, read

REPO = Path(__file__).parents[2]
SCRIPT = Path(__file__).with_name("pg_fit.py")
FITS = 2
TIMEOUT = 300
"""Seconds for each subprocess; ``lamin init`` on PostgreSQL takes about 17,
a fit about 15."""


@dataclass(frozen=True)
class Server:
    """A throwaway PostgreSQL cluster: its binaries, folder and port."""

    bindir: Path
    root: Path
    user: str | None
    port: int

    @property
    def data(self) -> Path:
        return self.root / "data"

    def url(self, database: str) -> str:
        # "@127.0.0.1" makes lamindb treat the instance as local: no hub calls
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def run(self, tool: str, *args: Any) -> None:
        """Run a server tool as the server's user; fail with its output."""
        done = subprocess.run(
            [str(self.bindir / tool), *map(str, args)],
            cwd=self.root,
            user=self.user,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if done.returncode != 0:
            log = self.root / "server.log"
            server_log = log.read_text() if log.exists() else ""
            pytest.fail(f"{tool} failed:\n{done.stdout}{done.stderr}\n{server_log}")


def find_bindir() -> Path | None:
    """The newest PostgreSQL server binaries: Debian's layout, then PATH."""
    debian = glob.glob("/usr/lib/postgresql/*/bin/pg_ctl")
    debian.sort(key=lambda p: [int(s) for s in Path(p).parts[-3].split(".")])
    candidates = [Path(p).parent for p in reversed(debian)]
    if on_path := shutil.which("pg_ctl"):
        candidates.append(Path(on_path).resolve().parent)
    for bindir in candidates:
        if all((bindir / tool).exists() for tool in ("initdb", "pg_ctl", "createdb")):
            return bindir
    return None


def unavailable(reason: str) -> None:
    """Skip on a developer machine; fail in CI, which must run this test."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set: this test must not be skipped)")
    pytest.skip(reason)


def server_user() -> str | None:
    """Who runs the server: this user, or ``postgres`` if we are root."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        unavailable("running as root, and there is no `postgres` user to run as")
    return "postgres"  # the server refuses to run as root


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="module")
def postgres() -> Iterator[Server]:
    """initdb and start a cluster under a temp folder; stop and remove after."""
    bindir = find_bindir()
    if bindir is None:
        unavailable(
            "PostgreSQL server binaries (initdb, pg_ctl) are not under "
            "/usr/lib/postgresql/*/bin or on PATH: apt-get install postgresql"
        )
    user = server_user()
    root = Path(tempfile.mkdtemp(prefix="ll-postgres-"))
    if user is not None:
        owner = pwd.getpwnam(user)
        os.chown(root, owner.pw_uid, owner.pw_gid)
    server = Server(bindir, root, user, free_port())
    server.run(
        "initdb",
        "-D",
        server.data,
        "-U",
        "postgres",
        "--auth=trust",
        "-E",
        "UTF8",
        "--no-locale",
        "--no-sync",
    )
    # -F: no fsync; -k: the socket goes into our folder, not /var/run
    options = f"-h 127.0.0.1 -p {server.port} -k {root} -F"
    log = root / "server.log"
    try:
        server.run("pg_ctl", "start", "-w", "-D", server.data, "-l", log, "-o", options)
        yield server
    finally:
        subprocess.run(
            [str(bindir / "pg_ctl"), "stop", "-m", "fast", "-D", str(server.data)],
            cwd=root,
            user=user,
            capture_output=True,
            timeout=120,
        )
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def pg_instance(
    postgres: Server, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, str]:
    """A LaminDB instance in a new database; the environment its processes use."""
    postgres.run(
        "createdb", "-h", "127.0.0.1", "-p", postgres.port, "-U", "postgres", "lamin"
    )
    root = tmp_path_factory.mktemp("pg-instance")
    name = f"ll-pg-{os.getpid()}"
    env = {k: v for k, v in os.environ.items() if k != "LAMIN_CURRENT_INSTANCE"}
    env["LAMIN_SETTINGS_DIR"] = str(root / "settings")
    env["LAMIN_CACHE_DIR"] = str(root / "cache")
    env["OMP_NUM_THREADS"] = "1"  # two fits share the machine
    command = [sys.executable, "-m", "lamin_cli", "init", "--storage"]
    command += [str(root / "storage"), "--db", postgres.url("lamin"), "--name", name]
    done = subprocess.run(
        command, cwd=root, env=env, capture_output=True, text=True, timeout=TIMEOUT
    )
    assert done.returncode == 0, done.stdout + done.stderr
    env["LAMIN_CURRENT_INSTANCE"] = f"anonymous/{name}"
    return env


def fit_at_once(env: dict[str, str], machines: list[Path]) -> list[str]:
    """Run one fit in each folder, all at once; return their run UIDs."""
    barrier = machines[0].parent / "barrier"
    barrier.mkdir()
    command = [sys.executable, str(SCRIPT), "fit", str(barrier), str(len(machines))]
    processes = []
    for machine in machines:
        machine.mkdir()
        processes.append(
            subprocess.Popen(
                command,
                cwd=machine,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    try:
        outputs = [p.communicate(timeout=TIMEOUT) for p in processes]
    finally:
        for process in processes:
            process.kill()  # no-op for those that exited
    for process, (_, stderr) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, stderr[-4000:]
    return [
        line.split()[1]
        for out, _ in outputs
        for line in out.splitlines()
        if line.startswith("RUN ")
    ]


def check(env: dict[str, str], run_uids: list[str]) -> dict[str, Any]:
    """What LaminDB holds for these runs (``pg_fit.py check``)."""
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "check", *run_uids],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.splitlines()[-1])


def assert_intact(found: dict[str, Any], uid: str, machine: Path) -> set[str]:
    """Each kept file of the run is its output artifact, once; return the keys."""
    keys = Counter(a["key"] for a in found["artifacts"])
    assert all(count == 1 for count in keys.values()), keys  # none twice
    prefix = f"ckpts/{uid}/checkpoints/"
    assert all(key.startswith(prefix) for key in keys), keys
    on_disk = {path.name for path in (machine / "ckpts").glob("*.ckpt")}
    assert {key.removeprefix(prefix) for key in keys} == on_disk  # none lost
    assert len(keys) == 2  # save_top_k
    assert all(a["run"] == uid for a in found["artifacts"])
    assert found["outputs"] == sorted(keys)
    # ranks were written per run, none mixed with the other run's
    assert all(
        len(values) == 1 for key in keys for values in found["features"][key].values()
    ), found["features"]
    best = [k for k in keys if found["features"][k]["is_best_model"] == [True]]
    assert best == [f"{prefix}epoch=0-step=6.ckpt"]
    journals = find_journals(machine / "ckpts")
    assert journals and all(e.complete for j in journals for e in read(j))
    return set(keys)


@pytest.mark.slow
def test_two_concurrent_fits_collide_on_no_key_and_lose_nothing(
    pg_instance: dict[str, str], tmp_path: Path
) -> None:
    machines = [tmp_path / f"machine-{n}" for n in range(FITS)]
    run_uids = fit_at_once(pg_instance, machines)
    assert len(set(run_uids)) == FITS, run_uids

    report = check(pg_instance, run_uids)
    spans = [report["runs"][uid]["span"] for uid in run_uids]
    assert max(start for start, _ in spans) < min(end for _, end in spans)  # at once
    first, second = (
        assert_intact(report["runs"][uid], uid, machine)
        for uid, machine in zip(run_uids, machines, strict=True)
    )
    assert not first & second
    # both processes created the auto-features at once: each exists once
    assert report["feature_types"] == 1
    assert report["features"] == report["expected_features"]
