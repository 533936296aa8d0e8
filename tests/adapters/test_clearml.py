"""The ClearML registrar against the real clearml client.

Offline mode runs everywhere and is read back from the task object and the
offline session folder. The online path needs a ClearML server, which needs
Docker; a recorded endpoint on 127.0.0.1 (``clearml_recorded_server``)
answers the API calls instead, and the tests read back what the real client
sent to it.

ClearML keeps its configuration and API session per process, read once: all
tests here share one recorded endpoint and one ``clearml.conf`` (module
fixture) and switch between offline and online with ``Task.set_offline``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from clearml import Task
from clearml.backend_api import Session
from clearml.config import get_offline_dir
from clearml.config.cache import SessionCache

from lamin_lightning_adapters import clearml as plugin
from lamin_lightning_core import (
    ArtifactRemovedEvent,
    ArtifactSavedEvent,
    Checkpoint,
    FitEndedEvent,
    FitStartedEvent,
    PluginUnavailable,
    save_lightning_features,
)
from tests.adapters.clearml_recorded_server import RecordedClearMLServer
from tests.helpers import fit

CB = "Checkpoint{'monitor': 'score', 'mode': 'min'}"
RUN_UID = "lnRun0000000001"
PREFIX = f"lightning_logs/{RUN_UID}"
OTHER_PLUGINS = ["lamindb", "mlflow", "wandb"]
LOGGER = plugin.__name__

UNCONFIGURED_FIT = f"""
import json, sys, warnings
import lamin_lightning_core as ll
from tests.helpers import fit

with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    checkpoint = ll.Checkpoint(disable_plugins={OTHER_PLUGINS!r})
    fit([checkpoint], sys.argv[1], steps=2)
ours = [w for w in caught if issubclass(w.category, ll.LaminLightningWarning)]
print(json.dumps({{
    "warnings": [str(w.message) for w in ours],
    "failures": len(checkpoint.delivery_failures),
    "best": checkpoint.best_model_path,
}}))
"""

# -- fixtures -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RecordedClearMLServer]:
    """One recorded endpoint and ``clearml.conf``; every ClearML path under tmp."""
    root = tmp_path_factory.mktemp("clearml")
    was_offline = Task.is_offline()
    with RecordedClearMLServer() as recorded, pytest.MonkeyPatch.context() as mp:
        mp.setenv("CLEARML_CONFIG_FILE", str(recorded.write_config(root / "conf")))
        mp.setenv("CLEARML_CACHE_DIR", str(root / "cache"))
        for variable in ("CLEARML_OFFLINE_MODE", "TRAINS_OFFLINE_MODE"):
            mp.setenv(variable, "0")  # Task.set_offline writes both; restored
        mp.setattr(SessionCache, "SESSION_CACHE_FOLDER", str(root / "session"))
        for variable in (plugin.EVICTION_ENV, plugin.PROJECT_ENV):
            mp.delenv(variable, raising=False)
        if Session.get_api_server_host() != recorded.url:
            pytest.fail(
                "ClearML read its configuration before these tests set "
                "CLEARML_CONFIG_FILE (it reads it once per process): run "
                "tests/adapters/test_clearml.py before other ClearML users."
            )
        yield recorded
        Task.set_offline(was_offline)


def _close_current_task() -> None:
    task = Task.current_task()
    if task is not None:
        task.close()


@pytest.fixture
def offline(server: RecordedClearMLServer) -> Iterator[None]:
    Task.set_offline(True)
    yield
    _close_current_task()


@pytest.fixture
def online(server: RecordedClearMLServer) -> Iterator[RecordedClearMLServer]:
    Task.set_offline(False)
    yield server
    _close_current_task()


def _user_task(name: str = "user fit") -> Task:
    """The task a user opened before training, as a script would."""
    return Task.init(
        project_name="user-project",
        task_name=name,
        reuse_last_task_id=False,
        auto_connect_streams=False,
        auto_connect_frameworks=False,
        auto_connect_arg_parser=False,
        auto_resource_monitoring=False,
    )


def _started(callback_id: str = CB) -> FitStartedEvent:
    return FitStartedEvent(
        callback_id=callback_id,
        run_uid=RUN_UID,
        base_prefix=PREFIX,
        checkpoint_key_prefix=f"{PREFIX}/checkpoints",
        monitor="score",
        mode="min",
    )


def _saved(tmp_path: Path, name: str, step: int, **fields: Any) -> ArtifactSavedEvent:
    path = tmp_path / name
    path.write_bytes(b"weights")
    kind = fields.pop("kind", "checkpoint")
    key = f"{PREFIX}/checkpoints/{name}" if kind == "checkpoint" else f"{PREFIX}/{name}"
    return ArtifactSavedEvent(
        callback_id=CB,
        run_uid=RUN_UID,
        kind=kind,
        key=key,
        local_path=path,
        storage_uri=fields.pop("storage_uri", path.as_uri()),
        artifact_uid=f"lnArt{step:011d}",
        epoch=0,
        global_step=step,
        **({"monitor": "score"} | fields if kind == "checkpoint" else {}),
    )


def _removed(saved: ArtifactSavedEvent) -> ArtifactRemovedEvent:
    shared = set(ArtifactRemovedEvent.model_fields) - {"event_id", "event_type"}
    return ArtifactRemovedEvent(**saved.model_dump(include=shared))


def _ended(status: str = "finished") -> FitEndedEvent:
    return FitEndedEvent(callback_id=CB, run_uid=RUN_UID, status=status)


# -- policies and availability ---------------------------------------------------------


def test_without_clearml_the_plugin_is_unavailable(monkeypatch):
    monkeypatch.setitem(sys.modules, "clearml", None)  # find_spec answers None
    spec = importlib.util.spec_from_file_location("clearml_copy", plugin.__file__)
    with pytest.raises(PluginUnavailable, match=r"lamin-lightning\[clearml\]"):
        spec.loader.exec_module(importlib.util.module_from_spec(spec))


def test_an_unknown_eviction_policy_is_refused_by_name(monkeypatch):
    monkeypatch.setenv(plugin.EVICTION_ENV, "shred")
    with pytest.raises(ValueError, match="LAMIN_LIGHTNING_CLEARML_EVICTION='shred'"):
        plugin.lamin_lightning_fit_started(event=_started("policy-test"))
    assert plugin.task_link("policy-test") is None


# -- offline: checkpoints degrade to task artifacts -----------------------------------


def _session_artifacts(task_id: str) -> dict[str, dict[str, Any]]:
    """A closed task's artifacts as its offline session folder stores them.

    While a task runs, its background threads rewrite ``task.json``.
    """
    stored = json.loads((get_offline_dir(task_id) / "task.json").read_text())
    return {a["key"]: a for a in stored["execution"].get("artifacts", [])}


def test_offline_checkpoints_become_task_artifacts_with_one_warning(
    offline, tmp_path, caplog
):
    task = _user_task()
    first = _saved(tmp_path, "epoch=0-step=1.ckpt", 1, score=0.5, is_best=True)
    second = _saved(tmp_path, "epoch=0-step=2.ckpt", 2, score=0.7)
    remote = _saved(
        tmp_path, "epoch=0-step=3.ckpt", 3, score=0.9, storage_uri="s3://b/x.ckpt"
    )
    config = _saved(tmp_path, "config.yaml", 3, kind="config")

    with caplog.at_level(logging.INFO, logger=LOGGER):
        plugin.lamin_lightning_fit_started(event=_started())
        for event in (first, second, remote, config):
            plugin.lamin_lightning_artifact_saved(event=event)
        plugin.lamin_lightning_fit_ended(event=_ended())

    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [r.name for r in warnings] == [LOGGER]
    assert "offline mode cannot register output models" in warnings[0].message
    link = plugin.task_link(CB)
    assert (link.task_id, link.offline, link.started_here) == (task.id, True, False)
    assert link.url is None
    assert Task.current_task() is task, "a reused task stays open"
    metadata = task.artifacts[first.key].metadata
    second_tags = task.artifacts[second.key].metadata["tags"]

    task.close()
    stored = _session_artifacts(task.id)
    assert set(stored) == {first.key, second.key, remote.key, config.key}
    assert stored[first.key]["type"] == "string"
    assert stored[first.key]["type_data"]["preview"] == first.storage_uri
    assert stored[remote.key]["uri"] == "s3://b/x.ckpt", "a remote URI is a link"
    assert Path(stored[config.key]["uri"]).read_bytes() == b"weights"
    assert metadata["lamindb_artifact_uid"] == first.artifact_uid
    assert metadata["lamindb_run_uid"] == RUN_UID
    assert metadata["storage_uri"] == first.storage_uri
    assert (metadata["score"], metadata["is_best"]) == ("0.5", "True")
    assert metadata["tags"] == "lamin-lightning,checkpoint,latest,best"
    assert second_tags.endswith("checkpoint,latest")


@pytest.mark.parametrize(
    ("policy", "left"), [("delete", False), ("untag", True)], ids=["delete", "untag"]
)
def test_offline_eviction_follows_the_policy(
    offline, tmp_path, monkeypatch, policy, left
):
    monkeypatch.setenv(plugin.EVICTION_ENV, policy)
    task = _user_task()
    evicted = _saved(tmp_path, "epoch=0-step=1.ckpt", 1, score=0.5, is_best=True)
    plugin.lamin_lightning_fit_started(event=_started())
    plugin.lamin_lightning_artifact_saved(event=evicted)
    plugin.lamin_lightning_artifact_removed(event=_removed(evicted))
    plugin.lamin_lightning_fit_ended(event=_ended())

    task.close()
    stored = _session_artifacts(task.id)
    assert (evicted.key in stored) is left
    if left:
        tags = dict(stored[evicted.key]["display_data"])["tags"].split(",")
        assert tags == ["lamin-lightning", "checkpoint", "evicted"]
    assert evicted.local_path.exists(), "the plugin never deletes bytes"


def test_offline_plugin_starts_its_own_task_and_closes_it(offline, tmp_path):
    assert Task.current_task() is None
    plugin.lamin_lightning_fit_started(event=_started())
    link = plugin.task_link(CB)
    task = Task.current_task()
    assert (link.task_id, link.started_here) == (task.id, True)
    assert (task.name, link.project) == (PREFIX, plugin.DEFAULT_PROJECT)
    # Found with the demo: that thread's git/pip child hung, close() waited 300 s.
    assert task._detect_repo_async_thread is None, "repository detection is off"
    plugin.lamin_lightning_artifact_saved(
        event=_saved(tmp_path, "hparams.yaml", 1, kind="hparams")
    )
    plugin.lamin_lightning_fit_ended(event=_ended())

    assert Task.current_task() is None
    zipped = get_offline_dir(task.id).with_suffix(".zip")
    assert zipped.is_file(), "close() wrote the offline session"
    assert set(_session_artifacts(task.id)) == {f"{PREFIX}/hparams.yaml"}


@pytest.mark.slow
def test_without_configuration_the_plugin_warns_and_training_goes_on(tmp_path):
    # A fresh process: ClearML reads its configuration once per process. An
    # empty clearml.conf stands for none, whatever the home folder holds.
    empty = tmp_path / "clearml.conf"
    empty.touch()
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("CLEARML_", "TRAINS_"))
    }
    env |= {"CLEARML_CONFIG_FILE": str(empty), "CLEARML_CACHE_DIR": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-c", UNCONFIGURED_FIT, str(tmp_path / "fit")],
        cwd=Path(__file__).parents[2],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    [warning] = result["warnings"]
    assert "'clearml' plugin found no ClearML configuration" in warning
    for remedy in ("clearml-init", "CLEARML_CONFIG_FILE", "CLEARML_OFFLINE_MODE=1"):
        assert remedy in warning
    assert result["failures"] == 0
    assert Path(result["best"]).is_file(), "the checkpoint is still persisted"


# -- online: output models registered by URI, read back from the recorded endpoint ----


def _since(server: RecordedClearMLServer, mark: int, endpoint: str) -> list[Any]:
    return [r.body for r in server.requests[mark:] if r.endpoint == endpoint]


def _model_named(server: RecordedClearMLServer, key: str) -> dict[str, Any]:
    """The model the current fit registered for ``key``."""
    task_id = plugin.task_link(CB).task_id
    [model] = [
        m
        for m in server.models.values()
        if (m.get("name"), m.get("task")) == (key, task_id)
    ]
    return model


def test_online_checkpoints_are_output_models_registered_by_uri(online, tmp_path):
    task = _user_task()
    mark = len(online.requests)
    first = _saved(tmp_path, "epoch=0-step=1.ckpt", 1, score=0.5, is_best=True)
    second = _saved(tmp_path, "epoch=0-step=2.ckpt", 2, score=0.7)
    third = _saved(tmp_path, "epoch=0-step=3.ckpt", 3, score=0.1, is_best=True)
    config = _saved(tmp_path, "config.yaml", 3, kind="config")
    plugin.lamin_lightning_fit_started(event=_started())
    for event in (first, second, third, config):
        plugin.lamin_lightning_artifact_saved(event=event)
    plugin.lamin_lightning_fit_ended(event=_ended())

    link = plugin.task_link(CB)
    assert (link.task_id, link.offline, link.started_here) == (task.id, False, False)
    assert (
        link.url
        == f"{online.url}/projects/project0001/experiments/{task.id}/output/log"
    )
    assert len(_since(online, mark, "models.create")) == 3
    registered = {
        body["name"]: body["uri"]
        for body in _since(online, mark, "models.edit")
        if not body["uri"].endswith("uploading_file")
    }
    assert registered == {e.key: e.storage_uri for e in (first, second, third)}
    models = {e.key: _model_named(online, e.key) for e in (first, second, third)}
    outputs = online.tasks[task.id]["models"]["output"]
    assert outputs == [{"name": k, "model": m["id"]} for k, m in models.items()]
    base = ["lamin-lightning", "checkpoint"]
    assert [m["tags"] for m in models.values()] == [
        base,
        base,
        [*base, "latest", "best"],
    ]
    model = models[third.key]
    assert (model["framework"], model["task"]) == (plugin.FRAMEWORK, task.id)
    assert "LaminDB artifact lnArt00000000003" in model["comment"]
    metadata = {k: v["value"] for k, v in model["metadata"].items()}
    assert metadata == {
        "key": third.key,
        "storage_uri": third.storage_uri,
        "epoch": "0",
        "global_step": "3",
        "lamindb_artifact_uid": "lnArt00000000003",
        "lamindb_run_uid": RUN_UID,
        "is_best": "True",
        "monitor": "score",
        "score": "0.1",
    }
    [artifacts] = [
        b["artifacts"] for b in _since(online, mark, "tasks.add_or_update_artifacts")
    ]
    assert [a["key"] for a in artifacts] == [config.key]


def test_online_a_key_saved_again_updates_its_model(online, tmp_path):
    _user_task()
    mark = len(online.requests)
    plugin.lamin_lightning_fit_started(event=_started())
    for step in (1, 2):
        last = _saved(tmp_path, "last.ckpt", step, storage_uri=f"s3://b/last-{step}")
        plugin.lamin_lightning_artifact_saved(event=last)
    plugin.lamin_lightning_fit_ended(event=_ended())

    assert len(_since(online, mark, "models.create")) == 1
    [output] = online.tasks[plugin.task_link(CB).task_id]["models"]["output"]
    assert output["name"] == last.key, "one task entry for the key"
    uris = [b["uri"] for b in _since(online, mark, "models.edit") if "uri" in b]
    assert uris[-2:] == ["s3://b/last-1", "s3://b/last-2"]
    assert _model_named(online, last.key)["metadata"]["global_step"]["value"] == "2"


@pytest.mark.parametrize("policy", ["delete", "untag"], ids=["delete", "untag"])
def test_online_eviction_follows_the_policy(online, tmp_path, monkeypatch, policy):
    monkeypatch.setenv(plugin.EVICTION_ENV, policy)
    _user_task()
    evicted = _saved(tmp_path, "epoch=0-step=1.ckpt", 1, score=0.5, is_best=True)
    kept = _saved(tmp_path, "epoch=0-step=2.ckpt", 2, score=0.1, is_best=True)
    plugin.lamin_lightning_fit_started(event=_started())
    plugin.lamin_lightning_artifact_saved(event=evicted)
    model_id = _model_named(online, evicted.key)["id"]
    mark = len(online.requests)
    plugin.lamin_lightning_artifact_saved(event=kept)
    plugin.lamin_lightning_artifact_removed(event=_removed(evicted))
    plugin.lamin_lightning_fit_ended(event=_ended())

    deletes = _since(online, mark, "models.delete")
    if policy == "delete":
        assert [(b["model"], b["force"]) for b in deletes] == [(model_id, True)]
        assert model_id not in online.models
    else:
        assert deletes == []
        tags = online.models[model_id]["tags"]
        assert tags == ["lamin-lightning", "checkpoint", "evicted"]
    assert _model_named(online, kept.key)["tags"][-2:] == ["latest", "best"]
    assert evicted.local_path.exists(), "the plugin never deletes bytes"


@pytest.mark.parametrize(
    ("status", "task_status"),
    [("finished", "completed"), ("failed", "failed"), ("interrupted", "stopped")],
    ids=["finished", "failed", "interrupted"],
)
def test_online_plugin_starts_its_own_task_and_closes_it(online, status, task_status):
    assert Task.current_task() is None
    mark = len(online.requests)
    plugin.lamin_lightning_fit_started(event=_started())
    link = plugin.task_link(CB)
    [created] = _since(online, mark, "tasks.create")
    assert created["name"] == PREFIX
    assert link.started_here and not link.offline
    plugin.lamin_lightning_fit_ended(event=_ended(status))

    assert Task.current_task() is None
    assert online.tasks[link.task_id]["status"] == task_status
    closing = {"tasks.completed", "tasks.failed", "tasks.stopped"}
    sent = [r for r in online.requests[mark:] if r.endpoint in closing]
    assert sent[0].endpoint == "tasks.completed", "close() always completes"
    if status != "finished":
        assert sent[-1].endpoint == f"tasks.{task_status}"
        assert sent[-1].body["force"] is True


# -- end to end: a real fit drives the plugin through its entry point -----------------


def _fit(tmp_path: Path) -> Checkpoint:
    from lightning.pytorch.loggers import CSVLogger

    checkpoint = Checkpoint(
        monitor="score",
        mode="min",
        save_top_k=1,
        every_n_train_steps=1,
        disable_plugins=OTHER_PLUGINS,
    )
    assert checkpoint.plugin_manager.has_plugin(plugin.PLUGIN_NAME)
    fit([checkpoint], tmp_path, steps=3, scores=[1, 2, 0], logger=CSVLogger(tmp_path))
    assert checkpoint.delivery_failures == []
    return checkpoint


def _kept_and_hparams(checkpoint: Checkpoint, tmp_path: Path) -> tuple[str, str]:
    [kept] = [checkpoint.key_for("checkpoint", p) for p in checkpoint.best_k_models]
    [hparams] = tmp_path.rglob("hparams.yaml")
    return kept, checkpoint.key_for("hparams", hparams)


def test_a_fit_records_checkpoints_on_an_offline_task(offline, tmp_path):
    task = _user_task("offline fit")
    checkpoint = _fit(tmp_path)

    kept, hparams = _kept_and_hparams(checkpoint, tmp_path)
    assert plugin.task_link(checkpoint.state_key).task_id == task.id
    task.close()
    stored = _session_artifacts(task.id)
    assert set(stored) == {kept, hparams}, "the evicted checkpoint was deleted"
    metadata = dict(stored[kept]["display_data"])
    assert metadata["storage_uri"] == Path(checkpoint.best_model_path).as_uri()
    assert metadata["tags"].split(",")[-2:] == ["latest", "best"]


def test_a_fit_registers_output_models_on_an_online_task(online, tmp_path):
    task = _user_task("online fit")
    mark = len(online.requests)
    checkpoint = _fit(tmp_path)

    kept, hparams = _kept_and_hparams(checkpoint, tmp_path)
    [output] = online.tasks[task.id]["models"]["output"]
    model = online.models[output["model"]]
    assert model["name"] == kept, "the evicted model was deleted"
    assert model["uri"] == Path(checkpoint.best_model_path).as_uri()
    assert model["tags"][-2:] == ["latest", "best"]
    assert len(_since(online, mark, "models.delete")) == 1
    uploaded = _since(online, mark, "tasks.add_or_update_artifacts")
    assert [a["key"] for body in uploaded for a in body["artifacts"]] == [hparams]


def test_a_tracked_fit_links_lamindb_and_a_task_the_plugin_starts(
    offline, ln, tracked_run, tmp_path
):
    # ln.track() wraps stdout; the task the plugin starts must not capture it.
    save_lightning_features()
    checkpoint = Checkpoint(
        monitor="score",
        save_top_k=1,
        every_n_train_steps=1,
        disable_plugins=["mlflow", "wandb"],
    )
    fit([checkpoint], tmp_path, steps=2, scores=[2, 1])
    assert checkpoint.delivery_failures == []

    link = plugin.task_link(checkpoint.state_key)
    assert link.started_here and Task.current_task() is None
    artifact = checkpoint.last_checkpoint_artifact
    [recorded] = _session_artifacts(link.task_id).values()
    metadata = dict(recorded["display_data"])
    assert recorded["key"] == artifact.key == metadata["key"]
    assert metadata["lamindb_artifact_uid"] == artifact.uid
    assert metadata["lamindb_run_uid"] == tracked_run.uid
    assert recorded["type_data"]["preview"] == artifact.path.as_uri()
    assert [(r.system, r.run_id) for r in checkpoint.backend_runs] == [
        ("clearml", link.task_id)
    ]
    assert tracked_run.features.get_values()["clearml_run_id"] == link.task_id
