"""The journal and replay: nothing lost when a plugin or the persister fails.

The tracked plugin here is the third-party recorder (``tests/recorder_plugin``),
installed by entry point: it appends each event to ``$LL_RECORDER_FILE`` and
raises ``IsADirectoryError`` while that variable points at a folder, which is
how these tests break it and fix it again.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import lamin_lightning_core as ll
from lamin_lightning_core._bus import Retry
from lamin_lightning_core._console import app
from lamin_lightning_core._journal import Journal, find_journals, journal_dir, read
from lamin_lightning_core._staging import STAGING_DIRNAME
from tests.helpers import fit

BACKENDS = ["lamindb", "wandb", "mlflow", "clearml"]
NO_RETRY = Retry(attempts=1)


def recorded(path: Path) -> list[tuple[str, str]]:
    """(event type, key) of each event the recorder wrote, in order."""
    if not path.is_file():
        return []
    lines = path.read_text().splitlines()
    events = [json.loads(line) for line in lines]
    return [(e["event_type"], e["key"]) for e in events if "key" in e]


@pytest.fixture
def recorder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The recorder's file; the recorder is broken until a test sets it."""
    broken = tmp_path / "recorder-is-broken"
    broken.mkdir()
    monkeypatch.setenv("LL_RECORDER_FILE", str(broken))
    return tmp_path / "recorded.jsonl"


def broken_fit(root: Path, **kwargs: Any) -> ll.Checkpoint:
    checkpoint = ll.Checkpoint(
        monitor="score",
        save_top_k=2,
        every_n_train_steps=1,
        disable_plugins=BACKENDS,
        retry=NO_RETRY,
        **kwargs,
    )
    with pytest.warns(ll.PluginDeliveryWarning, match="'recorder'"):
        fit([checkpoint], root, steps=4, scores=[4, 3, 2, 1])
    return checkpoint


def test_journal_records_are_read_back_and_a_cut_line_is_skipped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    journal = Journal()
    journal.write("save", journal.next_seq(), key="a")  # buffered until open
    path = journal.open(tmp_path, "run1")
    journal.write("persisted", 1, event={}, targets=["recorder", "other"])
    journal.write("delivered", 1, plugin="recorder")
    journal.write("save", journal.next_seq(), key="b")
    journal.close()
    with path.open("a") as stream:
        stream.write('{"op": "delivered", "seq": 1, "plu')  # killed mid-line

    with caplog.at_level(logging.WARNING):
        entries = read(path)

    assert [(e.seq, e.op, e.record.get("key")) for e in entries] == [
        (1, "save", "a"),
        (2, "save", "b"),
    ]
    assert entries[0].missing == ["other"]
    assert not entries[0].complete and not entries[1].complete
    assert f"{path}:5: not a journal record" in caplog.text
    reopened = Journal.reopen(path)
    assert reopened.next_seq() == 3
    reopened.close()


def test_a_failing_plugin_loses_nothing_and_replay_delivers_it_once(
    tmp_path: Path, recorder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkpoint = broken_fit(tmp_path)
    saves, evictions = 4, 2
    artifact_hooks = {
        "lamin_lightning_artifact_saved",
        "lamin_lightning_artifact_removed",
    }
    failed = [f for f in checkpoint.delivery_failures if f.hook in artifact_hooks]
    assert len(failed) == saves + evictions
    assert {f.plugin for f in failed} == {"recorder"}
    assert checkpoint.journal_path is not None
    assert checkpoint.journal_path.parent == journal_dir(Path(checkpoint.dirpath))
    assert {p.suffix for p in Path(checkpoint.dirpath).iterdir()} == {".ckpt"}
    pending = [e for e in read(checkpoint.journal_path) if not e.complete]
    assert [e.missing for e in pending] == [["recorder"]] * (saves + evictions)

    monkeypatch.setenv("LL_RECORDER_FILE", str(recorder))  # the fix
    command = ["replay", str(tmp_path)]
    for name in BACKENDS:
        command += ["--disable", name]
    first = CliRunner().invoke(app, command)
    again = CliRunner().invoke(app, command)

    assert first.exit_code == 0, first.output
    assert "lamin-lightning replay" in first.output
    keys = [f"checkpoints/epoch=0-step={n}.ckpt" for n in range(1, 5)]
    assert recorded(recorder) == [
        ("artifact_saved", keys[0]),
        ("artifact_saved", keys[1]),
        ("artifact_saved", keys[2]),
        ("artifact_removed", keys[0]),
        ("artifact_saved", keys[3]),
        ("artifact_removed", keys[1]),
    ]
    assert again.exit_code == 0 and "Nothing to replay" in again.output
    assert len(recorded(recorder)) == saves + evictions


@pytest.mark.filterwarnings("ignore:Checkpoint directory .* is not empty")
def test_the_next_fit_in_the_folder_delivers_what_the_last_one_missed(
    tmp_path: Path, recorder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    broken_fit(tmp_path, dirpath=tmp_path / "ckpts", filename="first-{step}")
    monkeypatch.setenv("LL_RECORDER_FILE", str(recorder))

    second = ll.Checkpoint(
        monitor="score",
        dirpath=tmp_path / "ckpts",
        filename="second-{step}",
        every_n_train_steps=1,
        disable_plugins=BACKENDS,
    )
    fit([second], tmp_path, steps=1)

    events = recorded(recorder)
    assert len(events) == 7
    assert all("/first-step=" in key for _, key in events[:6])  # 4 saves, 2 evictions
    assert events[6][1].endswith("/second-step=1.ckpt")
    journals = find_journals(tmp_path / "ckpts")
    assert len(journals) == 2
    assert all(e.complete for path in journals for e in read(path))


class FlakyPersister:
    """Fails the first ``failures`` calls with ``error``, then keeps files."""

    def __init__(self, failures: int, error: Exception) -> None:
        self.failures = failures
        self.error = error
        self.calls = 0
        self.stored: dict[str, bytes] = {}

    @ll.hookimpl(tryfirst=True)
    def lamin_lightning_persist_artifact(
        self, request: ll.PersistRequest
    ) -> ll.PersistedArtifact:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        self.stored[request.key] = request.local_path.read_bytes()
        return ll.PersistedArtifact(storage_uri=f"memory://{request.key}")

    @ll.hookimpl(tryfirst=True)
    def lamin_lightning_delete_artifact(self, event: ll.ArtifactRemovedEvent) -> bool:
        self.stored.pop(event.key, None)  # a failed save may have stored nothing
        return True


def test_a_persister_that_fails_once_is_retried(tmp_path: Path) -> None:
    persister = FlakyPersister(1, PermissionError("storage is read-only"))
    checkpoint = ll.Checkpoint(
        monitor="score",
        every_n_train_steps=1,
        save_top_k=-1,
        disable_plugins=[*BACKENDS, "recorder"],
        retry=Retry(attempts=2, backoff=0),
    )
    checkpoint.plugin_manager.register(persister)
    fit([checkpoint], tmp_path, steps=3)

    assert persister.calls == 4
    assert sorted(persister.stored) == [
        f"checkpoints/epoch=0-step={n}.ckpt" for n in (1, 2, 3)
    ]
    assert checkpoint.persist_failures == []


def test_a_failing_persister_keeps_files_for_replay_unless_strict(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    down = FlakyPersister(10**6, RuntimeError("backend is down"))
    checkpoint = ll.Checkpoint(
        monitor="score",
        every_n_train_steps=1,
        save_top_k=2,
        disable_plugins=[*BACKENDS, "recorder"],
        plugins=[down],
        retry=NO_RETRY,
    )
    with caplog.at_level(logging.ERROR):
        fit([checkpoint], tmp_path, steps=3, scores=[3, 2, 1])

    assert len(checkpoint.persist_failures) == 3
    assert "backend is down" in caplog.text and "lamin-lightning replay" in caplog.text
    staged = sorted((tmp_path / "checkpoints" / STAGING_DIRNAME).iterdir())
    assert len(staged) == 3  # the evicted step=1 too: its bytes were never stored
    kept = {p.name for p in Path(checkpoint.dirpath).glob("*.ckpt")}
    assert kept == {"epoch=0-step=2.ckpt", "epoch=0-step=3.ckpt"}

    up = FlakyPersister(0, RuntimeError("unused"))
    (report,) = ll.replay(tmp_path, plugins=[up], disable=[*BACKENDS, "recorder"])

    assert report.ok and report.persisted == 2
    assert report.deleted == 1  # step=1, evicted: made sure it is not stored
    assert sorted(up.stored) == [f"checkpoints/{name}" for name in sorted(kept)]
    for name in kept:
        stored = up.stored[f"checkpoints/{name}"]
        assert stored == (Path(checkpoint.dirpath) / name).read_bytes()
    assert not (tmp_path / "checkpoints" / STAGING_DIRNAME).exists()
    assert ll.replay(tmp_path, plugins=[up], disable=[*BACKENDS, "recorder"]) == []


def test_the_journal_of_a_running_fit_is_left_alone(
    tmp_path: Path, recorder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Found with two fits sharing a checkpoint folder: the second one's resume
    # replayed the first one's live journal and persisted an evicted file.
    checkpoint = broken_fit(tmp_path)
    assert checkpoint.journal_path is not None
    running = Journal.reopen(checkpoint.journal_path)  # as the fit held it
    assert running is not None
    monkeypatch.setenv("LL_RECORDER_FILE", str(recorder))

    assert ll.replay(tmp_path, disable=BACKENDS) == []
    assert recorded(recorder) == []
    assert Journal.reopen(checkpoint.journal_path) is None

    running.close()
    (report,) = ll.replay(tmp_path, disable=BACKENDS)
    assert report.ok and len(recorded(recorder)) == 6


def test_replay_releases_staged_files_that_a_killed_fit_left(tmp_path: Path) -> None:
    # Found by a new user: after SIGKILL, a save that was persisted and
    # announced kept its staged hard link, holding the bytes of a checkpoint
    # that Lightning had evicted, and replay never removed it.
    checkpoint = ll.Checkpoint(
        every_n_train_steps=1, save_top_k=-1, disable_plugins=[*BACKENDS, "recorder"]
    )
    fit([checkpoint], tmp_path, steps=2)
    assert checkpoint.journal_path is not None
    first = next(e for e in read(checkpoint.journal_path) if e.op == "save")
    staged = Path(first.record["request"]["local_path"])
    staged.parent.mkdir()
    os.link(first.record["original"], staged)  # killed before its release

    (report,) = ll.replay(tmp_path, disable=[*BACKENDS, "recorder"])

    assert report.ok and report.persisted == 0
    assert not staged.parent.exists()
    assert ll.replay(tmp_path, disable=[*BACKENDS, "recorder"]) == []
