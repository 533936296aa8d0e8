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
from pathlib import Path
from typing import TYPE_CHECKING

import mlflow
import pytest
from mlflow import MlflowClient

from lamin_lightning_adapters import mlflow as adapter
from lamin_lightning_core._errors import LaminLightningWarning
from lamin_lightning_core._events import (
    ArtifactRemovedEvent,
    ArtifactSavedEvent,
    BackendRunLink,
    CheckpointRank,
    FitEndedEvent,
    FitStartedEvent,
)

from .mlflow_server import free_port, running_mlflow_server

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from mlflow.entities.model_registry import ModelVersion

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

    def started(
        self, logger_version: str | None = None, **fields: object
    ) -> FitStartedEvent:
        return FitStartedEvent(
            callback_id=self.callback_id,
            run_uid=RUN_UID,
            base_prefix=posixpath.dirname(self.prefix),
            checkpoint_key_prefix=self.prefix,
            logger_version=logger_version,
            monitor="val_loss",
            mode="min",
            **fields,  # type: ignore[arg-type]
        )

    def saved(
        self,
        name: str,
        *,
        score: float | None = None,
        is_best: bool = False,
        step: int = 0,
        kind: str = "checkpoint",
        **fields: object,
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
            **fields,  # type: ignore[arg-type]
        )

    def removed(
        self, saved: ArtifactSavedEvent, **fields: object
    ) -> ArtifactRemovedEvent:
        saved.local_path.unlink()
        values = saved.model_dump(
            include={"callback_id", "run_uid", "kind", "key", "local_path"}
            | {"storage_uri", "artifact_uid", "epoch", "global_step"}
        )
        return ArtifactRemovedEvent(**values, **fields)  # type: ignore[arg-type]

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
    ids=["sqlite", "server"],
)
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Backend:
    """Each backend, configured the way a user would: tracking URI and experiment."""
    chosen: Backend = request.getfixturevalue(f"{request.param}_backend")
    mlflow.set_tracking_uri(chosen.uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", chosen.experiment_id)
    return chosen


@pytest.fixture
def events(tmp_path: Path) -> Callable[[str], Events]:
    # Model names are derived from the key prefix: one job name per test
    # keeps tests sharing a store apart.
    def make(job: str) -> Events:
        return Events(tmp_path / "files", f"{job}-{time.time_ns()}")

    return make


def rank(model_rank: int, best: bool, last: bool) -> CheckpointRank:
    return CheckpointRank(model_rank=model_rank, is_best_model=best, is_last_model=last)


def aliases_of(client: MlflowClient, name: str) -> dict[str, str]:
    # The SQLite store answers with int versions, the REST API with strings.
    aliases = client.get_registered_model(name).aliases
    return {alias: str(version) for alias, version in aliases.items()}


def versions_of(client: MlflowClient, name: str) -> dict[str, ModelVersion]:
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
    link = adapter.lamin_lightning_fit_started(event=fit.started())
    first = fit.saved("epoch=0-step=10.ckpt", score=0.9, is_best=True, step=10)
    second = fit.saved("epoch=1-step=20.ckpt", score=0.5, is_best=True, step=20)
    third = fit.saved("epoch=2-step=30.ckpt", score=0.7, step=30)
    for event in (first, second, third):
        adapter.lamin_lightning_artifact_saved(event=event)
        client = MlflowClient()
        latest = client.get_model_version_by_alias(fit.model_name, "last")
        assert latest.tags[f"{adapter.TAG_PREFIX}key"] == event.key
    assert aliases_of(client, fit.model_name) == {"last": "3", "best": "2"}

    versions = versions_of(client, fit.model_name)
    assert sorted(versions) == ["1", "2", "3"]
    best = client.get_model_version_by_alias(fit.model_name, "best")
    run_id = str(best.run_id)
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
    experiment = client.get_experiment(backend.experiment_id)
    assert link == BackendRunLink(
        system="mlflow",
        run_id=run_id,
        url=(
            f"{backend.uri}/#/experiments/{backend.experiment_id}/runs/{run_id}"
            if backend.name == "server"
            else None
        ),
        project=experiment.name,
    )
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
    run_id = str(client.get_model_version(fit.model_name, "1").run_id)
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
    source = str(client.get_model_version(fit.model_name, "2").source)
    text = mlflow.artifacts.load_text(source)
    assert text == "last.ckpt at step 20"


@pytest.mark.slow
def test_a_link_to_an_uploaded_checkpoint_is_not_uploaded_again(
    server_backend: Backend, events: Callable[[str], Events]
) -> None:
    mlflow.set_tracking_uri(server_backend.uri)
    fit = events("link")
    adapter.lamin_lightning_fit_started(event=fit.started())
    target = fit.saved("epoch=0-step=10.ckpt", is_best=True, step=10)
    link = target.local_path.with_name("last.ckpt")
    link.symlink_to(target.local_path.name)
    adapter.lamin_lightning_artifact_saved(event=target)
    adapter.lamin_lightning_artifact_saved(
        event=target.model_copy(
            update={"key": f"{fit.prefix}/last.ckpt", "local_path": link}
        )
    )
    run_id = mlflow.active_run().info.run_id  # type: ignore[union-attr]
    adapter.lamin_lightning_fit_ended(event=fit.ended())

    client = MlflowClient()
    sources = {mv.source for mv in versions_of(client, fit.model_name).values()}
    assert sources == {f"runs:/{run_id}/{target.key}"}
    listed = client.list_artifacts(run_id, fit.prefix)
    assert [item.path for item in listed] == [target.key]


def test_annotations_are_tags_and_aliases_follow_the_ranking(
    backend: Backend, events: Callable[[str], Events]
) -> None:
    fit = events("ranking")
    adapter.lamin_lightning_fit_started(
        event=fit.started(
            run_features={"dataset": "digits", "curated": True},
            hyperparameters={"lr": 0.1, "layers": 2},
        )
    )
    annotated = {"mode": "min", "save_weights_only": False}
    first = fit.saved(
        "a.ckpt",
        score=0.5,
        is_best=True,
        step=10,
        ranking={f"{fit.prefix}/a.ckpt": rank(0, True, True)},
        features={"split": "train", "data version": 3},
        **annotated,
    )
    second_key = f"{fit.prefix}/b.ckpt"
    second = fit.saved(
        "b.ckpt",
        score=0.3,
        is_best=True,
        step=20,
        ranking={second_key: rank(0, True, True), first.key: rank(1, False, False)},
        **annotated,
    )
    adapter.lamin_lightning_artifact_saved(event=first)
    adapter.lamin_lightning_artifact_saved(event=second)
    client = MlflowClient()
    assert aliases_of(client, fit.model_name) == {"best": "2", "last": "2"}
    # Evicting the best and the newest (a callback without monitor may) hands
    # both aliases to the checkpoint the ranking names.
    adapter.lamin_lightning_artifact_removed(
        event=fit.removed(second, ranking={first.key: rank(0, True, True)})
    )
    run_id = mlflow.active_run().info.run_id  # type: ignore[union-attr]
    adapter.lamin_lightning_fit_ended(event=fit.ended())

    assert aliases_of(client, fit.model_name) == {"best": "1", "last": "1"}
    tags = client.get_model_version(fit.model_name, "1").tags
    assert {k: tags[k] for k in ("split", "data version")} == {
        "split": "train",
        "data version": "3",
    }
    assert {k: v for k, v in tags.items() if k.endswith(("_model", "rank"))} == {
        "lamin_lightning.model_rank": "0",
        "lamin_lightning.is_best_model": "true",
        "lamin_lightning.is_last_model": "true",
    }
    assert tags["lamin_lightning.mode"] == "min"
    assert tags["lamin_lightning.save_weights_only"] == "false"
    run = client.get_run(run_id)
    assert run.data.params == {"lr": "0.1", "layers": "2"}
    assert run.data.tags["dataset"] == "digits"
    assert run.data.tags["curated"] == "true"
    assert run.data.tags[f"lamin_lightning.{fit.model_name}.best"] == first.key


@pytest.mark.slow
def test_a_file_gone_before_its_upload_is_skipped(
    server_backend: Backend,
    events: Callable[[str], Events],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Registrars run on the callback's worker thread: with the built-in
    # persister, Lightning may have evicted the file by then. A server that
    # refuses file:// sources needs the bytes for the fallback upload.
    mlflow.set_tracking_uri(server_backend.uri)
    caplog.set_level(logging.INFO, logger=adapter.__name__)
    fit = events("gone")
    adapter.lamin_lightning_fit_started(event=fit.started())
    gone = fit.saved("epoch=0-step=10.ckpt", is_best=True, step=10)
    gone.local_path.unlink()
    adapter.lamin_lightning_artifact_saved(event=gone)
    kept = fit.saved("epoch=1-step=20.ckpt", is_best=True, step=20)
    adapter.lamin_lightning_artifact_saved(event=kept)
    adapter.lamin_lightning_fit_ended(event=fit.ended())

    client = MlflowClient()
    (version,) = versions_of(client, fit.model_name).values()
    assert version.tags["lamin_lightning.key"] == kept.key
    assert aliases_of(client, fit.model_name) == {
        "best": version.version,
        "last": version.version,
    }
    assert f"MLflow: skipped {gone.key}, {gone.local_path} is gone" in caplog.text


# -- which run ----------------------------------------------------------------


def test_an_active_run_is_used_and_left_open(
    backend: Backend, events: Callable[[str], Events]
) -> None:
    fit = events("active")
    active = mlflow.start_run(experiment_id=backend.experiment_id)
    mlflow.set_tag("dataset", "the user's")
    adapter.lamin_lightning_fit_started(
        event=fit.started(
            run_features={"dataset": "digits"}, hyperparameters={"lr": 0.1}
        )
    )
    adapter.lamin_lightning_artifact_saved(event=fit.saved("a.ckpt", is_best=True))
    adapter.lamin_lightning_fit_ended(event=fit.ended())

    client = MlflowClient()
    assert client.get_model_version(fit.model_name, "1").run_id == active.info.run_id
    run = client.get_run(active.info.run_id)
    assert run.info.status == "RUNNING"
    assert run.data.params == {}, "a reused run's params are the user's"
    assert run.data.tags["dataset"] == "the user's"
    assert run.data.tags["lamin_lightning.feature.dataset"] == "digits"
    still_active = mlflow.active_run()
    assert still_active is not None
    assert still_active.info.run_id == active.info.run_id


# -- configuration ------------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        (None, "MLFLOW_TRACKING_URI is not set and no MLflow run is active"),
        ("http://127.0.0.1:{port}", "MLFLOW_TRACKING_URI=.* is unreachable"),
        ("sqlite:///{tmp}/a-file/mlflow.db", "tracking store .* failed"),
    ],
    ids=["no-uri", "unreachable-server", "unusable-store"],
)
def test_a_missing_or_broken_backend_warns_and_stays_inactive(
    events: Callable[[str], Events],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    uri: str | None,
    expected: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-file").touch()
    if uri is not None:
        mlflow.set_tracking_uri(uri.format(port=free_port(), tmp=tmp_path))
    fit = events("inactive")
    started = time.monotonic()
    with pytest.warns(LaminLightningWarning, match=f"'mlflow' is inactive.*{expected}"):
        adapter.lamin_lightning_fit_started(event=fit.started())
    assert time.monotonic() - started < adapter.PROBE_TIMEOUT_S
    adapter.lamin_lightning_artifact_saved(event=fit.saved("a.ckpt"))
    adapter.lamin_lightning_fit_ended(event=fit.ended())
    assert not (tmp_path / "mlflow.db").exists()
    assert not (tmp_path / "mlruns").exists()
    assert mlflow.active_run() is None


def test_an_unknown_eviction_policy_is_refused(
    monkeypatch: pytest.MonkeyPatch, events: Callable[[str], Events]
) -> None:
    monkeypatch.setenv(adapter.EVICTION_ENV, "archive")
    with pytest.raises(ValueError, match="'archive' is not a known eviction policy"):
        adapter.lamin_lightning_fit_started(event=events("policy").started())


@pytest.mark.parametrize(
    ("prefix", "logger_version", "explicit", "expected"),
    [
        (f"ckpts/{RUN_UID}/checkpoints", None, None, "ckpts-checkpoints"),
        ("logs/lightning_logs/version_3/checkpoints", "version_3", None, None),
        ("checkpoints", None, "my model", "my model"),
        ("a b/c:d/checkpoints", None, None, "a_b-c_d-checkpoints"),
    ],
    ids=["run-uid-dropped", "logger-version-dropped", "explicit", "sanitised"],
)
def test_model_name(
    monkeypatch: pytest.MonkeyPatch,
    prefix: str,
    logger_version: str | None,
    explicit: str | None,
    expected: str | None,
) -> None:
    if explicit:
        monkeypatch.setenv(adapter.MODEL_NAME_ENV, explicit)
    event = FitStartedEvent(
        callback_id="cb",
        run_uid=RUN_UID,
        base_prefix=posixpath.dirname(prefix),
        checkpoint_key_prefix=prefix,
        logger_version=logger_version,
        mode="min",
    )
    assert adapter._model_name(event) == (expected or "logs-lightning_logs-checkpoints")


# -- end to end ---------------------------------------------------------------


def fit_tiny_model(trainer: object) -> None:
    """Fit a one-layer regression on 16 random rows (2 steps an epoch)."""
    import lightning.pytorch as pl
    import torch
    from torch.nn.functional import mse_loss

    class Tiny(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(4, 1)

        def training_step(self, batch: list[torch.Tensor]) -> torch.Tensor:
            return mse_loss(self.layer(batch[0]), batch[1])

        def validation_step(self, batch: list[torch.Tensor]) -> None:
            self.log("val_loss", mse_loss(self.layer(batch[0]), batch[1]))

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(0))
    rows = torch.utils.data.TensorDataset(x, x.sum(dim=1, keepdim=True))
    loader = torch.utils.data.DataLoader(rows, batch_size=8)
    trainer.fit(Tiny(), loader, loader)  # type: ignore[attr-defined]


def test_a_fit_with_mlflow_logger_registers_its_checkpoints(
    backend: Backend,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import MLFlowLogger

    from lamin_lightning_core import Checkpoint

    monkeypatch.chdir(tmp_path)
    caplog.set_level(logging.INFO, logger=adapter.__name__)
    job = f"e2e-{backend.name}-{time.time_ns()}"
    logger = MLFlowLogger(experiment_name=job, tracking_uri=backend.uri)
    checkpoint = Checkpoint(
        dirpath=job,
        monitor="val_loss",
        save_top_k=2,
        save_last=True,
        plugins=[adapter],
        disable_plugins=OTHER_REGISTRARS,
    )
    trainer = pl.Trainer(
        max_epochs=4,
        logger=logger,
        callbacks=[checkpoint],
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    fit_tiny_model(trainer)

    assert checkpoint.delivery_failures == []
    client = MlflowClient()
    name = f"{job}-checkpoints"
    live = versions_of(client, name)
    keys = sorted(mv.tags["lamin_lightning.key"] for mv in live.values())
    assert keys == sorted(
        [f"{job}/checkpoints/{Path(p).name}" for p in checkpoint.best_k_models]
        + [f"{job}/checkpoints/last.ckpt"]
    )
    # MLFlowLogger opens its run without mlflow.start_run(); the plugin found it
    # through the logger version and started no run of its own.
    assert {mv.run_id for mv in live.values()} == {logger.run_id}
    assert mlflow.active_run() is None
    best = client.get_model_version_by_alias(name, "best")
    assert best.tags["lamin_lightning.key"].endswith(
        Path(checkpoint.best_model_path).name
    )
    last = client.get_model_version_by_alias(name, "last")
    assert last.tags["lamin_lightning.key"].endswith("last.ckpt")
    path_taken = "uploaded" if backend.refuses_file_sources else "by reference"
    assert path_taken in caplog.text
    # The source is the checkpoint file itself (models:/ URIs expect a folder).
    downloaded = mlflow.artifacts.download_artifacts(
        best.source, dst_path=str(tmp_path / "download")
    )
    best_bytes = Path(checkpoint.best_model_path).read_bytes()
    assert Path(downloaded).read_bytes() == best_bytes
