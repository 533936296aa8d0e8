"""Registrars next to the LaminDB persister: each system points at the other.

One real fit with the LaminDB persister, the W&B registrar (offline) and the
MLflow registrar (a SQLite store under the test's tmp dir), all loaded through
their entry points. Afterwards the LaminDB run names the W&B and MLflow runs,
and each backend's records name the LaminDB artifacts and the URIs of their
bytes in the instance's storage.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import mlflow
import pytest
from mlflow import MlflowClient

import lamin_lightning_core as ll
from lamin_lightning_adapters import mlflow as mlflow_plugin
from tests.adapters.test_wandb import (
    _entry,
    _holders,
    _records,
    _updates,
    _versions,
    home,  # noqa: F401  (fixture: offline W&B under tmp_path)
)
from tests.helpers import fit

RUN_FEATURES = {"ll_registrars_dataset": "digits"}
ARTIFACT_FEATURES = {"ll_registrars_split": "train"}


@pytest.fixture
def mlflow_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[MlflowClient]:
    """A fresh SQLite tracking store, configured the way a user would."""
    for name in (
        "MLFLOW_EXPERIMENT_NAME",
        "MLFLOW_RUN_ID",
        mlflow_plugin.MODEL_NAME_ENV,
        mlflow_plugin.EVICTION_ENV,
    ):
        monkeypatch.delenv(name, raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(tracking_uri=uri)
    experiment_id = client.create_experiment(
        "lamin-lightning", artifact_location=(tmp_path / "mlruns").as_uri()
    )
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", experiment_id)
    yield client
    while mlflow.active_run() is not None:
        mlflow.end_run()
    mlflow.set_tracking_uri(None)  # type: ignore[arg-type]


@pytest.fixture
def user_features(ln: ModuleType) -> None:
    """The auto-features and the user features the fit annotates."""
    ll.save_lightning_features()
    for name in (*RUN_FEATURES, *ARTIFACT_FEATURES):
        if ln.Feature.filter(name=name).first() is None:
            ln.Feature(name=name, dtype=str).save()


def test_lamindb_wandb_and_mlflow_point_at_each_other(
    ln: ModuleType,
    tracked_run: Any,
    user_features: None,
    home: Path,  # noqa: F811
    mlflow_store: MlflowClient,
    tmp_path: Path,
) -> None:
    checkpoint = ll.Checkpoint(
        monitor="score",
        save_top_k=2,
        save_last=True,
        every_n_train_steps=1,
        features={"run": RUN_FEATURES, "artifact": ARTIFACT_FEATURES},
        disable_plugins=["clearml"],
    )
    fit([checkpoint], tmp_path, steps=4, scores=[3, 1, 2, 0.5])

    assert checkpoint.delivery_failures == []
    links = {link.system: link for link in checkpoint.backend_runs}
    assert sorted(links) == ["mlflow", "wandb"]
    assert (links["wandb"].url, links["mlflow"].url) == (None, None)
    values = tracked_run.features.get_values()
    assert values["wandb_run_id"] == links["wandb"].run_id
    assert values["mlflow_run_id"] == links["mlflow"].run_id
    assert "wandb_run_url" not in values, "an offline run has no URL"

    # LaminDB keeps the top-2 and one last.ckpt; the others were evicted or
    # replaced, their artifacts deleted.
    kept = ln.Artifact.filter(run=tracked_run, kind="model")
    uris = {artifact.uid: artifact.path.as_uri() for artifact in kept}
    assert len(uris) == 3
    storage_root = Path(ln.settings.storage.root).resolve().as_uri()
    assert all(uri.startswith(f"{storage_root}/") for uri in uris.values())
    best_key = checkpoint.key_for("checkpoint", checkpoint.best_model_path)
    assert best_key.endswith("step=4.ckpt")
    best = kept.get(key=best_key)

    _check_wandb(home, links["wandb"].run_id, uris, best.uid, tracked_run.uid)
    _check_mlflow(mlflow_store, links["mlflow"].run_id, uris, best.uid)


def _check_wandb(
    root: Path, run_id: str, uris: dict[str, str], best_uid: str, run_uid: str
) -> None:
    records = _records(root, run_id)
    versions = _versions(records, f"model-{run_id}")
    metadata = [json.loads(version.metadata) for version in versions]
    assert len(versions) == 8, "one version per save; offline, none is deleted"
    for version, values in zip(versions, metadata, strict=True):
        assert values["lamindb_run_uid"] == run_uid
        assert values["features"] == ARTIFACT_FEATURES
        assert _entry(version).ref == values["storage_uri"]
    live = {m["lamindb_artifact_uid"]: m["storage_uri"] for m in metadata}
    assert {uid: live[uid] for uid in uris} == uris
    assert metadata[_holders(versions)["best"]]["lamindb_artifact_uid"] == best_uid
    config = _updates(records, "config")["lamin_lightning"]
    assert (config["run_uid"], config["features"]) == (run_uid, RUN_FEATURES)
    assert config["hyperparameters"]["lr"] == 0.01


def _check_mlflow(
    client: MlflowClient, run_id: str, uris: dict[str, str], best_uid: str
) -> None:
    versions = client.search_model_versions()
    tags = [version.tags for version in versions]
    assert {
        t["lamin_lightning.artifact_uid"]: v.source
        for t, v in zip(tags, versions, strict=True)
    } == uris
    assert all(t["ll_registrars_split"] == "train" for t in tags)
    (model,) = client.search_registered_models()
    best = client.get_model_version_by_alias(model.name, "best")
    assert best.tags["lamin_lightning.artifact_uid"] == best_uid
    assert best.run_id == run_id
    last = client.get_model_version_by_alias(model.name, "last")
    assert last.tags["lamin_lightning.key"].endswith("/last.ckpt")
    run = client.get_run(run_id)
    assert run.data.tags["ll_registrars_dataset"] == "digits"
    assert run.data.params["lr"] == "0.01"
    assert run.info.status == "FINISHED"
