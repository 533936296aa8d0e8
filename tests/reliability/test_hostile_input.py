"""Hostile input: each case is a clear error before training, or a safe result.

Covered elsewhere, so not repeated here: a ``dirpath`` with ``..`` or an
absolute one and a metric name with ``/`` in the filename
(``tests/core/test_keys.py``), a wrong hook signature, a misspelled hook and a
plugin that fails to import (``tests/core/test_bus.py``), unsafe keys in events
(``tests/core/test_events.py``), a missing LaminDB feature and an ``int``
feature given a ``str`` at artifact level (``tests/adapters/test_lamindb_features.py``).
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import lightning.pytorch as pl
import pydantic
import pytest
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException

import lamin_lightning_core as ll
from lamin_lightning_core._bus import create_bus
from tests.helpers import QUIET, ScriptedModule, fit, loader

LOCAL_ONLY = ["lamindb", "wandb", "mlflow", "clearml", "recorder"]
REGISTRARS = ["wandb", "mlflow", "clearml", "recorder"]


class Recorder:
    """Every event the bus delivers, in order."""

    def __init__(self) -> None:
        self.events: list[ll.LifecycleEvent] = []

    @ll.hookimpl
    def lamin_lightning_artifact_saved(self, event: ll.ArtifactSavedEvent) -> None:
        self.events.append(event)

    @ll.hookimpl
    def lamin_lightning_artifact_removed(self, event: ll.ArtifactRemovedEvent) -> None:
        self.events.append(event)

    @ll.hookimpl
    def lamin_lightning_fit_ended(self, event: ll.FitEndedEvent) -> None:
        self.events.append(event)

    def saved(self) -> list[ll.ArtifactSavedEvent]:
        return [e for e in self.events if isinstance(e, ll.ArtifactSavedEvent)]


# -- dirpath that cannot be written ------------------------------------------


@pytest.mark.parametrize(
    ("dirpath", "culprit"),
    [("afile/sub", "afile"), ("afile", "afile")],
    ids=["below-a-file", "is-a-file"],
)
def test_dirpath_blocked_by_a_file_fails_before_training(
    tmp_path: Path, dirpath: str, culprit: str
) -> None:
    # Tests run as root, which a chmod does not stop; a file in the way does.
    (tmp_path / "afile").write_text("not a folder")
    checkpoint = ll.Checkpoint(dirpath=tmp_path / dirpath, disable_plugins=LOCAL_ONLY)
    with pytest.raises(NotADirectoryError) as error:
        fit([checkpoint], tmp_path, steps=2)
    message = str(error.value)
    assert f"Cannot save checkpoints in {tmp_path / dirpath}" in message
    assert f"{tmp_path / culprit} is a file, not a folder" in message
    assert "Checkpoint(dirpath=...) in a writable folder" in message
    assert not list(tmp_path.rglob("*.ckpt"))


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() == 0,
    reason="root writes into a read-only folder",
)
def test_read_only_dirpath_fails_before_training(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    checkpoint = ll.Checkpoint(dirpath=locked / "ckpts", disable_plugins=LOCAL_ONLY)
    with pytest.raises(PermissionError, match=r"locked is not writable"):
        fit([checkpoint], tmp_path, steps=2)


# -- filename: undecodable bytes, too long -----------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"filename": "ck\udcff-{step}"}, r"filename='ck\\udcff-\{step\}'.*UTF-8"),
        ({"dirpath": "runs/\udcff"}, r"dirpath='runs/\\udcff'.*UTF-8"),
        ({"filename": "a" * 300 + "-{step}"}, r"at least 312 bytes.*255-byte"),
        # The template fits; once {epoch} becomes "epoch=0" and .ckpt follows,
        # it does not.
        ({"filename": "a" * 247 + "{epoch}"}, r"at least 259 bytes.*255-byte"),
        # 130 characters, 260 bytes in UTF-8: the limit counts bytes.
        ({"filename": "é" * 130}, r"at least 265 bytes.*255-byte"),
        ({"filename": "sub/" + "b" * 260}, r"at least 265 bytes"),
    ],
    ids=[
        "surrogate-filename",
        "surrogate-dirpath",
        "long",
        "long-once-formatted",
        "long-in-bytes",
        "long-part",
    ],
)
def test_unwritable_names_fail_at_construction(
    kwargs: dict[str, str], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        ll.Checkpoint(disable_plugins=LOCAL_ONLY, **kwargs)  # type: ignore[arg-type]


def test_non_ascii_filename_near_the_limit_gives_a_safe_key(tmp_path: Path) -> None:
    filename = "modèle-ü-" + "x" * 200 + "-{step}"
    recorder = Recorder()
    checkpoint = ll.Checkpoint(
        filename=filename,
        every_n_train_steps=1,
        plugins=[recorder],
        disable_plugins=LOCAL_ONLY,
    )
    fit([checkpoint], tmp_path, steps=1)
    [event] = [e for e in recorder.saved() if e.kind == "checkpoint"]
    assert event.key == f"checkpoints/modèle-ü-{'x' * 200}-step=1.ckpt"
    assert json.loads(event.model_dump_json())["key"] == event.key
    assert event.local_path.is_file()


def test_an_event_refuses_a_key_that_is_not_utf8() -> None:
    with pytest.raises(pydantic.ValidationError, match="not valid UTF-8"):
        ll.PersistRequest(
            kind="checkpoint", key="checkpoints/ck\udcff.ckpt", local_path=Path("x")
        )


# -- an entry point naming an object its module lacks -------------------------


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A folder on ``sys.path`` for fake installed distributions."""
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    importlib.invalidate_caches()
    sys.modules.pop("ll_hollow_plugin", None)


def test_entry_point_to_a_missing_object_names_plugin_and_distribution(
    site: Path,
) -> None:
    # Like test_bus, but the entry point is module:attribute, and the module
    # imports fine without the attribute.
    dist = site / "ll_hollow-1.2.3.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: ll-hollow\nVersion: 1.2.3\n"
    )
    (dist / "entry_points.txt").write_text(
        "[lamin_lightning]\nll-hollow = ll_hollow_plugin:plugin\n"
    )
    (site / "ll_hollow_plugin.py").write_text("PLUGIN = object()\n")
    importlib.invalidate_caches()
    with pytest.raises(ll.PluginLoadError) as error:
        ll.Checkpoint(disable_plugins=LOCAL_ONLY)
    message = str(error.value)
    assert "'ll-hollow' (from ll-hollow 1.2.3)" in message
    assert "'ll_hollow_plugin:plugin'" in message
    assert "AttributeError" in message and "'plugin'" in message
    assert "LAMIN_LIGHTNING_DISABLE_PLUGINS" in message
    assert create_bus(disable=[*LOCAL_ONLY, "ll-hollow"]).inactive["ll-hollow"] == (
        "disabled"
    )


# -- a feature value of the wrong type (real LaminDB) -------------------------


@pytest.mark.parametrize(
    ("level", "dtype", "value", "match"),
    [
        ("run", "float", "fast", r"'hostile_float' has dtype 'float'.*'fast' \(str\)"),
        ("run", "int", True, r"'hostile_int' has dtype 'int'.*True \(bool\)"),
        ("artifact", "int", 2.5, r"'hostile_int' has dtype 'int'.*2\.5 \(float\)"),
        ("artifact", "bool", 1, r"'hostile_bool' has dtype 'bool'.*1 \(int\)"),
        ("artifact", "str", 3, r"'hostile_str' has dtype 'str'.*3 \(int\)"),
    ],
    ids=[
        "run-str-for-float",
        "run-bool-for-int",
        "float-for-int",
        "int-for-bool",
        "int-for-str",
    ],
)
def test_feature_of_the_wrong_type_fails_before_training(
    ln: ModuleType,
    tracked_run: Any,
    tmp_path: Path,
    level: str,
    dtype: str,
    value: object,
    match: str,
) -> None:
    name = f"hostile_{dtype}"
    if ln.Feature.filter(name=name).first() is None:
        ln.Feature(name=name, dtype=dtype).save()
    checkpoint = ll.Checkpoint(
        features={level: {name: value}},
        every_n_train_steps=1,
        disable_plugins=REGISTRARS,
    )
    with pytest.raises(ll.LaminLightningError, match=match):
        fit([checkpoint], tmp_path, steps=1)
    assert not list(tmp_path.rglob("*.ckpt"))


# -- a monitor that is never logged --------------------------------------------


class ValidatedModule(ScriptedModule):
    """Runs a validation loop that logs ``val_loss`` (and nothing else)."""

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.layer(x), y))

    def val_dataloader(self) -> Any:
        return loader(n=8)


def test_unlogged_monitor_at_epoch_end_warns_and_persists_nothing(
    tmp_path: Path,
) -> None:
    # Lightning warns at each skipped save while no validation loop has run;
    # the callback says once, at the end, that nothing was saved.
    recorder = Recorder()
    checkpoint = ll.Checkpoint(
        monitor="hostile_never_logged",
        plugins=[recorder],
        disable_plugins=LOCAL_ONLY,
    )
    with pytest.warns(UserWarning) as caught:
        trainer = fit([checkpoint], tmp_path, steps=-1, max_epochs=1)
    messages = [str(w.message) for w in caught]
    assert any(
        "'hostile_never_logged'" in m and "could not find" in m for m in messages
    )
    ours = [w for w in caught if isinstance(w.message, ll.LaminLightningWarning)]
    assert len(ours) == 1 and "saved nothing" in str(ours[0].message)
    assert trainer.current_epoch == 1
    assert not [e for e in recorder.saved() if e.kind == "checkpoint"]
    assert not checkpoint.persist_failures
    assert not checkpoint.delivery_failures


def test_unlogged_monitor_with_step_saves_says_so(tmp_path: Path) -> None:
    # Lightning 2.6 puts a step save whose monitor is missing off until a
    # validation that never comes: no checkpoint and, from Lightning, no word.
    checkpoint = ll.Checkpoint(
        monitor="hostile_step_monitor",
        every_n_train_steps=1,
        disable_plugins=LOCAL_ONLY,
    )
    with pytest.warns(
        ll.LaminLightningWarning,
        match=r"monitor='hostile_step_monitor'\) saved nothing.*logged metrics: "
        r"score, train_loss",
    ):
        fit([checkpoint], tmp_path, steps=2)
    assert not list(tmp_path.rglob("*.ckpt"))


def test_unlogged_monitor_after_validation_is_lightnings_own_error(
    tmp_path: Path,
) -> None:
    recorder = Recorder()
    checkpoint = ll.Checkpoint(
        monitor="hostile_val_acc",
        plugins=[recorder],
        disable_plugins=LOCAL_ONLY,
    )
    trainer = pl.Trainer(
        default_root_dir=tmp_path,
        max_epochs=1,
        limit_train_batches=2,
        callbacks=[checkpoint],
        logger=False,
        **QUIET,  # type: ignore[arg-type]
    )
    with pytest.raises(
        MisconfigurationException,
        match=r"monitor='hostile_val_acc'.*'val_loss'.*Did you call",
    ):
        trainer.fit(ValidatedModule(), loader())
    assert not list(tmp_path.rglob("*.ckpt"))
    ended = [e for e in recorder.events if isinstance(e, ll.FitEndedEvent)]
    assert [e.status for e in ended] == ["failed"]


# -- credentials in storage URIs never reach events or logs ---------------------

SECRET = "wJalrXUtnFEMIK7MDENGbPxRfiCYhostile"
SIGNATURE = "c2lnbmF0dXJlaG9zdGlsZQ"


def secret_uri(key: str) -> str:
    return (
        f"s3://AKIAHOSTILE:{SECRET}@bucket/{key}"
        f"?versionId=7&X-Amz-Signature={SIGNATURE}&X-Amz-Security-Token={SECRET}"
    )


@pytest.mark.parametrize(
    ("uri", "redacted"),
    [
        ("s3://AKIA:secret@bucket/key", "s3://***@bucket/key"),
        ("https://user:pass@host/x", "https://***@host/x"),
        ("https://token@host/x", "https://***@host/x"),
        ("https://host/x?sig=abc&sv=2024", "https://host/x?sig=***&sv=2024"),
        ("https://u:p@[::1/x", "https://***@[::1/x"),
        ("file:///tmp/a%20b.ckpt", "file:///tmp/a%20b.ckpt"),
        ("s3://bucket/k?versionId=3", "s3://bucket/k?versionId=3"),
    ],
    ids=["s3", "https", "user-only", "sas-signature", "unparseable", "file", "clean"],
)
def test_credentials_are_redacted_from_uris(uri: str, redacted: str) -> None:
    assert ll.PersistedArtifact(storage_uri=uri).storage_uri == redacted


def _records(uri: str) -> list[pydantic.BaseModel]:
    common = {"callback_id": "cb", "kind": "checkpoint", "key": "c/x.ckpt"}
    local = {"local_path": Path("/tmp/x.ckpt"), "storage_uri": uri}
    return [
        ll.ArtifactSavedEvent(**common, **local),  # type: ignore[arg-type]
        ll.ArtifactRemovedEvent(**common, **local),  # type: ignore[arg-type]
        ll.PersistedArtifact(storage_uri=uri),
        ll.CheckpointRecord(key="c/x.ckpt", storage_uri=uri),
        ll.BackendRunLink(system="mlflow", run_id="r", url=uri),
    ]


@pytest.mark.parametrize(
    "index",
    range(5),
    ids=["saved", "removed", "persisted", "record", "backend-link"],
)
def test_no_model_carries_credentials_in_json_or_repr(index: int) -> None:
    model = _records(secret_uri("c/x.ckpt"))[index]
    for text in (model.model_dump_json(), repr(model), str(model)):
        assert SECRET not in text and SIGNATURE not in text
        assert "s3://***@bucket/c/x.ckpt?versionId=7&X-Amz-Signature=***" in text


class SecretStore:
    """A persister and registrar whose backend hands out URIs with secrets."""

    def __init__(self) -> None:
        self.records: list[ll.CheckpointRecord] = []

    @ll.hookimpl
    def lamin_lightning_persist_artifact(
        self, request: ll.PersistRequest
    ) -> ll.PersistedArtifact:
        uri = secret_uri(request.key)
        if request.kind == "checkpoint":
            self.records.append(ll.CheckpointRecord(key=request.key, storage_uri=uri))
        return ll.PersistedArtifact(storage_uri=uri, artifact_uid=request.key)

    @ll.hookimpl
    def lamin_lightning_find_checkpoints(
        self, query: ll.CheckpointQuery
    ) -> list[ll.CheckpointRecord]:
        return self.records

    @ll.hookimpl
    def lamin_lightning_fit_started(self, event: ll.FitStartedEvent) -> Any:
        url = f"https://admin:{SECRET}@mlflow.example/#/experiments/1/runs/r1"
        return ll.BackendRunLink(system="mlflow", run_id="r1", url=url)


def test_a_fit_never_logs_or_announces_credentials(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    recorder = Recorder()
    checkpoint = ll.Checkpoint(
        dirpath=tmp_path / "ckpts",
        monitor="score",
        save_top_k=1,
        every_n_train_steps=1,
        plugins=[SecretStore(), recorder],
        disable_plugins=LOCAL_ONLY,
    )
    with caplog.at_level(logging.DEBUG):
        fit([checkpoint], tmp_path, steps=3, scores=[3.0, 2.0, 1.0])
    kinds = {type(e).__name__ for e in recorder.events}
    assert {"ArtifactSavedEvent", "ArtifactRemovedEvent"} <= kinds
    assert "Persisted checkpoints" in caplog.text  # the summary lists records
    assert "s3://***@bucket/" in caplog.text
    texts = [caplog.text, *(e.model_dump_json() for e in recorder.events)]
    texts += [repr(link) for link in checkpoint.backend_runs]
    journal = Path(checkpoint.journal_path or tmp_path).parent
    texts += [p.read_text() for p in journal.rglob("*") if p.is_file()]
    for text in texts:
        assert SECRET not in text and SIGNATURE not in text
    assert checkpoint.backend_runs[0].url == (
        "https://***@mlflow.example/#/experiments/1/runs/r1"
    )
