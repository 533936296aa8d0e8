"""Weights & Biases registrar: every checkpoint a version of one model artifact.

What a fit leaves in W&B, per run and ``Checkpoint`` callback:

* One artifact of type ``model`` named ``model-<run id>``, the name Lightning's
  ``WandbLogger(log_model=...)`` uses, so ``run.use_artifact("model-<id>:best")``
  keeps working. A second callback on the same run gets
  ``model-<run id>-<monitor>``. Each checkpoint is one version whose entry is
  named after the checkpoint file (a folder for a sharded checkpoint) and
  refers to ``event.storage_uri``.
* Aliases: ``latest`` on every new version, ``best`` on the callback's best
  checkpoint. W&B keeps an alias on one version of an artifact, so both move
  as training goes on. ``best`` follows ``event.ranking``, the same standing
  LaminDB records as ``is_best_model``: when a save or an eviction makes an
  older checkpoint the best, its version gets the alias back (online; see
  offline runs below). The run summary holds the current best key under
  ``lamin_lightning/<artifact name>/best``.
* Version metadata: ``key``, ``storage_uri``, ``monitor``, ``mode``,
  ``score``, ``save_weights_only``, ``epoch``, ``global_step``,
  ``lamindb_artifact_uid``, ``lamindb_run_uid``; the checkpoint's standing
  when it was saved (``model_rank``, ``is_best_model``, ``is_last_model``; the
  aliases, not these values, follow later changes); and the user's
  artifact-level values (``Checkpoint(features={"artifact": ...})``) under
  ``features``.
* The LightningCLI config and ``hparams.yaml`` as run files under
  ``lamin_lightning/<key>`` (the run's Files tab), and run config values
  ``lamin_run_uid``, ``lamin_config`` and ``lamin_hparams`` linking back to
  LaminDB. Run config ``lamin_lightning`` holds the LaminDB run UID, the
  user's run-level feature values (``features``), the scalar hyperparameters
  and the trainer configuration, apart from what ``WandbLogger`` logs.
* ``lamin_lightning_fit_started`` returns the run as a ``BackendRunLink``;
  the LaminDB persister records it as the run features ``wandb_run_id`` and
  ``wandb_run_url`` (no URL offline). :func:`run_link` gives the same run with
  the artifact name.

The plugin reuses the active run (``wandb.run``, e.g. opened by
``WandbLogger``) and never finishes it. With no active run it starts one if W&B
is configured (a project, or offline mode) and finishes it when the fit ends.

Policies, read from the environment when a fit starts:

``LAMIN_LIGHTNING_WANDB_UPLOAD``
    ``reference`` (default): record the storage URI by reference when W&B can
    check it (``file``, ``s3``, ``gs``, ``http``, ``https``); other schemes
    upload the local file. ``upload``: always upload a copy of the file.
``LAMIN_LIGHTNING_WANDB_EVICTION``
    What happens to the version of a checkpoint that top-k eviction removed.
    ``untag`` (default): drop its aliases, tag it ``evicted`` and set
    ``evicted: true`` in its metadata. ``delete``: delete the version (the
    referenced bytes are not W&B's to delete).

Offline runs cannot change a version once it is logged: an evicted version is
neither untagged nor deleted. Its ``latest``/``best`` aliases have normally
moved to newer versions already (Lightning evicts after saving the better
checkpoint); the evicted keys are listed in the run summary under
``lamin_lightning/<artifact name>/evicted`` so they can be pruned after
``wandb sync``. Likewise ``best`` cannot move back to an older version
offline: it stays where it was, and the run summary names the best key.

Hooks run on the callback's worker thread, after the save. With the built-in
persister the storage URI is Lightning's own file, which eviction may have
deleted by then: such a checkpoint is skipped with one INFO line.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from lamin_lightning_adapters._wandb_artifacts import (
    BEST_ALIAS as BEST_ALIAS,
)
from lamin_lightning_adapters._wandb_artifacts import (
    LATEST_ALIAS as LATEST_ALIAS,
)
from lamin_lightning_adapters._wandb_artifacts import (
    NAMESPACE,
    _follow_ranking,
    _log_checkpoint,
    _record_offline_eviction,
    _Registration,
    _save_run_file,
    _wandb,
)
from lamin_lightning_adapters._wandb_artifacts import (
    REFERENCE_SCHEMES as REFERENCE_SCHEMES,
)
from lamin_lightning_core._errors import LaminLightningWarning, PluginUnavailable
from lamin_lightning_core._events import BackendRunLink
from lamin_lightning_core.hookspecs import hookimpl

if TYPE_CHECKING:
    from lamin_lightning_core._events import (
        ArtifactRemovedEvent,
        ArtifactSavedEvent,
        FitEndedEvent,
        FitStartedEvent,
    )

if importlib.util.find_spec("wandb") is None:
    raise PluginUnavailable("wandb", "wandb")

log = logging.getLogger(__name__)

PLUGIN_NAME: Final = "wandb"
UPLOAD_ENV: Final = "LAMIN_LIGHTNING_WANDB_UPLOAD"
EVICTION_ENV: Final = "LAMIN_LIGHTNING_WANDB_EVICTION"
UPLOAD_POLICIES: Final = ("reference", "upload")
EVICTION_POLICIES: Final = ("untag", "delete")
EVICTED_TAG: Final = "evicted"


@dataclass(frozen=True)
class WandbRunLink:
    """Where a callback's checkpoints went in W&B; record it on the LaminDB run.

    Attributes:
        run_id: the W&B run id.
        project: the W&B project.
        entity: the W&B entity, empty offline.
        url: the run's page, ``None`` offline (known after ``wandb sync``).
        offline: whether the run records to disk only.
        artifact_name: the model artifact receiving this callback's versions.
        started_here: whether this plugin started (and finishes) the run.
    """

    run_id: str
    project: str
    entity: str
    url: str | None
    offline: bool
    artifact_name: str
    started_here: bool


# Per callback id: the current fit's registration, or None while inactive.
_registrations: dict[str, _Registration | None] = {}
# Per callback id: the newest link, kept after the fit for the caller to read.
_links: dict[str, WandbRunLink] = {}
# Per run id: artifact name of each callback, stable across fits on one run.
_names: dict[str, dict[str, str]] = {}
# Per run id this plugin started: the callbacks still using it.
_owners: dict[str, set[str]] = {}


def run_link(callback_id: str) -> WandbRunLink | None:
    """Return the W&B run that registered ``callback_id``'s newest fit.

    Available from ``fit_started`` on and kept after the fit ends, so the
    caller can record the run id and URL on the LaminDB run.

    Args:
        callback_id: ``Checkpoint.state_key`` of the callback.

    Returns:
        The link, or ``None`` if the plugin registered nothing for it.
    """
    return _links.get(callback_id)


def read_policies() -> tuple[str, str]:
    """Read the upload and eviction policies from the environment.

    Returns:
        ``(upload, eviction)``, defaults ``("reference", "untag")``.

    Raises:
        ValueError: naming the variable, its value and the accepted values.
    """
    upload = _policy(UPLOAD_ENV, UPLOAD_POLICIES)
    eviction = _policy(EVICTION_ENV, EVICTION_POLICIES)
    return upload, eviction


def _policy(variable: str, accepted: tuple[str, ...]) -> str:
    value = os.environ.get(variable, "").strip().lower() or accepted[0]
    if value not in accepted:
        raise ValueError(
            f"{variable}={os.environ[variable]!r} is not a policy of the "
            f"{PLUGIN_NAME!r} plugin: set it to one of "
            f"{', '.join(map(repr, accepted))} or unset it for {accepted[0]!r}."
        )
    return value


# -- hooks ----------------------------------------------------------------------


@hookimpl
def lamin_lightning_fit_started(event: FitStartedEvent) -> BackendRunLink | None:
    """Find or start the W&B run and name this callback's model artifact.

    Returns:
        The W&B run, for the persister to record on the tracked run; ``None``
        if W&B is disabled or not configured.

    Raises:
        ValueError: if a policy environment variable has an unknown value.
    """
    upload, eviction = read_policies()
    _registrations[event.callback_id] = None
    run, started = _find_or_start_run(event)
    if run is None:
        return None
    if run.disabled:
        log.debug("W&B run %s is disabled: nothing to register", run.id)
        _release(run, event.callback_id, started)
        return None
    _update_run_config(run, event)
    link = WandbRunLink(
        run_id=run.id,
        project=run.project,
        entity=run.entity,
        url=None if run.offline else run.url,
        offline=run.offline,
        artifact_name=_artifact_name(run.id, event),
        started_here=started,
    )
    _links[event.callback_id] = link
    _registrations[event.callback_id] = _Registration(run, link, upload, eviction)
    log.info(
        "W&B run %s (%s) registers checkpoints as artifact %s",
        run.id,
        link.url or "offline",
        link.artifact_name,
    )
    return BackendRunLink(
        system=PLUGIN_NAME, run_id=run.id, url=link.url, project=run.project
    )


@hookimpl
def lamin_lightning_artifact_saved(event: ArtifactSavedEvent) -> None:
    """Log a checkpoint as a new artifact version, a config as a run file."""
    registration = _registrations.get(event.callback_id)
    if registration is None:
        return
    if event.kind == "checkpoint":
        _log_checkpoint(registration, event)
    else:
        _save_run_file(registration, event)


@hookimpl
def lamin_lightning_artifact_removed(event: ArtifactRemovedEvent) -> None:
    """Untag or delete the version of an evicted checkpoint (online only)."""
    registration = _registrations.get(event.callback_id)
    if registration is None or event.kind != "checkpoint":
        return
    version = registration.versions.pop(event.key, None)
    if version is None:
        log.debug("No W&B version was logged for evicted %s", event.key)
        return
    registration.evicted.append(event.key)
    if registration.link.offline:
        _record_offline_eviction(registration, event.key)
    elif registration.eviction == "delete":
        version.wait()
        version.delete(delete_aliases=True)
        log.info("Deleted W&B version %s of evicted %s", version.name, event.key)
    else:
        version.wait()
        version.aliases = []
        version.tags = sorted({*version.tags, EVICTED_TAG})
        version.metadata = {**version.metadata, EVICTED_TAG: True}
        version.save()
        log.info("Untagged W&B version %s of evicted %s", version.name, event.key)
    _follow_ranking(registration, event.ranking)


@hookimpl
def lamin_lightning_fit_ended(event: FitEndedEvent) -> None:
    """Finish the run if this plugin started it and no callback still uses it."""
    registration = _registrations.pop(event.callback_id, None)
    if registration is None:
        return
    run = registration.run
    if _release(run, event.callback_id, registration.link.started_here):
        run.finish(exit_code=0 if event.status == "finished" else 1)
        log.info("Finished W&B run %s (fit %s)", run.id, event.status)


# -- runs -----------------------------------------------------------------------


def _find_or_start_run(event: FitStartedEvent) -> tuple[Any, bool]:
    wandb = _wandb()
    run = wandb.run
    if run is not None:
        owners = _owners.get(run.id)
        if owners is not None:
            owners.add(event.callback_id)
        return run, owners is not None
    settings = wandb.setup().settings
    if settings.mode == "disabled":
        log.debug("W&B is disabled (WANDB_MODE=disabled): nothing to register")
        return None, False
    if settings.project is None and settings.mode not in ("offline", "dryrun"):
        _warn_not_configured("no active run, no project and not offline")
        return None, False
    try:
        run = wandb.init(job_type="train")
    except (wandb.errors.UsageError, wandb.errors.AuthenticationError) as error:
        _warn_not_configured(f"wandb.init() failed: {error}")
        return None, False
    _owners[run.id] = {event.callback_id}
    log.info("Started W&B run %s in project %s", run.id, run.project)
    return run, True


def _release(run: Any, callback_id: str, started: bool) -> bool:
    """Drop ``callback_id`` from the run's users; True if the run should end."""
    if not started:
        return False
    owners = _owners.get(run.id, set())
    owners.discard(callback_id)
    if owners:
        return False
    _owners.pop(run.id, None)
    return True


def _update_run_config(run: Any, event: FitStartedEvent) -> None:
    # Under our own key: WandbLogger logs the hyperparameters at the top level
    # and a second fit on the run may change them.
    values: dict[str, Any] = {
        NAMESPACE: {
            "run_uid": event.run_uid,
            "features": event.run_features,
            "hyperparameters": event.hyperparameters,
            "trainer": event.trainer_config,
        }
    }
    if event.run_uid is not None:
        values["lamin_run_uid"] = event.run_uid
    run.config.update(values, allow_val_change=True)


def _warn_not_configured(reason: str) -> None:
    warnings.warn(
        f"The {PLUGIN_NAME!r} plugin registers nothing in this fit: W&B is not "
        f"configured ({reason}). Training goes on and checkpoints are still "
        "persisted. Set WANDB_PROJECT=<project> and log in (`wandb login` or "
        "WANDB_API_KEY), or set WANDB_MODE=offline to record locally, or open a "
        "run first (WandbLogger or wandb.init()). To silence this, switch the "
        "plugin off with LAMIN_LIGHTNING_DISABLE_PLUGINS=wandb.",
        LaminLightningWarning,
        stacklevel=3,
    )


def _artifact_name(run_id: str, event: FitStartedEvent) -> str:
    names = _names.setdefault(run_id, {})
    if event.callback_id not in names:
        name = f"model-{run_id}"
        if names:
            slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", event.monitor or "checkpoints")
            name = candidate = f"{name}-{slug}"
            taken = set(names.values())
            suffix = 2
            while name in taken:
                name, suffix = f"{candidate}-{suffix}", suffix + 1
        names[event.callback_id] = name
    return names[event.callback_id]
