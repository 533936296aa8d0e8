"""Checkpoint with the built-in local persister (LaminDB switched off)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from lightning.pytorch.loggers import CSVLogger

import lamin_lightning_core as ll
from tests.helpers import fit

LOCAL_ONLY = ["lamindb", "wandb", "mlflow", "clearml"]


class Recorder:
    def __init__(self) -> None:
        self.saved: list[ll.ArtifactSavedEvent] = []
        self.removed: list[ll.ArtifactRemovedEvent] = []

    def on_artifact_saved(self, event: ll.ArtifactSavedEvent) -> None:
        self.saved.append(event)

    def on_artifact_removed(self, event: ll.ArtifactRemovedEvent) -> None:
        self.removed.append(event)


class BusRecorder(Recorder):
    @ll.hookimpl
    def lamin_lightning_artifact_saved(self, event: ll.ArtifactSavedEvent) -> None:
        self.on_artifact_saved(event)

    @ll.hookimpl
    def lamin_lightning_artifact_removed(self, event: ll.ArtifactRemovedEvent) -> None:
        self.on_artifact_removed(event)


class SubclassCheckpoint(ll.Checkpoint):
    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.recorder = Recorder()

    def on_artifact_saved(self, event: ll.ArtifactSavedEvent) -> None:
        self.recorder.on_artifact_saved(event)

    def on_artifact_removed(self, event: ll.ArtifactRemovedEvent) -> None:
        self.recorder.on_artifact_removed(event)


def test_subclass_observer_and_plugin_see_the_same_events(tmp_path: Path) -> None:
    observer, plugin = Recorder(), BusRecorder()
    checkpoint = SubclassCheckpoint(
        monitor="score",
        save_top_k=2,
        every_n_train_steps=1,
        artifact_observers=[observer],
        plugins=[plugin],
        disable_plugins=LOCAL_ONLY,
    )
    fit([checkpoint], tmp_path, steps=5, scores=[5, 4, 3, 2, 1])

    assert [e.global_step for e in observer.saved] == [1, 2, 3, 4, 5]
    for recorder in (plugin, checkpoint.recorder):
        assert [id(e) for e in recorder.saved] == [id(e) for e in observer.saved]
        assert [id(e) for e in recorder.removed] == [id(e) for e in observer.removed]
    assert [e.global_step for e in observer.removed] == [1, 2, 3]
    assert all(e.is_best for e in observer.saved)
    assert [e.score for e in observer.saved] == [5, 4, 3, 2, 1]


def test_eviction_emits_removed_events_after_their_saves(tmp_path: Path) -> None:
    observer = Recorder()
    checkpoint = ll.Checkpoint(
        monitor="score",
        mode="max",
        save_top_k=1,
        every_n_train_steps=1,
        artifact_observers=[observer],
        disable_plugins=LOCAL_ONLY,
    )
    fit([checkpoint], tmp_path, steps=4, scores=[1, 3, 2, 4])

    saved_keys = [e.key for e in observer.saved]
    removed_keys = [e.key for e in observer.removed]
    assert removed_keys == [saved_keys[0], saved_keys[1]]
    assert all(not Path(e.local_path).exists() for e in observer.removed)
    assert checkpoint.last_artifact_event is observer.removed[-1]
    assert Path(checkpoint.last_event("checkpoint").local_path).exists()  # type: ignore[union-attr]
    assert [e.global_step for e in observer.saved] == [1, 2, 4]
    assert all(e.is_best for e in observer.saved)
    assert observer.removed[0].storage_uri == observer.saved[0].storage_uri


def test_local_persister_keys_and_uris_without_logger(tmp_path: Path) -> None:
    observer = Recorder()
    checkpoint = ll.Checkpoint(
        artifact_observers=[observer], disable_plugins=LOCAL_ONLY
    )
    fit([checkpoint], tmp_path, steps=2)

    [event] = observer.saved
    assert checkpoint.base_prefix == ""
    assert checkpoint.checkpoint_key_prefix == "checkpoints"
    assert event.key == "checkpoints/epoch=0-step=2.ckpt"
    assert event.storage_uri == Path(event.local_path).as_uri()
    assert event.artifact is None
    assert checkpoint.last_checkpoint_artifact is None
    assert checkpoint.last_event("checkpoint") is event


def test_dirpath_and_logger_keys_with_hparams(tmp_path: Path) -> None:
    observer = Recorder()
    logger = CSVLogger(tmp_path / "logs", name="exp")
    checkpoint = ll.Checkpoint(
        dirpath=tmp_path / "ckpts",
        artifact_observers=[observer],
        disable_plugins=LOCAL_ONLY,
    )
    os.chdir(tmp_path)
    fit([checkpoint], tmp_path, steps=2, logger=logger)

    assert checkpoint.base_prefix == "ckpts"
    kinds = {e.kind: e.key for e in observer.saved}
    assert kinds == {
        "checkpoint": "ckpts/checkpoints/epoch=0-step=2.ckpt",
        "hparams": "ckpts/checkpoints/hparams.yaml",
    }

    observer.saved.clear()
    other = ll.Checkpoint(artifact_observers=[observer], disable_plugins=LOCAL_ONLY)
    fit([other], tmp_path, steps=2, logger=CSVLogger(tmp_path / "logs", name="exp"))
    assert other.base_prefix == "logs/exp/version_1"
    hparams = next(e for e in observer.saved if e.kind == "hparams")
    assert hparams.local_path == tmp_path / "logs/exp/version_1/hparams.yaml"


def test_save_last_link_is_not_persisted_twice(tmp_path: Path) -> None:
    observer = Recorder()
    checkpoint = ll.Checkpoint(
        monitor="score",
        every_n_train_steps=1,
        save_last="link",
        artifact_observers=[observer],
        disable_plugins=LOCAL_ONLY,
    )
    fit([checkpoint], tmp_path, steps=3, scores=[3, 2, 1])

    assert (Path(checkpoint.dirpath) / "last.ckpt").is_symlink()
    assert not [e for e in observer.saved if e.key.endswith("last.ckpt")]


def test_save_last_true_publishes_last_ckpt(tmp_path: Path) -> None:
    observer = Recorder()
    checkpoint = ll.Checkpoint(
        save_top_k=0,
        save_last=True,
        artifact_observers=[observer],
        disable_plugins=LOCAL_ONLY,
    )
    fit([checkpoint], tmp_path, steps=2)
    assert [e.key for e in observer.saved] == ["checkpoints/last.ckpt"]


def test_failing_observer_does_not_stop_training(tmp_path: Path) -> None:
    class Broken:
        def on_artifact_saved(self, event: ll.ArtifactSavedEvent) -> None:
            raise RuntimeError("observer bug")

    observer = Recorder()
    checkpoint = ll.Checkpoint(
        every_n_train_steps=1,
        save_top_k=-1,
        artifact_observers=[Broken(), observer],
        disable_plugins=LOCAL_ONLY,
    )
    with pytest.warns(ll.PluginDeliveryWarning, match="observer bug"):
        trainer = fit([checkpoint], tmp_path, steps=3)
    assert trainer.global_step == 3
    assert len(observer.saved) == 3
    assert len(checkpoint.delivery_failures) == 3


@pytest.mark.parametrize(
    ("features", "match"),
    [
        ({"runs": {}}, r"unknown key\(s\) \['runs'\]"),
        ({"run": {}, "model": {}}, r"\['model'\].*'artifact'"),
        ([("run", {})], "must be a dict"),
    ],
    ids=["typo", "extra-level", "not-a-dict"],
)
def test_bad_features_fail_at_construction(features: object, match: str) -> None:
    with pytest.raises((ValueError, TypeError), match=match):
        ll.Checkpoint(features=features, disable_plugins=LOCAL_ONLY)  # type: ignore[arg-type]


def test_observer_without_methods_is_rejected() -> None:
    with pytest.raises(TypeError, match="neither on_artifact_saved"):
        ll.Checkpoint(artifact_observers=[object()], disable_plugins=LOCAL_ONLY)


def test_unknown_kind_is_a_clear_error(tmp_path: Path) -> None:
    checkpoint = ll.Checkpoint(disable_plugins=LOCAL_ONLY)
    with pytest.raises(
        ValueError, match=r"Unknown artifact kind 'model'.*'checkpoint'"
    ):
        checkpoint.last_event("model")  # type: ignore[arg-type]


def test_prefix_is_unknown_before_setup() -> None:
    checkpoint = ll.Checkpoint(disable_plugins=LOCAL_ONLY)
    with pytest.raises(RuntimeError, match=r"during or after trainer\.fit"):
        _ = checkpoint.base_prefix


def test_two_callbacks_have_distinct_ids(tmp_path: Path) -> None:
    observer = Recorder()
    first = ll.Checkpoint(
        monitor="score",
        filename="a-{step}",
        artifact_observers=[observer],
        disable_plugins=LOCAL_ONLY,
    )
    second = ll.Checkpoint(
        monitor="train_loss",
        filename="b-{step}",
        artifact_observers=[observer],
        disable_plugins=LOCAL_ONLY,
    )
    fit([first, second], tmp_path, steps=2)
    assert {e.callback_id for e in observer.saved} == {
        first.state_key,
        second.state_key,
    }
