"""The LaminDB persister on the session's real local instance."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from lightning.pytorch.loggers import TensorBoardLogger

import lamin_lightning_core as ll
from lamin_lightning_adapters._lamindb_storage import LINK_DIRNAME
from tests.helpers import fit

REGISTRARS = ["wandb", "mlflow", "clearml"]


def test_checkpoints_are_run_outputs_with_spec_keys(
    ln: ModuleType, tracked_run: Any, tmp_path: Path, no_network: list[Any]
) -> None:
    checkpoint = ll.Checkpoint(
        monitor="score", save_top_k=2, every_n_train_steps=1, disable_plugins=REGISTRARS
    )
    logger = TensorBoardLogger(tmp_path / "logs")
    fit([checkpoint], tmp_path, steps=4, scores=[4, 3, 2, 1], logger=logger)

    prefix = f"logs/lightning_logs/{tracked_run.uid}"
    assert checkpoint.run_uid == tracked_run.uid
    assert checkpoint.base_prefix == prefix
    assert checkpoint.checkpoint_key_prefix == f"{prefix}/checkpoints"
    outputs = ln.Artifact.filter(run=tracked_run, kind="model").order_by("created_at")
    assert [a.key for a in outputs] == [
        f"{prefix}/checkpoints/epoch=0-step=3.ckpt",
        f"{prefix}/checkpoints/epoch=0-step=4.ckpt",
    ]
    last = checkpoint.last_checkpoint_artifact
    assert last.key.endswith("step=4.ckpt")
    assert checkpoint.last_event("checkpoint").storage_uri == last.path.as_uri()  # type: ignore[union-attr]
    assert last.path.read_bytes() == Path(checkpoint.best_model_path).read_bytes()
    assert no_network == []


def test_evicted_checkpoints_leave_the_instance(
    ln: ModuleType, tracked_run: Any, tmp_path: Path
) -> None:
    observer_removed: list[ll.ArtifactRemovedEvent] = []

    class Observer:
        def on_artifact_removed(self, event: ll.ArtifactRemovedEvent) -> None:
            observer_removed.append(event)

    checkpoint = ll.Checkpoint(
        monitor="score",
        save_top_k=1,
        every_n_train_steps=1,
        artifact_observers=[Observer()],
        disable_plugins=REGISTRARS,
    )
    fit([checkpoint], tmp_path, steps=3, scores=[3, 2, 1])

    [event_1, event_2] = observer_removed
    assert not ln.Artifact.filter(
        uid__in=[event_1.artifact_uid, event_2.artifact_uid]
    ).exists()
    assert not Path(event_1.storage_uri.removeprefix("file://")).exists()
    kept = ln.Artifact.filter(run=tracked_run, kind="model")
    assert [a.key for a in kept] == [
        f"{tracked_run.uid}/checkpoints/epoch=0-step=3.ckpt"
    ]


def test_hparams_is_neither_input_nor_output(
    ln: ModuleType, tracked_run: Any, tmp_path: Path
) -> None:
    checkpoint = ll.Checkpoint(disable_plugins=REGISTRARS)
    fit([checkpoint], tmp_path, steps=1, logger=TensorBoardLogger(tmp_path / "logs"))

    hparams = checkpoint.last_hparams_artifact
    assert (
        hparams.key == f"logs/lightning_logs/{tracked_run.uid}/checkpoints/hparams.yaml"
    )
    assert hparams.run is None
    assert not tracked_run.input_artifacts.filter(uid=hparams.uid).exists()
    assert "scores" in hparams.path.read_text()


def test_last_ckpt_keeps_one_artifact_per_run(
    ln: ModuleType, tracked_run: Any, tmp_path: Path
) -> None:
    checkpoint = ll.Checkpoint(
        save_top_k=0, save_last=True, every_n_train_steps=1, disable_plugins=REGISTRARS
    )
    fit([checkpoint], tmp_path, steps=3)

    key = f"{tracked_run.uid}/checkpoints/last.ckpt"
    [artifact] = ln.Artifact.filter(key=key)
    assert artifact.uid == checkpoint.last_checkpoint_artifact.uid
    assert (
        artifact.path.read_bytes()
        == (Path(checkpoint.dirpath) / "last.ckpt").read_bytes()
    )


def test_opting_out_of_run_uid_keys(
    ln: ModuleType, tracked_run: Any, tmp_path: Path
) -> None:
    checkpoint = ll.Checkpoint(run_uid_is_version=False, disable_plugins=REGISTRARS)
    fit([checkpoint], tmp_path, steps=1, logger=TensorBoardLogger(tmp_path / "logs"))
    assert checkpoint.base_prefix == "logs/lightning_logs/version_0"
    assert checkpoint.last_checkpoint_artifact.run == tracked_run


def test_without_instance_the_plugin_says_how_to_configure(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import lamindb_setup

    from lamin_lightning_adapters import lamindb as plugin

    monkeypatch.setattr(type(lamindb_setup.settings), "is_configured", False)
    with pytest.raises(ll.LaminLightningError, match="lamin init --storage"):
        plugin.lamin_lightning_run_uid()


def test_a_checkpoint_is_linked_into_storage_not_copied(
    ln: ModuleType, tracked_run: Any, tmp_path: Path
) -> None:
    checkpoint = ll.Checkpoint(
        save_top_k=-1, every_n_train_steps=1, disable_plugins=REGISTRARS
    )
    fit([checkpoint], tmp_path, steps=2)

    for event in (checkpoint.last_event("checkpoint"),):
        assert event is not None
        stored = event.artifact.path
        assert stored.parent.name == LINK_DIRNAME
        assert stored.samefile(event.local_path)  # one inode, no second copy
        assert event.artifact.key == event.key  # the key stays ours
        assert event.storage_uri == stored.as_uri()


@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")
def test_a_linked_checkpoint_keeps_its_bytes_when_the_file_is_rewritten(
    ln: ModuleType, tracked_run: Any, new_run: Any, tmp_path: Path
) -> None:
    from tests.core.test_async import InPlaceIO

    def fit_once(steps: int) -> Any:
        checkpoint = ll.Checkpoint(
            filename="fixed",
            enable_version_counter=False,
            run_uid_is_version=False,
            disable_plugins=REGISTRARS,
        )
        fit([checkpoint], tmp_path, steps=steps, plugins=[InPlaceIO()])
        return checkpoint.last_checkpoint_artifact

    first = fit_once(steps=2)
    first_bytes = first.path.read_bytes()
    new_run()
    second = fit_once(steps=3)  # truncates and rewrites the same file name

    local = Path(tmp_path, "checkpoints", "fixed.ckpt").read_bytes()
    assert second.path.read_bytes() == local != first_bytes
    assert first.path.read_bytes() == first_bytes


def test_without_a_shared_filesystem_lamindb_copies(
    ln: ModuleType,
    tracked_run: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    import errno
    import os

    from lamin_lightning_adapters import _lamindb_storage

    def cross_device(source: Any, target: Any) -> None:
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))

    monkeypatch.setattr(_lamindb_storage.os, "link", cross_device)
    monkeypatch.setattr(_lamindb_storage, "_refused", set())
    checkpoint = ll.Checkpoint(
        save_top_k=-1,
        every_n_train_steps=1,
        asynchronous=False,
        disable_plugins=REGISTRARS,
    )
    with caplog.at_level("INFO", logger=_lamindb_storage.__name__):
        fit([checkpoint], tmp_path, steps=2)

    event = checkpoint.last_event("checkpoint")
    assert event is not None
    assert event.artifact.path.parent.name == ".lamindb"
    assert not event.artifact.path.samefile(event.local_path)
    assert event.artifact.path.read_bytes() == event.local_path.read_bytes()
    linking = [r for r in caplog.records if "Cannot hard-link" in r.message]
    assert len(linking) == 1
