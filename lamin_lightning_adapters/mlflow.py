"""MLflow registrar: checkpoints become versions of a registered model.

Installed with ``pip install "lamin-lightning[mlflow]"``; nothing else to do.
For every fit the registrar:

* finds its MLflow run: the run of Lightning's ``MLFlowLogger`` (its version is
  the run id), else the active run (``mlflow.start_run()``), else a run it
  starts itself with ``mlflow.start_run()`` (so ``mlflow.set_experiment()``,
  ``MLFLOW_EXPERIMENT_NAME`` and ``MLFLOW_EXPERIMENT_ID`` apply) and ends when
  the fit ends;
* registers each checkpoint as a new version of one registered model, with
  ``source`` set to the checkpoint's storage URI so that no second copy of the
  bytes is made. A tracking server refuses ``file://`` sources; then the file
  is uploaded once as a run artifact and the version points at
  ``runs:/<run_id>/<key>``. One INFO line per checkpoint says which path was
  taken;
* moves two aliases, ``best`` and ``last``, as ``event.ranking`` says (the
  standing LaminDB records as ``is_best_model`` and ``is_last_model``): after
  a save or an eviction they point at the callback's best and newest
  checkpoint. The alias is ``last``, not ``latest``: MLflow reserves
  ``latest`` (``models:/<name>/latest`` is always the highest version number)
  and refuses to set it as an alias. Run tags
  ``lamin_lightning.<model name>.best`` and ``.last`` name the keys they hold;
* tags each version, under the prefix ``lamin_lightning.``, with its key,
  storage URI, LaminDB artifact and run UIDs, ``monitor``, ``mode``,
  ``score``, ``save_weights_only``, epoch and step, and its standing when
  registered (``model_rank``, ``is_best_model``, ``is_last_model``; the
  aliases, not these tags, follow later changes). The user's artifact-level
  values (``Checkpoint(features={"artifact": ...})``) are tags under their
  own names;
* logs the run-level values once per fit. On a run the registrar started, the
  scalar hyperparameters become params and the user's run-level feature
  values tags, under their own names. On a run it reuses (``MLFlowLogger``'s
  or the active run) no param is logged, because ``MLFlowLogger`` logs the
  hyperparameters itself and MLflow refuses a param logged twice with
  another value; run-level values become tags ``lamin_lightning.feature.<name>``
  so no tag of the user is overwritten. Every run gets the tag
  ``lamin_lightning.run_uid`` (the LaminDB run);
* returns the run from ``lamin_lightning_fit_started`` as a
  ``BackendRunLink`` (its URL when the tracking URI is an HTTP server), which
  the LaminDB persister records as the run features ``mlflow_run_id`` and
  ``mlflow_run_url``;
* logs the LightningCLI config and ``hparams.yaml`` as run artifacts;
* mirrors top-k eviction by the policy in ``LAMIN_LIGHTNING_MLFLOW_EVICTION``.

Hooks run on the callback's worker thread, after the save. When the fallback
must upload a file that eviction deleted meanwhile (built-in persister), the
checkpoint is skipped with one INFO line.

A version's source is the checkpoint file itself. Fetch it with
``mlflow.artifacts.download_artifacts(client.get_model_version_by_alias(name,
"best").source)``; a ``models:/`` URI expects a model folder and finds nothing.

Environment:

``MLFLOW_TRACKING_URI``
    Where to record. The registrar stays inactive (with one warning) when it is
    unset and no MLflow run is active: MLflow would otherwise create
    ``./mlflow.db`` in the working directory behind the user's back.
    ``mlflow.set_tracking_uri()`` and ``MLFlowLogger`` set it too.
``LAMIN_LIGHTNING_MLFLOW_MODEL_NAME``
    Name of the registered model. Default: the callback's checkpoint key prefix
    without its run segment, ``/`` replaced by ``-`` (for example
    ``logs-lightning_logs-checkpoints``), so successive fits of one job add
    versions to one model; aliases then point into the most recent fit.
``LAMIN_LIGHTNING_MLFLOW_EVICTION``
    ``delete`` (default): an evicted checkpoint's model version is deleted, and
    so is the run artifact when the fallback uploaded one, because the bytes
    it points to are gone. ``untag``: the version stays (with its uploaded
    copy, if any), loses its aliases and is tagged
    ``lamin_lightning.evicted=true``. The previous version of a re-saved key
    (``last.ckpt``) is retired the same way: its file was replaced.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import posixpath
import re
import sys
import urllib.error
import urllib.request
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, Literal

from lamin_lightning_core._errors import LaminLightningWarning, PluginUnavailable
from lamin_lightning_core._events import BackendRunLink
from lamin_lightning_core.hookspecs import hookimpl

if importlib.util.find_spec("mlflow") is None:
    raise PluginUnavailable("mlflow", "mlflow")

if TYPE_CHECKING:
    from collections.abc import Mapping
    from pathlib import Path

    from mlflow import MlflowClient

    from lamin_lightning_core._events import (
        ArtifactRemovedEvent,
        ArtifactSavedEvent,
        CheckpointRank,
        FeatureValue,
        FitEndedEvent,
        FitStartedEvent,
    )

log = logging.getLogger(__name__)

PLUGIN_NAME: Final = "mlflow"
MODEL_NAME_ENV: Final = "LAMIN_LIGHTNING_MLFLOW_MODEL_NAME"
EVICTION_ENV: Final = "LAMIN_LIGHTNING_MLFLOW_EVICTION"
BEST_ALIAS: Final = "best"
LAST_ALIAS: Final = "last"
"""MLflow reserves ``latest``; ``last`` names the newest checkpoint of the fit."""
TRACKING_URI_ENV: Final = "MLFLOW_TRACKING_URI"
TAG_PREFIX: Final = "lamin_lightning."
PROBE_TIMEOUT_S: Final = 5.0
BATCH_SIZE: Final = 100
"""Params and tags per ``log_batch`` call: MLflow's limit."""

EvictionPolicy = Literal["delete", "untag"]
EVICTION_POLICIES: Final[tuple[EvictionPolicy, ...]] = ("delete", "untag")

_RUN_ID = re.compile(r"[0-9a-f]{32}")
_NOT_IN_MODEL_NAME = re.compile(r"[^A-Za-z0-9_.\-]+")
_NOT_IN_TAG_KEY = re.compile(r"[^\w./\- ]")
"""What MLflow refuses in param and tag keys."""
_RUN_STATUS: Final = {
    "finished": "FINISHED",
    "failed": "FAILED",
    "interrupted": "KILLED",
}


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


_fits: dict[str, _Fit] = {}


# -- hooks --------------------------------------------------------------------


@hookimpl
def lamin_lightning_fit_started(event: FitStartedEvent) -> BackendRunLink | None:
    """Find or start the MLflow run and make sure the registered model exists.

    Returns:
        The MLflow run, for the persister to record on the tracked run;
        ``None`` if MLflow is not configured or its store failed.

    Raises:
        ValueError: if ``LAMIN_LIGHTNING_MLFLOW_EVICTION`` has an unknown value.
    """
    eviction = _eviction_policy()
    tracking_uri = _usable_tracking_uri()
    if tracking_uri is None:
        return None
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        client = mlflow.MlflowClient(tracking_uri=tracking_uri)
        model_name = _model_name(event)
        _ensure_registered_model(client, model_name, event)
        run_id, owns_run, origin = _find_or_start_run(client, event)
    except (MlflowException, OSError) as error:
        _warn_inactive(
            f"the MLflow tracking store at {tracking_uri!r} failed: {error}. Check "
            f"{TRACKING_URI_ENV} and that the store is writable"
        )
        return None
    _log_run_values(client, run_id, owns_run, event)
    _fits[event.callback_id] = _Fit(
        client, tracking_uri, run_id, owns_run, model_name, eviction
    )
    log.info(
        "MLflow: recording checkpoints on %s %s at %s as versions of model %r",
        origin,
        run_id,
        tracking_uri,
        model_name,
    )
    return _run_link(client, tracking_uri, run_id)


@hookimpl
def lamin_lightning_artifact_saved(event: ArtifactSavedEvent) -> None:
    """Register a checkpoint as a model version; log config and hparams files."""
    fit = _fits.get(event.callback_id)
    if fit is None:
        return
    if event.kind != "checkpoint":
        artifact_path = _upload(fit, event.local_path, event.key)
        log.info(
            "MLflow: logged %s to run %s as %s", event.key, fit.run_id, artifact_path
        )
        return
    previous = fit.versions.get(event.key)
    created = _create_version(fit, event)
    if created is None:
        # Registrars run after the save, on the callback's worker thread: with
        # the built-in persister, Lightning may have evicted or rewritten the
        # file meanwhile. Its removal event follows; nothing is lost.
        log.info(
            "MLflow: skipped %s, %s is gone and the tracking server refuses "
            "references (evicted or replaced before the registrar ran)",
            event.key,
            event.local_path,
        )
        return
    registered, how = created
    fit.versions[event.key] = registered
    # A new save is always the newest; a re-saved key whose standing did not
    # change is missing from the ranking but its new version takes the aliases.
    fit.aliases = {k: v for k, v in fit.aliases.items() if v != event.key}
    _set_alias(fit, LAST_ALIAS, event.key)
    if event.is_best:
        _set_alias(fit, BEST_ALIAS, event.key)
    _follow_ranking(fit, event.ranking)
    if previous is not None:
        # A re-saved key (last.ckpt) replaced its file: overwritten in place,
        # or deleted by the persister (LaminDB keeps one artifact per key).
        _retire(fit, previous, reason="replaced")
    log.info(
        "MLflow: registered %s as version %s of model %r %s",
        event.key,
        registered.version,
        fit.model_name,
        how,
    )


@hookimpl
def lamin_lightning_artifact_removed(event: ArtifactRemovedEvent) -> None:
    """Mirror top-k eviction on the model version of the evicted checkpoint."""
    fit = _fits.get(event.callback_id)
    if fit is None or event.kind != "checkpoint":
        return
    registered = fit.versions.pop(event.key, None)
    if registered is None:
        log.debug("MLflow: no live model version for evicted %s", event.key)
        return
    _retire(fit, registered, reason="evicted")
    fit.aliases = {k: v for k, v in fit.aliases.items() if v != event.key}
    _follow_ranking(fit, event.ranking)
    if LAST_ALIAS not in fit.aliases and fit.versions:
        # The ranking names no new last checkpoint (it only lists what
        # changed): fall back to the highest version still alive.
        newest = max(fit.versions, key=lambda k: int(fit.versions[k].version))
        _set_alias(fit, LAST_ALIAS, newest)


@hookimpl
def lamin_lightning_fit_ended(event: FitEndedEvent) -> None:
    """End the run if this plugin started it; forget the fit either way."""
    fit = _fits.pop(event.callback_id, None)
    if fit is None or not fit.owns_run:
        return
    import mlflow

    status = _RUN_STATUS[event.status]
    active = mlflow.active_run()
    if active is not None and active.info.run_id == fit.run_id:
        mlflow.end_run(status=status)
    else:
        fit.client.set_terminated(fit.run_id, status=status)
    log.info("MLflow: ended run %s as %s", fit.run_id, status)


# -- configuration ------------------------------------------------------------


def _eviction_policy() -> EvictionPolicy:
    value = os.environ.get(EVICTION_ENV, "delete").strip().lower() or "delete"
    for policy in EVICTION_POLICIES:
        if value == policy:
            return policy
    raise ValueError(
        f"{EVICTION_ENV}={value!r} is not a known eviction policy for the MLflow "
        f"plugin: set it to one of {', '.join(EVICTION_POLICIES)} or unset it "
        "(default: delete)."
    )


def _usable_tracking_uri() -> str | None:
    """Return the tracking URI to record to, or warn and return ``None``."""
    configured = os.environ.get(TRACKING_URI_ENV)
    # Without mlflow imported no run can be active: skip the slow import.
    active = "mlflow" in sys.modules and sys.modules["mlflow"].active_run()
    if not configured and not active:
        _warn_inactive(
            f"{TRACKING_URI_ENV} is not set and no MLflow run is active. Set "
            f"{TRACKING_URI_ENV} (for example http://127.0.0.1:5000 or "
            "sqlite:///mlflow.db), call mlflow.start_run() or use Lightning's "
            "MLFlowLogger"
        )
        return None
    import mlflow

    # The same URI that mlflow.start_run() and the active run use.
    uri: str = mlflow.get_tracking_uri()
    problem = _unreachable(uri)
    if problem:
        _warn_inactive(
            f"the tracking server {TRACKING_URI_ENV}={uri!r} is unreachable "
            f"({problem}). Start the server or fix {TRACKING_URI_ENV}"
        )
        return None
    return uri


def _unreachable(uri: str) -> str | None:
    # MLflow's HTTP client retries for minutes; one short probe fails fast.
    if not uri.startswith(("http://", "https://")):
        return None
    try:
        with urllib.request.urlopen(
            f"{uri.rstrip('/')}/health", timeout=PROBE_TIMEOUT_S
        ):
            return None
    except urllib.error.HTTPError:
        return None  # it answered: reachable, whatever it thinks of /health
    except (urllib.error.URLError, OSError) as error:
        return str(getattr(error, "reason", error))


def _warn_inactive(why: str) -> None:
    warnings.warn(
        f"lamin-lightning plugin {PLUGIN_NAME!r} is inactive for this fit: {why}. "
        "Checkpoints are still persisted; only their MLflow registration is "
        "skipped. To silence this, switch the plugin off with "
        f"LAMIN_LIGHTNING_DISABLE_PLUGINS={PLUGIN_NAME}.",
        LaminLightningWarning,
        stacklevel=2,
    )


def _model_name(event: FitStartedEvent) -> str:
    explicit = os.environ.get(MODEL_NAME_ENV, "").strip()
    if explicit:
        return explicit
    run_segments = {event.run_uid, event.logger_version}
    if event.logger_version and event.logger_version.isdigit():
        run_segments.add(f"version_{event.logger_version}")
    segments = [
        segment
        for segment in event.checkpoint_key_prefix.split("/")
        if segment and segment not in run_segments
    ]
    name = _NOT_IN_MODEL_NAME.sub("_", "-".join(segments)).strip("-_.")
    log.debug(
        "MLflow: model name %r derived from %r", name, event.checkpoint_key_prefix
    )
    return name or "lamin-lightning-checkpoints"


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
