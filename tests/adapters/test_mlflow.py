"""The MLflow registrar against a real SQLite store and a real ``mlflow server``.

Hooks are first called directly with hand-built events, then driven by a
tiny Lightning fit. Everything MLflow writes lives under pytest's tmp dirs;
what was recorded is read back with ``MlflowClient``.
"""

from __future__ import annotations

import logging
import posixpath
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import mlflow
import pytest
from mlflow import MlflowClient

from lamin_lightning_adapters import mlflow as adapter
from lamin_lightning_core._events import (
    ArtifactRemovedEvent,
    ArtifactSavedEvent,
    FitEndedEvent,
    FitStartedEvent,
)

from .mlflow_server import running_mlflow_server

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

    from .mlflow_server import MlflowServer

RUN_UID = "RUNUID00000001"
OTHER_REGISTRARS = ["mlflow", "wandb", "clearml", "lamindb"]


@dataclass(frozen=True)
class Backend:
    """A tracking URI and the experiment the registrar's own runs go to."""

    name: str
    uri: str
    experiment_id: str
    refuses_file_sources: bool


@dataclass
class Events:
    """Builds the events one ``Checkpoint`` callback would emit."""

    root: Path
    job: str
    callback_id: str = "Checkpoint{'monitor': 'val_loss'}"

    @property
    def prefix(self) -> str:
        return f"jobs/{self.job}/{RUN_UID}/checkpoints"

    @property
    def model_name(self) -> str:
        return f"jobs-{self.job}-checkpoints"

    def started(self, logger_version: str | None = None) -> FitStartedEvent:
        return FitStartedEvent(
            callback_id=self.callback_id,
            run_uid=RUN_UID,
            base_prefix=posixpath.dirname(self.prefix),
            checkpoint_key_prefix=self.prefix,
            logger_version=logger_version,
            monitor="val_loss",
            mode="min",
        )

    def saved(
        self,
        name: str,
        *,
        score: float | None = None,
        is_best: bool = False,
        step: int = 0,
        kind: str = "checkpoint",
    ) -> ArtifactSavedEvent:
        folder = self.prefix if kind != "config" else posixpath.dirname(self.prefix)
        key = f"{folder}/{name}"
        path = self.root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(f"{name} at step {step}".encode())
        return ArtifactSavedEvent(
            callback_id=self.callback_id,
            run_uid=RUN_UID,
            kind=kind,  # type: ignore[arg-type]
            key=key,
            local_path=path,
            storage_uri=path.as_uri(),
            artifact_uid=f"uid-{name}",
            epoch=step // 10,
            global_step=step,
            monitor="val_loss" if kind == "checkpoint" else None,
            score=score,
            is_best=is_best,
        )

    def removed(self, saved: ArtifactSavedEvent) -> ArtifactRemovedEvent:
        saved.local_path.unlink()
        fields = saved.model_dump(
            include={"callback_id", "run_uid", "kind", "key", "local_path"}
            | {"storage_uri", "artifact_uid", "epoch", "global_step"}
        )
        return ArtifactRemovedEvent(**fields)

    def ended(self, status: str = "finished") -> FitEndedEvent:
        return FitEndedEvent(
            callback_id=self.callback_id,
            run_uid=RUN_UID,
            status=status,  # type: ignore[arg-type]
        )


# -- fixtures -----------------------------------------------------------------


@pytest.fixture(autouse=True)
def clean_mlflow(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No MLflow configuration leaks into or out of a test."""
    for name in (
        "MLFLOW_TRACKING_URI",
        "MLFLOW_EXPERIMENT_ID",
        "MLFLOW_EXPERIMENT_NAME",
        "MLFLOW_RUN_ID",
        adapter.MODEL_NAME_ENV,
        adapter.EVICTION_ENV,
    ):
        monkeypatch.delenv(name, raising=False)
    mlflow.set_tracking_uri(None)  # type: ignore[arg-type]
    yield
    while mlflow.active_run() is not None:
        mlflow.end_run()
    mlflow.set_tracking_uri(None)  # type: ignore[arg-type]
    adapter._fits.clear()


@pytest.fixture(scope="module")
def sqlite_backend(tmp_path_factory: pytest.TempPathFactory) -> Backend:
    root = tmp_path_factory.mktemp("mlflow-sqlite")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    experiment_id = MlflowClient(tracking_uri=uri).create_experiment(
        "lamin-lightning", artifact_location=(root / "artifacts").as_uri()
    )
    return Backend("sqlite", uri, experiment_id, refuses_file_sources=False)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    with running_mlflow_server(tmp_path_factory.mktemp("mlflow-server")) as server:
        yield server


@pytest.fixture(scope="module")
def server_backend(mlflow_server: MlflowServer) -> Backend:
    experiment_id = MlflowClient(tracking_uri=mlflow_server.url).create_experiment(
        f"lamin-lightning-{time.time_ns()}"
    )
    return Backend("server", mlflow_server.url, experiment_id, True)


@pytest.fixture(
    params=["sqlite", pytest.param("server", marks=pytest.mark.slow)],
)
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Backend:
    """Each backend, configured the way a user would: tracking URI and experiment."""
    chosen: Backend = request.getfixturevalue(f"{request.param}_backend")
    mlflow.set_tracking_uri(chosen.uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", chosen.experiment_id)
    return chosen


@pytest.fixture
def events(tmp_path: Path, request: pytest.FixtureRequest) -> Callable[[str], Events]:
    # Model names are derived from the key prefix: one job name per test
    # keeps tests sharing a store apart.
    def make(job: str) -> Events:
        return Events(tmp_path / "files", f"{job}-{time.time_ns()}")

    return make


def aliases_of(client: MlflowClient, name: str) -> dict[str, str]:
    # The SQLite store answers with int versions, the REST API with strings.
    aliases = client.get_registered_model(name).aliases
    return {alias: str(version) for alias, version in aliases.items()}


def versions_of(client: MlflowClient, name: str) -> dict[str, object]:
    found = client.search_model_versions(f"name='{name}'")
    return {str(mv.version): mv for mv in found}


# -- registration -------------------------------------------------------------


def test_checkpoints_become_versions_with_moving_aliases_and_tags(
    backend: Backend,
    events: Callable[[str], Events],
    caplog: pytest.LogCaptureFixture,
) -> None:
    fit = events("versions")
    caplog.set_level(logging.INFO, logger=adapter.__name__)
    adapter.lamin_lightning_fit_started(event=fit.started())
    first = fit.saved("epoch=0-step=10.ckpt", score=0.9, is_best=True, step=10)
    second = fit.saved("epoch=1-step=20.ckpt", score=0.5, is_best=True, step=20)
    third = fit.saved("epoch=2-step=30.ckpt", score=0.7, step=30)
    for event in (first, second, third):
        adapter.lamin_lightning_artifact_saved(event=event)
        client = MlflowClient()
        model = client.get_registered_model(fit.model_name)
        latest = client.get_model_version_by_alias(fit.model_name, "last")
        assert latest.tags[f"{adapter.TAG_PREFIX}key"] == event.key
    assert aliases_of(client, fit.model_name) == {"last": "3", "best": "2"}

    versions = versions_of(client, fit.model_name)
    assert sorted(versions) == ["1", "2", "3"]
    best = client.get_model_version_by_alias(fit.model_name, "best")
    run_id = best.run_id
    assert best.tags == {
        "lamin_lightning.key": second.key,
        "lamin_lightning.storage_uri": second.storage_uri,
        "lamin_lightning.artifact_uid": "uid-epoch=1-step=20.ckpt",
        "lamin_lightning.run_uid": RUN_UID,
        "lamin_lightning.monitor": "val_loss",
        "lamin_lightning.score": "0.5",
        "lamin_lightning.epoch": "2",
        "lamin_lightning.step": "20",
        **(
            {"lamin_lightning.uploaded": "true"} if backend.refuses_file_sources else {}
        ),
    }
    if backend.refuses_file_sources:
        assert best.source == f"runs:/{run_id}/{posixpath.dirname(second.key)}/" + (
            "epoch=1-step=20.ckpt"
        )
        listed = client.list_artifacts(run_id, posixpath.dirname(second.key))
        assert len(listed) == 3
        assert "uploaded as a run artifact" in caplog.text
        assert "the tracking server refuses file:// sources" in caplog.text
    else:
        assert [versions[v].source for v in ("1", "2", "3")] == [
            e.storage_uri for e in (first, second, third)
        ]
        assert client.list_artifacts(run_id, posixpath.dirname(second.key)) == []
        assert f"by reference to {second.storage_uri}" in caplog.text

    run = client.get_run(run_id)
    assert run.info.experiment_id == backend.experiment_id
    assert run.data.tags["lamin_lightning.run_uid"] == RUN_UID
    assert run.data.tags[f"lamin_lightning.{fit.model_name}.best"] == second.key
    assert run.data.tags[f"lamin_lightning.{fit.model_name}.last"] == third.key
    assert run.info.status == "RUNNING"
    adapter.lamin_lightning_fit_ended(event=fit.ended())
    assert client.get_run(run_id).info.status == "FINISHED"
    assert mlflow.active_run() is None


def test_config_and_hparams_are_run_artifacts(
    backend: Backend, events: Callable[[str], Events]
) -> None:
    fit = events("files")
    adapter.lamin_lightning_fit_started(event=fit.started())
    config = fit.saved("config.yaml", kind="config")
    hparams = fit.saved("hparams.yaml", kind="hparams")
    adapter.lamin_lightning_artifact_saved(event=config)
    adapter.lamin_lightning_artifact_saved(event=hparams)
    run_id = mlflow.active_run().info.run_id  # type: ignore[union-attr]
    adapter.lamin_lightning_fit_ended(event=fit.ended("failed"))

    client = MlflowClient()
    for event in (config, hparams):
        listed = client.list_artifacts(run_id, posixpath.dirname(event.key))
        assert event.key in [item.path for item in listed]
        text = mlflow.artifacts.load_text(f"runs:/{run_id}/{event.key}")
        assert text == event.local_path.read_text()
    assert client.search_model_versions(f"name='{fit.model_name}'") == []
    assert client.get_run(run_id).info.status == "FAILED"


@pytest.mark.parametrize("policy", ["delete", "untag"])
def test_eviction_follows_the_policy(
    backend: Backend,
    events: Callable[[str], Events],
    monkeypatch: pytest.MonkeyPatch,
    policy: str,
) -> None:
    monkeypatch.setenv(adapter.EVICTION_ENV, policy)
    fit = events(f"evict-{policy}")
    adapter.lamin_lightning_fit_started(event=fit.started())
    kept = fit.saved("epoch=0-step=10.ckpt", score=0.1, is_best=True, step=10)
    evicted = fit.saved("epoch=1-step=20.ckpt", score=0.8, step=20)
    adapter.lamin_lightning_artifact_saved(event=kept)
    adapter.lamin_lightning_artifact_saved(event=evicted)
    adapter.lamin_lightning_artifact_removed(event=fit.removed(evicted))

    client = MlflowClient()
    model = client.get_registered_model(fit.model_name)
    run_id = client.get_model_version(fit.model_name, "1").run_id
    uploads = [
        item.path for item in client.list_artifacts(run_id, posixpath.dirname(kept.key))
    ]
    if policy == "delete":
        assert sorted(versions_of(client, fit.model_name)) == ["1"]
        assert aliases_of(client, fit.model_name) == {"best": "1", "last": "1"}
        if backend.refuses_file_sources:
            assert uploads == [kept.key]
    else:
        assert sorted(versions_of(client, fit.model_name)) == ["1", "2"]
        assert aliases_of(client, fit.model_name) == {"best": "1", "last": "1"}
        evicted_version = client.get_model_version(fit.model_name, "2")
        assert evicted_version.tags["lamin_lightning.evicted"] == "true"
        if backend.refuses_file_sources:
            assert sorted(uploads) == [kept.key, evicted.key]
    adapter.lamin_lightning_fit_ended(event=fit.ended())


def test_resaved_key_retires_the_overwritten_version(
    backend: Backend, events: Callable[[str], Events]
) -> None:
    fit = events("last")
    adapter.lamin_lightning_fit_started(event=fit.started())
    adapter.lamin_lightning_artifact_saved(event=fit.saved("last.ckpt", step=10))
    adapter.lamin_lightning_artifact_saved(event=fit.saved("last.ckpt", step=20))
    adapter.lamin_lightning_fit_ended(event=fit.ended())

    client = MlflowClient()
    assert sorted(versions_of(client, fit.model_name)) == ["2"]
    assert aliases_of(client, fit.model_name) == {"last": "2"}
    source = client.get_model_version(fit.model_name, "2").source
    text = mlflow.artifacts.load_text(source)
    assert text == "last.ckpt at step 20"
