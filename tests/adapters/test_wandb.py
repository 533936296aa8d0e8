"""The W&B registrar against the real wandb client in offline mode.

An offline run is stored as a binary transaction log (``run-<id>.wandb``) that
wandb 0.31 has no public reader for. ``_records`` reads it: the file is a
LevelDB-style log (a 7-byte header, then 32 KiB blocks of chunked records) of
``wandb.proto.wandb_internal_pb2.Record`` messages. Only these tests use that
layout and those protobuf classes, to read back what the plugin recorded.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import struct
import sys
from pathlib import Path

import lightning.pytorch as lp
import pytest
import torch
import wandb
from lightning.pytorch.loggers import WandbLogger
from wandb.proto import wandb_internal_pb2

from lamin_lightning_adapters import wandb as plugin
from lamin_lightning_core import (
    ArtifactRemovedEvent,
    ArtifactSavedEvent,
    BackendRunLink,
    Checkpoint,
    CheckpointRank,
    FitEndedEvent,
    FitStartedEvent,
    LaminLightningWarning,
    PluginUnavailable,
)

CB = "Checkpoint{'monitor': 'val_loss', 'mode': 'min'}"
RUN_UID = "lnRun0000000001"
PREFIX = "lightning_logs/lnRun0000000001"
OTHER_PLUGINS = ["lamindb", "mlflow", "clearml"]


# -- reading an offline run back ------------------------------------------------


def _run_dir(root: Path, run_id: str) -> Path:
    (path,) = root.rglob(f"offline-run-*-{run_id}")
    return path


def _records(root: Path, run_id: str) -> list[wandb_internal_pb2.Record]:
    # wandb-core buffers the log in 32 KiB blocks and flushes it when the run's
    # stream closes, which may come after run.finish() returns; teardown waits
    # for the service to exit.
    wandb.teardown()
    path = _run_dir(root, run_id) / f"run-{run_id}.wandb"
    data = path.read_bytes()
    ident, _magic, _version = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B"
    records, chunks, pos, block = [], b"", 7, 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # the rest of a block is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        chunks = chunk if kind in (1, 2) else chunks + chunk  # full/first vs rest
        if kind in (1, 4):  # full or last chunk: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            records.append(record)
    return records


def _versions(records: list, name: str) -> list:
    found = [r.artifact for r in records if r.WhichOneof("record_type") == "artifact"]
    return [artifact for artifact in found if artifact.name == name]


def _holders(versions: list) -> dict[str, int]:
    """Which version holds each alias once W&B applied the versions in order."""
    return {alias: i for i, version in enumerate(versions) for alias in version.aliases}


def _updates(records: list, kind: str) -> dict[str, object]:
    values: dict[str, object] = {}
    for record in records:
        if record.WhichOneof("record_type") == kind:
            for item in getattr(record, kind).update:
                values[item.key] = json.loads(item.value_json)
    return values


def _entry(version):
    (entry,) = version.manifest.contents
    return entry


# -- fixtures and events ----------------------------------------------------------


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Offline W&B with every directory under ``tmp_path``; no network."""
    for variable in (
        "WANDB_PROJECT",
        "WANDB_ENTITY",
        "WANDB_API_KEY",
        "WANDB_RUN_ID",
        "WANDB_BASE_URL",
        "WANDB_DISABLED",
        plugin.UPLOAD_ENV,
        plugin.EVICTION_ENV,
    ):
        monkeypatch.delenv(variable, raising=False)
    root = tmp_path / "wandb-home"
    for variable in (
        "WANDB_DIR",
        "WANDB_DATA_DIR",
        "WANDB_CACHE_DIR",
        "WANDB_CONFIG_DIR",
    ):
        (root / variable.lower()).mkdir(parents=True)
        monkeypatch.setenv(variable, str(root / variable.lower()))
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc login
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.chdir(tmp_path)  # no ./wandb/settings of the checkout
    wandb.teardown()  # wandb reads its settings once per process
    yield root
    if wandb.run is not None:  # a failed test left a run open
        wandb.run.finish()
    wandb.teardown()


def _started(
    callback_id: str = CB, monitor: str | None = "val_loss"
) -> FitStartedEvent:
    return FitStartedEvent(
        callback_id=callback_id,
        run_uid=RUN_UID,
        base_prefix=PREFIX,
        checkpoint_key_prefix=f"{PREFIX}/checkpoints",
        monitor=monitor,
        mode="min",
    )


def _saved(
    tmp_path: Path, step: int, score: float, is_best: bool, **fields
) -> ArtifactSavedEvent:
    name = f"epoch={step // 10}-step={step}.ckpt"
    path = tmp_path / "ckpts" / name
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(os.urandom(64))
    values = {
        "callback_id": CB,
        "run_uid": RUN_UID,
        "kind": "checkpoint",
        "key": f"{PREFIX}/checkpoints/{name}",
        "local_path": path,
        "storage_uri": path.as_uri(),
        "artifact_uid": f"lnArt{step:011d}",
        "epoch": step // 10,
        "global_step": step,
        "monitor": "val_loss",
        "score": score,
        "is_best": is_best,
    }
    return ArtifactSavedEvent(**{**values, **fields})


def _removed(saved: ArtifactSavedEvent, **fields) -> ArtifactRemovedEvent:
    names = {"callback_id", "run_uid", "kind", "key", "local_path", "storage_uri"}
    return ArtifactRemovedEvent(**{**saved.model_dump(include=names), **fields})


def _rank(model_rank: int, best: bool, last: bool) -> CheckpointRank:
    return CheckpointRank(model_rank=model_rank, is_best_model=best, is_last_model=last)


def _ended(callback_id: str = CB) -> FitEndedEvent:
    return FitEndedEvent(callback_id=callback_id, run_uid=RUN_UID, status="finished")


# -- hooks called directly --------------------------------------------------------


def test_checkpoints_become_versions_of_one_model_artifact(home, tmp_path):
    returned = plugin.lamin_lightning_fit_started(event=_started())
    link = plugin.run_link(CB)
    saves = [
        _saved(tmp_path, 10, 0.5, True),
        _saved(tmp_path, 20, 0.7, False),
        _saved(tmp_path, 30, 0.3, True),
    ]
    for event in saves:
        plugin.lamin_lightning_artifact_saved(event=event)
    plugin.lamin_lightning_fit_ended(event=_ended())

    assert link is not None
    assert returned == BackendRunLink(
        system="wandb", run_id=link.run_id, url=None, project=link.project
    )
    assert (link.offline, link.url, link.started_here) == (True, None, True)
    assert link.artifact_name == f"model-{link.run_id}"
    assert wandb.run is None, "the plugin finishes the run it started"
    records = _records(home, link.run_id)
    versions = _versions(records, link.artifact_name)
    assert [v.type for v in versions] == ["model"] * 3
    assert len({v.digest for v in versions}) == 3
    assert [_entry(v).ref for v in versions] == [e.storage_uri for e in saves]
    assert [_entry(v).path for v in versions] == [e.local_path.name for e in saves]
    assert [_entry(v).size for v in versions] == [64, 64, 64]
    assert [sorted(v.aliases) for v in versions] == [
        ["best", "latest"],
        ["latest"],
        ["best", "latest"],
    ]
    assert _holders(versions[:2]) == {"best": 0, "latest": 1}
    assert _holders(versions) == {"best": 2, "latest": 2}
    assert json.loads(versions[1].metadata) == {
        "key": saves[1].key,
        "storage_uri": saves[1].storage_uri,
        "monitor": "val_loss",
        "mode": None,
        "score": 0.7,
        "save_weights_only": None,
        "epoch": 2,
        "global_step": 20,
        "lamindb_artifact_uid": "lnArt00000000020",
        "lamindb_run_uid": RUN_UID,
        "features": {},
    }
    assert _updates(records, "config")["lamin_run_uid"] == RUN_UID
    (exit_record,) = [r.exit for r in records if r.WhichOneof("record_type") == "exit"]
    assert exit_record.exit_code == 0


def test_annotations_travel_and_best_follows_the_ranking(home, tmp_path, caplog):
    started = _started().model_copy(
        update={
            "run_features": {"dataset": "digits"},
            "hyperparameters": {"lr": 0.1},
            "trainer_config": {"max_epochs": 3, "precision": "32-true"},
        }
    )
    plugin.lamin_lightning_fit_started(event=started)
    annotated = {"mode": "min", "save_weights_only": False, "features": {"split": 1}}
    first = _saved(tmp_path, 10, 0.5, True, **annotated)
    second = _saved(tmp_path, 20, 0.3, True, **annotated)
    plugin.lamin_lightning_artifact_saved(
        event=first.model_copy(update={"ranking": {first.key: _rank(0, True, True)}})
    )
    plugin.lamin_lightning_artifact_saved(
        event=second.model_copy(
            update={
                "ranking": {
                    second.key: _rank(0, True, True),
                    first.key: _rank(1, False, False),
                }
            }
        )
    )
    # An eviction of the best (e.g. by a callback without monitor) makes the
    # first checkpoint the best again.
    with caplog.at_level(logging.INFO, logger=plugin.__name__):
        plugin.lamin_lightning_artifact_removed(
            event=_removed(second, ranking={first.key: _rank(0, True, True)})
        )
    link = plugin.run_link(CB)
    plugin.lamin_lightning_fit_ended(event=_ended())

    records = _records(home, link.run_id)
    versions = _versions(records, link.artifact_name)
    metadata = json.loads(versions[0].metadata)
    assert {k: metadata[k] for k in (*annotated, "model_rank")} == {
        **annotated,
        "model_rank": 0,
    }
    assert (metadata["is_best_model"], metadata["is_last_model"]) == (True, True)
    assert _updates(records, "config")["lamin_lightning"] == {
        "run_uid": RUN_UID,
        "features": {"dataset": "digits"},
        "hyperparameters": {"lr": 0.1},
        "trainer": {"max_epochs": 3, "precision": "32-true"},
    }
    summary = _updates(records, "summary")
    assert summary[f"lamin_lightning/{link.artifact_name}/best"] == first.key
    # Offline, a logged version's aliases are fixed: "best" stays on the second.
    assert _holders(versions) == {"best": 1, "latest": 1}
    assert "cannot move back" in caplog.text


@pytest.mark.parametrize("policy", ["untag", "delete"], ids=["untag", "delete"])
def test_offline_eviction_is_listed_in_the_run_summary(
    home, tmp_path, monkeypatch, caplog, policy
):
    monkeypatch.setenv(plugin.EVICTION_ENV, policy)
    plugin.lamin_lightning_fit_started(event=_started())
    first, second = _saved(tmp_path, 10, 0.5, True), _saved(tmp_path, 20, 0.4, True)
    plugin.lamin_lightning_artifact_saved(event=first)
    plugin.lamin_lightning_artifact_saved(event=second)
    with caplog.at_level(logging.INFO, logger=plugin.__name__):
        plugin.lamin_lightning_artifact_removed(event=_removed(first))
    link = plugin.run_link(CB)
    plugin.lamin_lightning_fit_ended(event=_ended())

    records = _records(home, link.run_id)
    summary = _updates(records, "summary")
    assert summary[f"lamin_lightning/{link.artifact_name}/evicted"] == [first.key]
    assert _holders(_versions(records, link.artifact_name)) == {
        "best": 1,
        "latest": 1,
    }
    (message,) = [r for r in caplog.records if first.key in r.getMessage()]
    if policy == "delete":
        assert message.levelno == logging.WARNING
        assert "cannot be deleted before `wandb sync`" in message.getMessage()
    else:
        assert message.levelno == logging.INFO
        assert "holds no alias" in message.getMessage()


def test_upload_policy_stages_a_copy(home, tmp_path, monkeypatch):
    monkeypatch.setenv(plugin.UPLOAD_ENV, "upload")
    plugin.lamin_lightning_fit_started(event=_started())
    event = _saved(tmp_path, 10, 0.5, True)
    plugin.lamin_lightning_artifact_saved(event=event)
    link = plugin.run_link(CB)
    plugin.lamin_lightning_fit_ended(event=_ended())

    (version,) = _versions(_records(home, link.run_id), link.artifact_name)
    entry = _entry(version)
    assert entry.ref == ""
    assert Path(entry.local_path).read_bytes() == event.local_path.read_bytes()
    assert json.loads(version.metadata)["storage_uri"] == event.storage_uri


def test_a_scheme_without_reference_support_is_uploaded(home, tmp_path):
    plugin.lamin_lightning_fit_started(event=_started())
    event = _saved(tmp_path, 10, 0.5, True, storage_uri="lamin://bucket/x.ckpt")
    plugin.lamin_lightning_artifact_saved(event=event)
    link = plugin.run_link(CB)
    plugin.lamin_lightning_fit_ended(event=_ended())

    (version,) = _versions(_records(home, link.run_id), link.artifact_name)
    assert _entry(version).ref == ""
    assert (
        Path(_entry(version).local_path).read_bytes() == event.local_path.read_bytes()
    )
    assert json.loads(version.metadata)["storage_uri"] == "lamin://bucket/x.ckpt"


@pytest.mark.parametrize("policy", ["reference", "upload"], ids=["reference", "upload"])
def test_a_file_gone_before_registration_is_skipped(
    home, tmp_path, monkeypatch, caplog, policy
):
    # Registrars run on the callback's worker thread: with the built-in
    # persister, Lightning may have evicted the file by then.
    monkeypatch.setenv(plugin.UPLOAD_ENV, policy)
    plugin.lamin_lightning_fit_started(event=_started())
    gone = _saved(tmp_path, 10, 0.5, True)
    gone.local_path.unlink()
    with caplog.at_level(logging.INFO, logger=plugin.__name__):
        plugin.lamin_lightning_artifact_saved(event=gone)
        plugin.lamin_lightning_artifact_removed(event=_removed(gone))
    plugin.lamin_lightning_artifact_saved(event=_saved(tmp_path, 20, 0.4, True))
    link = plugin.run_link(CB)
    plugin.lamin_lightning_fit_ended(event=_ended())

    (version,) = _versions(_records(home, link.run_id), link.artifact_name)
    assert json.loads(version.metadata)["global_step"] == 20
    assert f"W&B: skipped {gone.key}, {gone.local_path} is gone" in caplog.text


def test_config_and_hparams_are_run_files(home, tmp_path):
    plugin.lamin_lightning_fit_started(event=_started())
    events = []
    for kind, name in (("config", "config.yaml"), ("hparams", "hparams.yaml")):
        path = tmp_path / name
        path.write_text(f"{kind}: 1\n")
        key = f"{PREFIX}/{name}"
        events.append(
            ArtifactSavedEvent(
                callback_id=CB,
                run_uid=RUN_UID,
                kind=kind,
                key=key,
                local_path=path,
                storage_uri=path.as_uri(),
                artifact_uid=f"lnArt-{kind}",
            )
        )
        plugin.lamin_lightning_artifact_saved(event=events[-1])
        path.write_text("rewritten after the event\n")
    link = plugin.run_link(CB)
    plugin.lamin_lightning_fit_ended(event=_ended())

    records = _records(home, link.run_id)
    run_dir = _run_dir(home, link.run_id)
    saved = [
        f.path
        for r in records
        if r.WhichOneof("record_type") == "files"
        for f in r.files.files
    ]
    config = _updates(records, "config")
    for event in events:
        name = f"lamin_lightning/{event.key}"
        assert name in saved
        assert (run_dir / "files" / name).read_text() == f"{event.kind}: 1\n"
        assert config[f"lamin_{event.kind}"] == {
            "key": event.key,
            "storage_uri": event.storage_uri,
            "artifact_uid": f"lnArt-{event.kind}",
        }
    assert _versions(records, link.artifact_name) == []


def test_an_active_run_is_reused_and_left_open(home, tmp_path):
    run = wandb.init(project="user-project")
    plugin.lamin_lightning_fit_started(event=_started())
    plugin.lamin_lightning_artifact_saved(event=_saved(tmp_path, 10, 0.5, True))
    plugin.lamin_lightning_fit_ended(event=_ended())
    link = plugin.run_link(CB)

    assert wandb.run is run, "a run the plugin did not start stays open"
    assert (link.run_id, link.project, link.started_here) == (
        run.id,
        "user-project",
        False,
    )
    run.finish()
    assert len(_versions(_records(home, run.id), f"model-{run.id}")) == 1


def test_two_callbacks_share_the_run_with_one_artifact_each(home, tmp_path):
    other = "Checkpoint{'monitor': 'val/acc', 'mode': 'max'}"
    plugin.lamin_lightning_fit_started(event=_started())
    plugin.lamin_lightning_fit_started(event=_started(other, monitor="val/acc"))
    plugin.lamin_lightning_artifact_saved(event=_saved(tmp_path, 10, 0.5, True))
    plugin.lamin_lightning_artifact_saved(
        event=_saved(tmp_path, 11, 0.9, True, callback_id=other, monitor="val/acc")
    )
    first, second = plugin.run_link(CB), plugin.run_link(other)
    plugin.lamin_lightning_fit_ended(event=_ended())
    assert wandb.run is not None, "the run stays open while a callback uses it"
    plugin.lamin_lightning_fit_ended(event=_ended(other))
    assert wandb.run is None

    assert first.run_id == second.run_id
    assert first.artifact_name == f"model-{first.run_id}"
    assert second.artifact_name == f"model-{first.run_id}-val_acc"
    records = _records(home, first.run_id)
    assert len(_versions(records, first.artifact_name)) == 1
    (version,) = _versions(records, second.artifact_name)
    assert json.loads(version.metadata)["monitor"] == "val/acc"


def test_a_bad_policy_value_is_named(home, monkeypatch):
    monkeypatch.setenv(plugin.EVICTION_ENV, "purge")
    match = r"LAMIN_LIGHTNING_WANDB_EVICTION='purge' .* 'untag', 'delete'"
    with pytest.raises(ValueError, match=match):
        plugin.lamin_lightning_fit_started(event=_started())
    assert wandb.run is None


def test_without_project_or_offline_mode_it_warns_and_skips(
    home, tmp_path, monkeypatch
):
    monkeypatch.delenv("WANDB_MODE")
    with pytest.warns(LaminLightningWarning, match="WANDB_PROJECT.*WANDB_MODE=offline"):
        plugin.lamin_lightning_fit_started(event=_started("cb-unconfigured"))
    plugin.lamin_lightning_artifact_saved(
        event=_saved(tmp_path, 10, 0.5, True, callback_id="cb-unconfigured")
    )
    plugin.lamin_lightning_fit_ended(event=_ended("cb-unconfigured"))
    assert wandb.run is None
    assert plugin.run_link("cb-unconfigured") is None


def test_a_missing_login_warns_and_skips(home, monkeypatch):
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("WANDB_PROJECT", "p")
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # never reached
    with pytest.warns(LaminLightningWarning, match="No API key configured"):
        plugin.lamin_lightning_fit_started(event=_started("cb-no-login"))
    assert plugin.run_link("cb-no-login") is None


def test_without_wandb_the_plugin_is_unavailable(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # find_spec answers None
    spec = importlib.util.spec_from_file_location("wandb_copy", plugin.__file__)
    with pytest.raises(PluginUnavailable, match=r"lamin-lightning\[wandb\]"):
        spec.loader.exec_module(importlib.util.module_from_spec(spec))


# -- end to end: a real fit drives the plugin through the entry point -----------


class Tiny(lp.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, _):
        return torch.nn.functional.mse_loss(self.layer(batch[0]), batch[1])

    def validation_step(self, batch, _):
        self.log(
            "val_loss", torch.nn.functional.mse_loss(self.layer(batch[0]), batch[1])
        )

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(checkpoint: Checkpoint, logger) -> None:
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(16, 4), torch.randn(16, 1))
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    trainer = lp.Trainer(
        max_epochs=4,
        accelerator="cpu",
        logger=logger,
        callbacks=[checkpoint],
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Tiny(), loader, loader)
    assert checkpoint.delivery_failures == []


# With the built-in persister, storage URIs are Lightning's own files, which an
# asynchronous callback may deliver after eviction (test above); synchronous
# delivery makes the counts below exact.


def test_a_fit_with_wandb_logger_registers_its_checkpoints(home, tmp_path):
    checkpoint = Checkpoint(
        dirpath=tmp_path / "ckpts",
        monitor="val_loss",
        save_top_k=2,
        disable_plugins=OTHER_PLUGINS,
        asynchronous=False,
    )
    logger = WandbLogger(project="fit", save_dir=str(tmp_path), offline=True)
    _fit(checkpoint, logger)

    link = plugin.run_link(checkpoint.state_key)
    assert (link.run_id, link.started_here) == (logger.experiment.id, False)
    assert wandb.run is logger.experiment, "the logger's run stays open"
    wandb.run.finish()
    records = _records(tmp_path, link.run_id)
    versions = _versions(records, link.artifact_name)
    keys = [json.loads(v.metadata)["key"] for v in versions]
    assert len(versions) == 4
    assert all("latest" in v.aliases for v in versions)
    best = checkpoint.key_for("checkpoint", checkpoint.best_model_path)
    assert keys[_holders(versions)["best"]] == best
    best_path = Path(checkpoint.best_model_path).resolve()
    best_entry = _entry(versions[keys.index(best)])
    assert (best_entry.ref, best_entry.size) == (
        best_path.as_uri(),
        best_path.stat().st_size,
    )
    evicted = _updates(records, "summary")[
        f"lamin_lightning/{link.artifact_name}/evicted"
    ]
    kept = {checkpoint.key_for("checkpoint", p) for p in checkpoint.best_k_models}
    assert sorted(evicted) == sorted(set(keys) - kept)


def test_a_fit_without_logger_runs_its_own_run_and_versions_last_ckpt(home, tmp_path):
    checkpoint = Checkpoint(
        dirpath=tmp_path / "ckpts",
        monitor="val_loss",
        save_top_k=1,
        save_last=True,
        disable_plugins=OTHER_PLUGINS,
        asynchronous=False,
    )
    _fit(checkpoint, logger=False)

    link = plugin.run_link(checkpoint.state_key)
    assert link.started_here
    assert wandb.run is None, "the plugin finished the run it started"
    versions = _versions(_records(home, link.run_id), link.artifact_name)
    keys = [json.loads(v.metadata)["key"] for v in versions]
    last = [
        v for v, key in zip(versions, keys, strict=True) if key.endswith("/last.ckpt")
    ]
    assert len(last) == 4
    assert len({v.digest for v in last}) == 4, "each save of last.ckpt is a version"
    holders = _holders(versions)
    assert keys[holders["latest"]].endswith("/last.ckpt")
    assert keys[holders["best"]] == checkpoint.key_for(
        "checkpoint", checkpoint.best_model_path
    )
