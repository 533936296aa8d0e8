"""Two-process DDP fits on CPU (gloo): rank zero persists and announces alone.

Lightning's DDP launcher runs the main script again for rank 1, so each fit
runs ``ddp_fit.py`` in a subprocess, in the session's LaminDB instance; the
results are read back here from LaminDB, the checkpoint folder, the file of
events and each rank's report.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

REPO = Path(__file__).parents[2]
SCRIPT = Path(__file__).with_name("ddp_fit.py")
TIMEOUT = 240
"""Seconds; a fit takes about 20. A rank stuck in a collective would wait for
gloo's default timeout, 30 minutes."""
DISTRIBUTED_ENV = ("LOCAL_RANK", "NODE_RANK", "RANK", "WORLD_SIZE", "MASTER_PORT")


@dataclass
class DdpFit:
    """What one run of ``ddp_fit.py`` left behind."""

    returncode: int | None
    stderr: str
    ranks: dict[int, dict[str, Any]] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)

    def explain(self) -> str:
        if self.returncode is None:
            return f"no exit within {TIMEOUT} s: a rank hangs\n{self.stderr[-4000:]}"
        return f"exit code {self.returncode}\n{self.stderr[-4000:]}"


def run_fit(outdir: Path, *flags: str) -> DdpFit:
    """Run ``ddp_fit.py``; on timeout kill its process group, rank 1 included."""
    env = {k: v for k, v in os.environ.items() if k not in DISTRIBUTED_ENV}
    env["OMP_NUM_THREADS"] = "1"  # two ranks share the machine with others
    process = subprocess.Popen(
        [sys.executable, str(SCRIPT), str(outdir), *flags],
        cwd=REPO,
        env=env,  # the session's LAMIN_SETTINGS_DIR and LAMIN_CURRENT_INSTANCE
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        # Rank 1 inherits the pipes: this also waits for it to exit.
        _, stderr = process.communicate(timeout=TIMEOUT)
        returncode: int | None = process.returncode
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        _, stderr = process.communicate()
        returncode = None
    fit = DdpFit(returncode, stderr)
    for path in outdir.glob("rank*.json"):
        report = json.loads(path.read_text())
        fit.ranks[report["rank"]] = report
    events = outdir / "events.jsonl"
    if events.exists():
        fit.events = [json.loads(line) for line in events.read_text().splitlines()]
    return fit


def check_ranks_agree(fit: DdpFit) -> dict[str, Any]:
    """Both ranks finished the fit and derived the same keys; returns rank 0's."""
    assert sorted(fit.ranks) == [0, 1], fit.explain()
    zero, one = fit.ranks[0], fit.ranks[1]
    assert zero["world_size"] == one["world_size"] == 2
    assert zero["pid"] != one["pid"]
    run_uid = zero["tracked_run_uid"]
    assert run_uid is not None and one["tracked_run_uid"] is None
    for name in ("run_uid", "base_prefix", "checkpoint_key_prefix", "config_key"):
        assert zero[name] == one[name], name
    assert zero["run_uid"] == run_uid
    assert zero["base_prefix"] == f"logs/lightning_logs/{run_uid}"
    assert zero["kept_keys"] == one["kept_keys"]
    assert zero["persist_failures"] == one["persist_failures"] == []
    return zero  # type: ignore[no-any-return]


def check_one_artifact_per_file(ln: ModuleType, zero: dict[str, Any]) -> None:
    """Exactly the kept checkpoints, the config and hparams.yaml are in LaminDB."""
    dirpath = Path(zero["dirpath"])
    files = sorted(p.name for p in dirpath.glob("*.ckpt"))
    assert files == ["epoch=0-step=4.ckpt", "epoch=1-step=6.ckpt"]
    prefix = zero["checkpoint_key_prefix"]
    kept = [f"{prefix}/{name}" for name in files]
    assert zero["kept_keys"] == kept

    stored = ln.Artifact.filter(key__startswith=f"{zero['base_prefix']}/")
    assert Counter(a.key for a in stored) == Counter(
        [*kept, zero["config_key"], f"{prefix}/hparams.yaml"]
    )
    run = ln.Run.filter(uid=zero["run_uid"]).one()
    for name, key in zip(files, kept, strict=True):
        artifact = ln.Artifact.filter(key=key).one()
        assert artifact.kind == "model"
        assert artifact.run == run
        assert artifact.path.read_bytes() == (dirpath / name).read_bytes()
    config = ln.Artifact.filter(key=zero["config_key"]).one()
    assert list(run.input_artifacts.all()) == [config]


def check_events_on_rank_zero(fit: DdpFit, zero: dict[str, Any]) -> None:
    """Every event reached the recorder of rank 0, none that of rank 1."""
    assert "rank-recorder" in fit.ranks[1]["plugins"]  # rank 1 listened too
    assert {(e["rank"], e["dist_rank"], e["pid"]) for e in fit.events} == {
        (0, 0, zero["pid"])
    }
    hooks = Counter(e["hook"] for e in fit.events)
    assert hooks == {
        "fit_started": 1,
        "artifact_saved": 6,
        "artifact_removed": 2,
        "fit_ended": 1,
    }
    prefix = zero["checkpoint_key_prefix"]
    saved = [e["key"] for e in fit.events if e["hook"] == "artifact_saved"]
    assert sorted(saved) == sorted(
        [
            zero["config_key"],
            f"{prefix}/hparams.yaml",
            *(f"{prefix}/epoch={e}-step={s}.ckpt" for e, s in [(0, 1), (0, 2)]),
            *zero["kept_keys"],
        ]
    )
    removed = [e["key"] for e in fit.events if e["hook"] == "artifact_removed"]
    assert removed == [f"{prefix}/epoch=0-step=1.ckpt", f"{prefix}/epoch=0-step=2.ckpt"]


@pytest.mark.slow
def test_ddp_persists_once_on_rank_zero_despite_a_failing_registrar(
    ln: ModuleType, lamin_instance: str, tmp_path: Path
) -> None:
    fit = run_fit(tmp_path, "--failing")

    assert fit.returncode == 0, fit.explain()  # no hang, no failure
    zero = check_ranks_agree(fit)
    check_one_artifact_per_file(ln, zero)
    check_events_on_rank_zero(fit, zero)
    # Each saved event failed in the registrar on rank 0, after its retries.
    saved = [e["key"] for e in fit.events if e["hook"] == "artifact_saved"]
    assert zero["delivery_failures"] == [
        ["failing-registrar", "lamin_lightning_artifact_saved", key, "ConnectionError"]
        for key in saved
    ]
    assert fit.ranks[1]["delivery_failures"] == []


@pytest.mark.slow
def test_ddp_with_lightning_cli_persists_the_config_once(
    ln: ModuleType, lamin_instance: str, tmp_path: Path
) -> None:
    fit = run_fit(tmp_path, "--cli")

    assert fit.returncode == 0, fit.explain()
    zero = check_ranks_agree(fit)
    check_one_artifact_per_file(ln, zero)
    check_events_on_rank_zero(fit, zero)
