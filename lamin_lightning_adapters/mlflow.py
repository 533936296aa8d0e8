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
import re
import sys
import urllib.error
import urllib.request
import warnings
from typing import TYPE_CHECKING, Final

from lamin_lightning_adapters._mlflow_registry import (
    BATCH_SIZE as BATCH_SIZE,
)
from lamin_lightning_adapters._mlflow_registry import (
    BEST_ALIAS,
    LAST_ALIAS,
    PLUGIN_NAME,
    EvictionPolicy,
    _create_version,
    _ensure_registered_model,
    _find_or_start_run,
    _Fit,
    _follow_ranking,
    _log_run_values,
    _retire,
    _run_link,
    _set_alias,
    _upload,
)
from lamin_lightning_adapters._mlflow_registry import (
    TAG_PREFIX as TAG_PREFIX,
)
from lamin_lightning_core._errors import LaminLightningWarning, PluginUnavailable
from lamin_lightning_core.hookspecs import hookimpl

if importlib.util.find_spec("mlflow") is None:
    raise PluginUnavailable("mlflow", "mlflow")

if TYPE_CHECKING:
    from lamin_lightning_core._events import (
        ArtifactRemovedEvent,
        ArtifactSavedEvent,
        BackendRunLink,
        FitEndedEvent,
        FitStartedEvent,
    )

log = logging.getLogger(__name__)

MODEL_NAME_ENV: Final = "LAMIN_LIGHTNING_MLFLOW_MODEL_NAME"
EVICTION_ENV: Final = "LAMIN_LIGHTNING_MLFLOW_EVICTION"
TRACKING_URI_ENV: Final = "MLFLOW_TRACKING_URI"
PROBE_TIMEOUT_S: Final = 5.0

EVICTION_POLICIES: Final[tuple[EvictionPolicy, ...]] = ("delete", "untag")

_NOT_IN_MODEL_NAME = re.compile(r"[^A-Za-z0-9_.\-]+")
_RUN_STATUS: Final = {
    "finished": "FINISHED",
    "failed": "FAILED",
    "interrupted": "KILLED",
}


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
