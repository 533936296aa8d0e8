"""SIGKILL between writing a checkpoint and delivering it, then a resume."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import ModuleType
from typing import Any

import lightning.pytorch as pl
import pytest

import lamin_lightning_core as ll
from lamin_lightning_core._journal import find_journals, read
from tests.helpers import QUIET, ScriptedModule, fit, loader

REPO = Path(__file__).parents[2]
REGISTRARS = ["wandb", "mlflow", "clearml", "recorder"]


def journaled_saves(root: Path) -> dict[str, bool]:
    """Key of each checkpoint save in the journals, and whether it was evicted."""
    saves = {}
    for path in find_journals(root):
        for entry in read(path):
            if entry.op == "save" and entry.record["request"]["kind"] == "checkpoint":
                saves[entry.record["request"]["key"]] = entry.evicted
    return saves


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Checkpoint directory .* is not empty")
@pytest.mark.filterwarnings("ignore:.*resuming from a checkpoint that ended before")
def test_a_killed_fit_resumes_with_nothing_lost_or_duplicated(
    ln: ModuleType, tracked_run: Any, tmp_path: Path
) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tests.reliability.killed_fit", str(tmp_path), "4"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    (killed_run,) = [line.split()[1] for line in lines if line.startswith("RUN ")]
    before = journaled_saves(tmp_path)
    assert len(before) == 4  # the 4th was journaled before the kill
    (journal,) = find_journals(tmp_path)
    undelivered = [e for e in read(journal) if e.op == "save" and e.done is None]
    assert undelivered  # killed before the worker persisted it

    resumed = ll.Checkpoint(
        monitor="score",
        save_top_k=2,
        every_n_train_steps=1,
        dirpath=tmp_path / "ckpts",
        disable_plugins=REGISTRARS,
    )
    trainer = pl.Trainer(
        default_root_dir=tmp_path,
        max_steps=6,
        callbacks=[resumed],
        logger=False,
        **QUIET,
    )
    last = max((tmp_path / "ckpts").glob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    trainer.fit(ScriptedModule([9, 8, 7, 6, 5, 4, 3, 2]), loader(), ckpt_path=last)

    saves = journaled_saves(tmp_path)
    keys = Counter(a.key for a in ln.Artifact.filter(key__in=list(saves), kind="model"))
    assert all(count == 1 for count in keys.values()), keys  # 0 duplicated
    kept = {key for key, evicted in saves.items() if not evicted}
    assert set(keys) == kept  # 0 lost, and evictions mirrored
    killed = ln.Artifact.filter(key=max(before), kind="model").one()
    assert killed.run.uid == killed_run  # persisted into the run that wrote it
    assert all(e.complete for path in find_journals(tmp_path) for e in read(path))


def test_a_save_persisted_but_not_journaled_is_deleted_once_evicted(
    ln: ModuleType, tracked_run: Any, tmp_path: Path
) -> None:
    # Found by the test above: the fit died after LaminDB stored step=1 and
    # before the journal said so; Lightning evicted step=1 later, and replay
    # took the save for never persisted, so its artifact stayed.
    checkpoint = ll.Checkpoint(
        every_n_train_steps=1, save_top_k=-1, disable_plugins=REGISTRARS
    )
    fit([checkpoint], tmp_path, steps=2)
    assert checkpoint.journal_path is not None
    records = [
        json.loads(line) for line in checkpoint.journal_path.read_text().splitlines()
    ]
    first = next(r["seq"] for r in records if r["op"] == "save")
    marks = {"persisted", "delivered", "failed"}
    kept = [r for r in records if not (r["seq"] == first and r["op"] in marks)]
    kept.append({"op": "remove", "seq": records[-1]["seq"] + 1, "save": first})
    checkpoint.journal_path.write_text("".join(json.dumps(r) + "\n" for r in kept))
    (tmp_path / "checkpoints" / "epoch=0-step=1.ckpt").unlink()  # the eviction
    stray = f"{tracked_run.uid}/checkpoints/epoch=0-step=1.ckpt"
    assert ln.Artifact.filter(key=stray).count() == 1

    (report,) = ll.replay(tmp_path, disable=REGISTRARS)

    assert report.ok and report.deleted == 1
    assert ln.Artifact.filter(key=stray).count() == 0
    assert ln.Artifact.filter(key=stray.replace("step=1", "step=2")).count() == 1
    assert ll.replay(tmp_path, disable=REGISTRARS) == []
