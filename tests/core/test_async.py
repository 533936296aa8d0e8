"""Persistence off the training thread: order, flush, staging, back-pressure."""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.plugins.io import AsyncCheckpointIO, TorchCheckpointIO

import lamin_lightning_core as ll
from lamin_lightning_core import _worker
from lamin_lightning_core._journal import read
from lamin_lightning_core._staging import STAGING_DIRNAME, Stager
from tests.helpers import QUIET, ScriptedModule, fit, loader

LOCAL_ONLY = ["lamindb", "wandb", "mlflow", "clearml"]
REGISTRARS = ["wandb", "mlflow", "clearml"]
WORKER = "lamin-lightning-checkpoint"


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def staged_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and STAGING_DIRNAME in p.parts]


def lightnings_file(staged: Path) -> Path:
    """The file a staged name stands for: ``<dir>/<staging>/<token>-<n>-<name>``."""
    if staged.parent.name != STAGING_DIRNAME:
        return staged  # synchronous mode persists Lightning's file itself
    return staged.parent.parent / staged.name.split("-", 2)[2]


def worker_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == WORKER]


class EventLog:
    """Every broadcast, in arrival order, with the thread it arrived on."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Any, str]] = []
        self.ended: list[ll.FitEndedEvent] = []

    def _add(self, kind: str, event: Any) -> None:
        self.events.append((kind, event, threading.current_thread().name))

    @ll.hookimpl
    def lamin_lightning_artifact_saved(self, event: ll.ArtifactSavedEvent) -> None:
        self._add("saved", event)

    @ll.hookimpl
    def lamin_lightning_artifact_removed(self, event: ll.ArtifactRemovedEvent) -> None:
        self._add("removed", event)

    @ll.hookimpl
    def lamin_lightning_fit_ended(self, event: ll.FitEndedEvent) -> None:
        self.ended.append(event)

    def saved(self) -> list[ll.ArtifactSavedEvent]:
        return [e for kind, e, _ in self.events if kind == "saved"]

    def removed(self) -> list[ll.ArtifactRemovedEvent]:
        return [e for kind, e, _ in self.events if kind == "removed"]


class SlowPersister:
    """Takes ``delay`` seconds per file and keeps a digest of what it read."""

    def __init__(self, delay: float = 0.15, fail_at: int | None = None) -> None:
        self.delay = delay
        self.fail_at = fail_at
        self.requests: list[ll.PersistRequest] = []
        self.persisted: list[tuple[str, str]] = []
        self.original_gone: list[bool] = []

    @ll.hookimpl(tryfirst=True)
    def lamin_lightning_persist_artifact(
        self, request: ll.PersistRequest
    ) -> ll.PersistedArtifact:
        self.requests.append(request)
        if len(self.requests) == self.fail_at:
            raise RuntimeError("disk on fire")
        time.sleep(self.delay)
        original = lightnings_file(request.local_path)
        self.original_gone.append(not original.exists())
        self.persisted.append((request.key, digest(request.local_path)))
        return ll.PersistedArtifact(storage_uri=f"memory://{request.key}")

    @ll.hookimpl(tryfirst=True)
    def lamin_lightning_delete_artifact(self, event: ll.ArtifactRemovedEvent) -> bool:
        return True


class SavedDigests(ll.Checkpoint):
    """Records, on the training thread, the bytes Lightning just wrote."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.written: list[tuple[str, str]] = []
        self.threads: set[str] = set()

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        key = self.key_for("checkpoint", filepath)
        self.written.append((key, digest(Path(filepath))))

    def on_artifact_saved(self, event: ll.ArtifactSavedEvent) -> None:
        self.threads.add(threading.current_thread().name)


class Crashing(ScriptedModule):
    """Raises ``error`` in the training step at global step ``at``."""

    def __init__(self, error: BaseException, at: int) -> None:
        super().__init__(scores=[5, 4, 3, 2, 1])
        self.error, self.at = error, at

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.global_step == self.at:
            raise self.error
        return super().training_step(batch, batch_idx)


class InPlaceIO(TorchCheckpointIO):
    """Writes into the existing file (truncating it), unlike Lightning's IO."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None
    ) -> None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "r+b" if os.path.exists(path) else "wb") as file:
            file.truncate(0)
            torch.save(checkpoint, file)


class SlowIO(TorchCheckpointIO):
    """Takes ``delay`` seconds before it writes a file."""

    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None
    ) -> None:
        time.sleep(self.delay)
        super().save_checkpoint(checkpoint, path, storage_options)


def trainer_for(callback: ll.Checkpoint, root: Path, **kwargs: Any) -> pl.Trainer:
    return pl.Trainer(
        default_root_dir=root, callbacks=[callback], logger=False, **QUIET, **kwargs
    )


@pytest.fixture
def sigint() -> Iterator[None]:
    """Lightning ignores SIGINT after a KeyboardInterrupt; restore it."""
    previous = signal.getsignal(signal.SIGINT)
    yield
    signal.signal(signal.SIGINT, previous)


def test_events_of_a_key_arrive_in_order_off_the_training_thread(
    tmp_path: Path,
) -> None:
    log, persister = EventLog(), SlowPersister(delay=0.05)
    checkpoint = ll.Checkpoint(
        monitor="score",
        save_top_k=2,
        every_n_train_steps=1,
        plugins=[persister, log],
        disable_plugins=LOCAL_ONLY,
    )
    fit([checkpoint], tmp_path, steps=8, scores=[8, 7, 6, 5, 4, 3, 2, 1])

    saved, removed = log.saved(), log.removed()
    assert [e.global_step for e in saved] == list(range(1, 9))
    assert {e.key for e in removed} <= {e.key for e in saved}
    assert len(removed) == 6
    positions = {(kind, e.key): i for i, (kind, e, _) in enumerate(log.events)}
    for event in removed:
        assert positions[("saved", event.key)] < positions[("removed", event.key)]
    assert {thread for *_, thread in log.events} == {WORKER}
    assert [e.status for e in log.ended] == ["finished"]


def test_fit_returns_with_everything_delivered_and_no_staged_file(
    tmp_path: Path,
) -> None:
    log, persister = EventLog(), SlowPersister(delay=0.1)
    checkpoint = ll.Checkpoint(
        save_top_k=-1,
        every_n_train_steps=1,
        plugins=[persister, log],
        disable_plugins=LOCAL_ONLY,
    )
    fit([checkpoint], tmp_path, steps=5)

    assert [e.global_step for e in log.saved()] == [1, 2, 3, 4, 5]
    assert checkpoint.last_event("checkpoint") is log.saved()[-1]
    assert checkpoint.last_artifact_event is log.saved()[-1]
    assert staged_files(tmp_path) == []
    assert not list(tmp_path.rglob(STAGING_DIRNAME))
    assert worker_threads() == []


def test_staged_file_is_persisted_and_the_event_names_lightnings_file(
    tmp_path: Path,
) -> None:
    log, persister = EventLog(), SlowPersister(delay=0)
    checkpoint = ll.Checkpoint(
        every_n_train_steps=1, plugins=[persister, log], disable_plugins=LOCAL_ONLY
    )
    fit([checkpoint], tmp_path, steps=1)

    [request] = persister.requests
    [event] = log.saved()
    assert request.local_path.parent.name == STAGING_DIRNAME
    assert lightnings_file(request.local_path) == event.local_path
    assert event.local_path == Path(checkpoint.dirpath, event.local_path.name)
    assert event.local_path.is_file()


def test_async_checkpoint_io_files_are_persisted_once_complete(
    tmp_path: Path,
) -> None:
    log, persister = EventLog(), SlowPersister(delay=0)
    checkpoint = ll.Checkpoint(
        monitor="score",
        save_top_k=2,
        every_n_train_steps=1,
        plugins=[persister, log],
        disable_plugins=LOCAL_ONLY,
    )
    io = AsyncCheckpointIO(SlowIO(delay=0.2))
    trainer = trainer_for(checkpoint, tmp_path, max_steps=4, plugins=[io])
    trainer.fit(ScriptedModule([4, 3, 2, 1]), loader())

    assert [e.global_step for e in log.saved()] == [1, 2, 3, 4]
    assert [e.global_step for e in log.removed()] == [1, 2]
    kept = {p.name: digest(p) for p in Path(checkpoint.dirpath).glob("*.ckpt")}
    persisted = dict(persister.persisted)
    assert kept == {
        key.rsplit("/", 1)[1]: persisted[key]
        for key in persisted
        if key.endswith(("step=3.ckpt", "step=4.ckpt"))
    }
    assert not list(tmp_path.rglob(STAGING_DIRNAME))


def test_local_persister_uri_points_at_lightnings_file(tmp_path: Path) -> None:
    log = EventLog()
    checkpoint = ll.Checkpoint(plugins=[log], disable_plugins=LOCAL_ONLY)
    fit([checkpoint], tmp_path, steps=1)

    [event] = log.saved()
    assert event.storage_uri == event.local_path.as_uri()
    assert STAGING_DIRNAME not in event.storage_uri


def test_exception_in_training_flushes_what_was_saved(tmp_path: Path) -> None:
    log, persister = EventLog(), SlowPersister(delay=0.15)
    checkpoint = ll.Checkpoint(
        monitor="score",
        save_top_k=-1,
        every_n_train_steps=1,
        plugins=[persister, log],
        disable_plugins=LOCAL_ONLY,
    )
    trainer = trainer_for(checkpoint, tmp_path, max_steps=10)
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(Crashing(RuntimeError("boom"), at=4), loader())

    assert [e.global_step for e in log.saved()] == [1, 2, 3, 4]
    assert [e.status for e in log.ended] == ["failed"]
    assert staged_files(tmp_path) == []
    assert worker_threads() == []


def test_keyboard_interrupt_flushes_what_was_saved(
    tmp_path: Path, sigint: None
) -> None:
    log, persister = EventLog(), SlowPersister(delay=0.15)
    checkpoint = ll.Checkpoint(
        save_top_k=-1,
        every_n_train_steps=1,
        plugins=[persister, log],
        disable_plugins=LOCAL_ONLY,
    )
    trainer = trainer_for(checkpoint, tmp_path, max_steps=10)
    with pytest.raises(SystemExit):  # Lightning exits after a graceful shutdown
        trainer.fit(Crashing(KeyboardInterrupt(), at=3), loader())

    assert [e.global_step for e in log.saved()] == [1, 2, 3]
    assert [e.status for e in log.ended] == ["interrupted"]
    assert staged_files(tmp_path) == []


def test_no_file_is_lost_when_eviction_comes_before_persistence(
    tmp_path: Path,
) -> None:
    persister = SlowPersister(delay=0.15)
    checkpoint = SavedDigests(
        monitor="score",
        save_top_k=1,
        every_n_train_steps=1,
        plugins=[persister],
        disable_plugins=LOCAL_ONLY,
    )
    fit([checkpoint], tmp_path, steps=6, scores=[6, 5, 4, 3, 2, 1])

    assert len(persister.persisted) == 6
    assert persister.persisted == checkpoint.written
    assert any(persister.original_gone)  # Lightning had deleted it already
    assert len(list(Path(checkpoint.dirpath).glob("*.ckpt"))) == 1
    assert checkpoint.threads == {WORKER}


def test_a_file_rewritten_in_place_keeps_its_staged_bytes(tmp_path: Path) -> None:
    persister = SlowPersister(delay=0.1)
    checkpoint = SavedDigests(
        save_top_k=0,
        save_last=True,
        every_n_train_steps=1,
        plugins=[persister],
        disable_plugins=LOCAL_ONLY,
    )
    trainer = trainer_for(checkpoint, tmp_path, max_steps=4, plugins=[InPlaceIO()])
    trainer.fit(ScriptedModule(), loader())

    assert [key for key, _ in checkpoint.written] == ["checkpoints/last.ckpt"] * 4
    assert len({value for _, value in checkpoint.written}) == 4
    assert persister.persisted == checkpoint.written


def test_a_slow_backend_blocks_training_instead_of_piling_up(
    tmp_path: Path,
) -> None:
    counts: list[int] = []

    class SlowRegistrar:
        @ll.hookimpl
        def lamin_lightning_artifact_saved(self, event: ll.ArtifactSavedEvent) -> None:
            counts.append(len(staged_files(tmp_path)))
            time.sleep(0.2)
            counts.append(len(staged_files(tmp_path)))

    checkpoint = ll.Checkpoint(
        save_top_k=-1,
        every_n_train_steps=1,
        max_pending=1,
        plugins=[SlowRegistrar()],
        disable_plugins=LOCAL_ONLY,
    )
    fit([checkpoint], tmp_path, steps=6)

    assert len(counts) == 12
    assert max(counts) == 2  # max_pending waiting + the one in progress


def test_max_pending_must_be_a_count() -> None:
    with pytest.raises(ValueError, match=r"max_pending=-1 is not a count"):
        ll.Checkpoint(max_pending=-1, disable_plugins=LOCAL_ONLY)


@pytest.mark.parametrize("fail_at", [2, 4], ids=["at-next-save", "at-flush"])
def test_strict_persister_failure_fails_the_fit_and_keeps_the_staged_file(
    tmp_path: Path, fail_at: int
) -> None:
    log, persister = EventLog(), SlowPersister(delay=0.05, fail_at=fail_at)
    checkpoint = SavedDigests(
        monitor="score",
        save_top_k=1,
        every_n_train_steps=1,
        plugins=[log],
        disable_plugins=LOCAL_ONLY,
        strict=True,
    )
    checkpoint.plugin_manager.register(persister, name="failing")
    trainer = trainer_for(checkpoint, tmp_path, max_steps=4)
    with pytest.raises(ll.PersistError, match=r"'failing'.*disk on fire") as raised:
        trainer.fit(Crashing(RuntimeError("unused"), at=99), loader())

    failed = persister.requests[fail_at - 1]
    assert STAGING_DIRNAME in str(raised.value)
    assert str(failed.local_path) in str(raised.value)
    staged = staged_files(tmp_path)
    assert failed.local_path in staged
    # A save that raised the earlier failure was staged and journaled first
    # (found by a new user: it used to be lost). Replay has all it needs.
    assert checkpoint.journal_path is not None
    journal = read(checkpoint.journal_path)
    unpersisted = [e for e in journal if e.op == "save" and e.done is None]
    assert {Path(e.record["request"]["local_path"]) for e in unpersisted} == set(staged)
    assert digest(failed.local_path) == dict(checkpoint.written)[failed.key]
    assert [e.status for e in log.ended] == ["failed"]
    assert worker_threads() == []


class SlowSteps(pl.Callback):
    """Gives the worker time to fail before the next save."""

    def on_train_batch_end(self, *args: Any) -> None:
        time.sleep(0.3)


def test_the_save_that_raises_an_earlier_failure_is_journaled(tmp_path: Path) -> None:
    # Found by a new user: with strict=True the save that raised the failure
    # of the one before was neither journaled nor staged, so no replay could
    # ever persist it.
    persister = SlowPersister(delay=0, fail_at=1)
    checkpoint = ll.Checkpoint(
        every_n_train_steps=1,
        save_top_k=-1,
        disable_plugins=LOCAL_ONLY,
        strict=True,
    )
    checkpoint.plugin_manager.register(persister, name="failing")
    trainer = pl.Trainer(
        default_root_dir=tmp_path,
        callbacks=[checkpoint, SlowSteps()],
        logger=False,
        max_steps=3,
        **QUIET,
    )
    with pytest.raises(ll.PersistError, match="disk on fire"):
        trainer.fit(ScriptedModule(), loader())

    assert checkpoint.journal_path is not None
    journal = read(checkpoint.journal_path)
    on_disk = {p.name for p in Path(checkpoint.dirpath).glob("*.ckpt")}
    journaled = {Path(e.record["original"]).name for e in journal if e.op == "save"}
    assert on_disk == {"epoch=0-step=1.ckpt", "epoch=0-step=2.ckpt"}
    assert on_disk <= journaled
    (report,) = ll.replay(
        tmp_path, plugins=[SlowPersister(delay=0)], disable=LOCAL_ONLY
    )
    assert report.persisted == 2 and report.ok


def test_synchronous_mode_persists_on_the_training_thread(tmp_path: Path) -> None:
    log, persister = EventLog(), SlowPersister(delay=0)
    checkpoint = ll.Checkpoint(
        monitor="score",
        save_top_k=1,
        every_n_train_steps=1,
        asynchronous=False,
        plugins=[persister, log],
        disable_plugins=LOCAL_ONLY,
    )
    fit([checkpoint], tmp_path, steps=3, scores=[3, 2, 1])

    main = threading.current_thread().name
    assert {thread for *_, thread in log.events} == {main}
    assert [e.global_step for e in log.saved()] == [1, 2, 3]
    assert [e.global_step for e in log.removed()] == [1, 2]
    assert all(STAGING_DIRNAME not in str(r.local_path) for r in persister.requests)
    assert not list(tmp_path.rglob(STAGING_DIRNAME))


def test_slow_flush_says_what_it_waits_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(_worker, "PROGRESS_AFTER_SECONDS", 0.05)
    persister = SlowPersister(delay=0.3)
    checkpoint = ll.Checkpoint(
        save_top_k=-1,
        every_n_train_steps=1,
        plugins=[persister],
        disable_plugins=LOCAL_ONLY,
    )
    with caplog.at_level(logging.INFO, logger="lamin_lightning_core._worker"):
        fit([checkpoint], tmp_path, steps=2)
    assert "Waiting for" in caplog.text
    assert len(persister.persisted) == 2


def test_save_artifact_returns_a_future_and_flush_waits_for_it(
    tmp_path: Path,
) -> None:
    persister = SlowPersister(delay=0.2)
    checkpoint = ll.Checkpoint(plugins=[persister], disable_plugins=LOCAL_ONLY)
    trainer = fit([checkpoint], tmp_path, steps=1)
    extra = tmp_path / "extra.ckpt"
    extra.write_bytes(b"weights")

    future = checkpoint.save_artifact(trainer, extra, "checkpoint")
    assert checkpoint.flush(timeout=0.01) is False
    assert checkpoint.flush() is True
    assert future.result().storage_uri == "memory://checkpoints/extra.ckpt"
    assert checkpoint.last_event("checkpoint") is future.result()
    assert worker_threads() == []  # outside a fit, flush ends the thread


def test_lamindb_persists_on_the_worker_and_closes_its_connection(
    ln: ModuleType, tracked_run: Any, tmp_path: Path
) -> None:
    def database_handles() -> int:
        fds = Path("/proc/self/fd")
        return sum(os.path.realpath(fd).endswith(".db") for fd in fds.iterdir())

    before = database_handles()
    checkpoint = SavedDigests(
        monitor="score", save_top_k=2, every_n_train_steps=1, disable_plugins=REGISTRARS
    )
    fit([checkpoint], tmp_path, steps=5, scores=[5, 4, 6, 3, 7])

    kept = ln.Artifact.filter(run=tracked_run, kind="model").order_by("created_at")
    assert [a.key.rsplit("/", 1)[-1] for a in kept] == [
        "epoch=0-step=2.ckpt",
        "epoch=0-step=4.ckpt",
    ]
    for artifact in kept:
        assert digest(artifact.path) == dict(checkpoint.written)[artifact.key]
    assert checkpoint.last_checkpoint_artifact.uid == kept[1].uid
    assert checkpoint.threads == {WORKER}
    assert staged_files(tmp_path) == []
    assert database_handles() == before


def test_a_sharded_checkpoint_directory_is_staged_as_a_tree_of_links(
    tmp_path: Path,
) -> None:
    shards = tmp_path / "epoch=0-step=1.ckpt"
    (shards / "model").mkdir(parents=True)
    (shards / "model" / "0.distcp").write_bytes(b"shard zero")
    (shards / ".metadata").write_bytes(b"meta")
    stager = Stager(enabled=True)

    staged = stager.stage(shards, link=True)
    assert os.path.samefile(staged / ".metadata", shards / ".metadata")
    shutil.rmtree(shards)  # Lightning evicts the checkpoint

    assert staged.parent.name == STAGING_DIRNAME
    assert (staged / "model" / "0.distcp").read_bytes() == b"shard zero"
    stager.release(staged, shards)
    stager.cleanup()
    assert list(tmp_path.iterdir()) == []


def test_without_hard_links_the_file_is_copied_with_one_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def refuse(source: Any, target: Any) -> None:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", refuse)
    files = [tmp_path / f"{n}.ckpt" for n in range(2)]
    for file in files:
        file.write_bytes(file.name.encode())
    stager = Stager(enabled=True)

    with caplog.at_level(logging.WARNING, logger="lamin_lightning_core._staging"):
        staged = [stager.stage(file, link=True) for file in files]

    assert [s.read_bytes() for s in staged] == [b"0.ckpt", b"1.ckpt"]
    assert all(s.stat().st_nlink == 1 for s in staged)
    assert caplog.text.count("Cannot hard-link checkpoints") == 1
