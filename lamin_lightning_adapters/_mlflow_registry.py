"""MLflow run and model-registry calls behind the ``mlflow`` registrar's hooks.

What one fit keeps in MLflow (``_Fit``, ``_Version``) and how it gets there:
the run values, the run link, registered model versions by reference or by
upload, the ``best`` and ``last`` aliases and the eviction policy applied to a
version. The hooks, their configuration and the documentation of the plugin
live in :mod:`lamin_lightning_adapters.mlflow`. ``mlflow`` is imported inside
the functions only, so importing this module never imports it.
"""

from __future__ import annotations

import logging
import posixpath
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, Literal

from lamin_lightning_core._events import BackendRunLink

if TYPE_CHECKING:
    from collections.abc import Mapping
    from pathlib import Path

    from mlflow import MlflowClient

    from lamin_lightning_core._events import (
        ArtifactSavedEvent,
        CheckpointRank,
        FeatureValue,
        FitStartedEvent,
    )

# The plugin's logger: users and tests configure the plugin, not this helper.
log = logging.getLogger("lamin_lightning_adapters.mlflow")

PLUGIN_NAME: Final = "mlflow"
BEST_ALIAS: Final = "best"
LAST_ALIAS: Final = "last"
"""MLflow reserves ``latest``; ``last`` names the newest checkpoint of the fit."""
TAG_PREFIX: Final = "lamin_lightning."
BATCH_SIZE: Final = 100
"""Params and tags per ``log_batch`` call: MLflow's limit."""

EvictionPolicy = Literal["delete", "untag"]

_RUN_ID = re.compile(r"[0-9a-f]{32}")
_NOT_IN_TAG_KEY = re.compile(r"[^\w./\- ]")
"""What MLflow refuses in param and tag keys."""


@dataclass
class _Version:
    """A model version this fit registered and still considers alive."""

    version: str
    source: str
    upload_path: str | None


@dataclass
class _Fit:
    """What one callback's fit recorded in MLflow so far."""

    client: MlflowClient
    tracking_uri: str
    run_id: str
    owns_run: bool
    model_name: str
    eviction: EvictionPolicy
    by_reference: bool = True
    versions: dict[str, _Version] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)
    """The key whose version holds each alias."""
    uploads: dict[Path, tuple[tuple[int, int], str]] = field(default_factory=dict)


# -- runs and the model registry ----------------------------------------------


def _log_run_values(
    client: MlflowClient, run_id: str, owns_run: bool, event: FitStartedEvent
) -> None:
    """Log the fit's run-level values without clobbering a reused run's."""
    from mlflow.entities import Param, RunTag

    tags: dict[str, FeatureValue] = {f"{TAG_PREFIX}run_uid": event.run_uid}
    params: dict[str, FeatureValue] = {}
    if owns_run:
        tags.update(event.run_features)
        params.update(event.hyperparameters)
    else:
        tags.update(
            {f"{TAG_PREFIX}feature.{k}": v for k, v in event.run_features.items()}
        )
    param_list = [Param(_key(k), _text(v)) for k, v in params.items() if v is not None]
    tag_list = [RunTag(_key(k), _text(v)) for k, v in tags.items() if v is not None]
    # MLflow takes at most 100 params and 100 tags per batch.
    for start in range(0, max(len(param_list), len(tag_list)), BATCH_SIZE):
        client.log_batch(
            run_id,
            params=param_list[start : start + BATCH_SIZE],
            tags=tag_list[start : start + BATCH_SIZE],
        )


def _run_link(client: MlflowClient, tracking_uri: str, run_id: str) -> BackendRunLink:
    experiment_id = client.get_run(run_id).info.experiment_id
    experiment = client.get_experiment(experiment_id)
    url = None
    if tracking_uri.startswith(("http://", "https://")):
        url = f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
    return BackendRunLink(
        system=PLUGIN_NAME, run_id=run_id, url=url, project=experiment.name
    )


def _key(name: str) -> str:
    return _NOT_IN_TAG_KEY.sub("_", name)


def _text(value: FeatureValue) -> str:
    # Lower-case booleans, as MLflow writes its own ("true"), for search.
    return str(value).lower() if isinstance(value, bool) else str(value)


def _find_or_start_run(
    client: MlflowClient, event: FitStartedEvent
) -> tuple[str, bool, str]:
    """Return the run id, whether this plugin started it, and where it came from."""
    import mlflow
    from mlflow.exceptions import MlflowException

    if event.logger_version and _RUN_ID.fullmatch(event.logger_version):
        try:
            run = client.get_run(event.logger_version)
        except MlflowException:
            log.debug("MLflow: logger version %s is no run here", event.logger_version)
        else:
            return run.info.run_id, False, "the MLFlowLogger run"
    active = mlflow.active_run()
    if active is not None:
        return active.info.run_id, False, "the active run"
    run = mlflow.start_run(run_name=event.run_uid)
    return run.info.run_id, True, "its own run"


def _ensure_registered_model(
    client: MlflowClient, name: str, event: FitStartedEvent
) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException as error:
        if error.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        client.create_registered_model(
            name,
            tags={f"{TAG_PREFIX}checkpoint_key_prefix": event.checkpoint_key_prefix},
            description="Checkpoints registered by lamin-lightning.",
        )
    if event.monitor:
        client.set_registered_model_tag(name, f"{TAG_PREFIX}monitor", event.monitor)
        client.set_registered_model_tag(name, f"{TAG_PREFIX}mode", event.mode)


def _create_version(
    fit: _Fit, event: ArtifactSavedEvent
) -> tuple[_Version, str] | None:
    """Register by reference, or upload once the server refused a reference.

    Returns:
        The version and how it was created; ``None`` if it had to be uploaded
        but the file is gone.
    """
    from mlflow.exceptions import MlflowException

    tags = _version_tags(event)
    if fit.by_reference:
        try:
            created = fit.client.create_model_version(
                fit.model_name, source=event.storage_uri, run_id=fit.run_id, tags=tags
            )
        except MlflowException as error:
            if error.error_code != "INVALID_PARAMETER_VALUE":
                raise
            fit.by_reference = False
            log.debug("MLflow refused source %s: %s", event.storage_uri, error)
        else:
            return _Version(str(created.version), str(created.source), None), (
                f"by reference to {event.storage_uri}"
            )
    try:
        artifact_path = _upload(fit, event.local_path, event.key)
    except OSError:
        if event.local_path.exists():
            raise
        return None
    source = f"runs:/{fit.run_id}/{artifact_path}"
    created = fit.client.create_model_version(
        fit.model_name,
        source=source,
        run_id=fit.run_id,
        tags={**tags, f"{TAG_PREFIX}uploaded": "true"},
    )
    how = (
        f"from {source}: the tracking server refuses {_scheme(event.storage_uri)} "
        "sources, so the file was uploaded as a run artifact"
    )
    return _Version(str(created.version), str(created.source), artifact_path), how


def _upload(fit: _Fit, local_path: Path, key: str) -> str:
    """Log a file (or checkpoint directory) as a run artifact; return its path.

    A file this fit already uploaded and that has not changed since (a
    ``last.ckpt`` link resolving to a top-k checkpoint) is not uploaded again.
    """
    resolved = local_path.resolve()
    stat = resolved.stat()
    stamp = (stat.st_mtime_ns, stat.st_size)
    known = fit.uploads.get(resolved)
    if known is not None and known[0] == stamp:
        return known[1]
    if resolved.is_dir():
        fit.client.log_artifacts(fit.run_id, str(resolved), artifact_path=key)
        artifact_path = key
    else:
        directory = posixpath.dirname(key) or None
        fit.client.log_artifact(fit.run_id, str(resolved), artifact_path=directory)
        artifact_path = posixpath.join(directory or "", resolved.name)
    fit.uploads[resolved] = (stamp, artifact_path)
    return artifact_path


def _version_tags(event: ArtifactSavedEvent) -> dict[str, str]:
    standing = event.ranking.get(event.key)
    values: dict[str, FeatureValue] = {
        "key": event.key,
        "storage_uri": event.storage_uri,
        "artifact_uid": event.artifact_uid,
        "run_uid": event.run_uid,
        "monitor": event.monitor,
        "mode": event.mode,
        "score": event.score,
        "save_weights_only": event.save_weights_only,
        "epoch": event.epoch,
        "step": event.global_step,
        **(standing.model_dump() if standing is not None else {}),
    }
    tags = {_key(k): _text(v) for k, v in event.features.items() if v is not None}
    tags.update(
        {f"{TAG_PREFIX}{k}": _text(v) for k, v in values.items() if v is not None}
    )
    return tags


def _set_alias(fit: _Fit, alias: str, key: str) -> None:
    registered = fit.versions.get(key)
    if registered is None or fit.aliases.get(alias) == key:
        return
    fit.client.set_registered_model_alias(fit.model_name, alias, registered.version)
    fit.client.set_tag(fit.run_id, f"{TAG_PREFIX}{fit.model_name}.{alias}", key)
    fit.aliases[alias] = key


def _follow_ranking(fit: _Fit, ranking: Mapping[str, CheckpointRank]) -> None:
    """Point ``best`` and ``last`` at the keys the ranking gave those flags."""
    for key, standing in ranking.items():
        if standing.is_best_model:
            _set_alias(fit, BEST_ALIAS, key)
        if standing.is_last_model:
            _set_alias(fit, LAST_ALIAS, key)


def _retire(fit: _Fit, registered: _Version, reason: str) -> None:
    """Apply the eviction policy to a version whose bytes are gone."""
    if fit.eviction == "untag":
        model = fit.client.get_registered_model(fit.model_name)
        for alias, version in (model.aliases or {}).items():
            if str(version) == registered.version:
                fit.client.delete_registered_model_alias(fit.model_name, alias)
        fit.client.set_model_version_tag(
            fit.model_name, registered.version, f"{TAG_PREFIX}evicted", "true"
        )
        log.info(
            "MLflow: untagged %s version %s of model %r",
            reason,
            registered.version,
            fit.model_name,
        )
        return
    fit.client.delete_model_version(fit.model_name, registered.version)
    log.info(
        "MLflow: deleted %s version %s of model %r",
        reason,
        registered.version,
        fit.model_name,
    )
    if registered.upload_path and not _still_used(fit, registered.upload_path):
        _delete_run_artifact(fit, registered.upload_path)


def _still_used(fit: _Fit, upload_path: str) -> bool:
    return any(v.upload_path == upload_path for v in fit.versions.values())


def _delete_run_artifact(fit: _Fit, artifact_path: str) -> None:
    # MlflowClient has no "delete run artifact"; the artifact repository for
    # the run's artifact URI does, where the storage supports deletion.
    from mlflow.exceptions import MlflowException
    from mlflow.store.artifact.artifact_repository_registry import (
        get_artifact_repository,
    )

    artifact_uri = fit.client.get_run(fit.run_id).info.artifact_uri
    repository = get_artifact_repository(artifact_uri, tracking_uri=fit.tracking_uri)
    try:
        repository.delete_artifacts(artifact_path)
    except (MlflowException, NotImplementedError, OSError) as error:
        log.warning(
            "MLflow: could not delete the uploaded copy %s/%s of an evicted "
            "checkpoint (%s); delete it by hand if space matters",
            artifact_uri,
            artifact_path,
            error,
        )
        return
    log.info("MLflow: deleted uploaded copy %s/%s", artifact_uri, artifact_path)


def _scheme(uri: str) -> str:
    return uri.split(":", 1)[0] + "://" if ":" in uri else "plain path"
