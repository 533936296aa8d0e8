"""ClearML registrar: checkpoints become output models of the current task.

Installed with ``pip install "lamin-lightning[clearml]"``. What a fit leaves
on its ClearML task, per ``Checkpoint`` callback:

* One output model per checkpoint key, registered by its storage URI with
  ``OutputModel.update_weights(register_uri=...)``, so ClearML never uploads a
  second copy of the bytes. The model is named after the key, has framework
  ``PyTorch Lightning``, the tags ``lamin-lightning`` and ``checkpoint``, and
  the moving tags ``latest`` (the newest checkpoint) and ``best`` (the
  callback's best model). A key saved again (``last.ckpt``) updates its model.
* Model metadata ``key``, ``storage_uri``, ``epoch``, ``global_step``,
  ``monitor``, ``score``, ``is_best``, ``lamindb_artifact_uid`` and
  ``lamindb_run_uid``; the comment repeats key, URI, UIDs and score.
* The LightningCLI config and ``hparams.yaml`` as task artifacts named after
  their key. :func:`task_link` gives the task id and URL to record on the
  LaminDB run.

The plugin reuses ``Task.current_task()`` and never closes it. With no task it
starts one (project from ``LAMIN_LIGHTNING_CLEARML_PROJECT``, default
``lamin-lightning``; the task is named after the fit's key prefix) and closes
it when the fit ends. That task has ClearML's own PyTorch binding switched
off: the binding patches the trainers of both ``lightning`` and
``pytorch_lightning`` and would register, or upload, every checkpoint a
second time. Its repository detection is off too: it runs git and pip from
a background thread while training runs, and a hung child process made
``task.close()`` wait 300 s. On a task of your own, ``Task.init(...,
auto_connect_frameworks={"pytorch": False})`` switches the binding off.

Offline (``CLEARML_OFFLINE_MODE=1``) the client cannot create models, which
needs a server. Each checkpoint is then recorded as a task artifact named
after its key, with the same metadata plus ``tags``: a remote URI (``s3://``,
``gs://``, ``https://`` ...) as a link, a ``file://`` URI as a one-line text
artifact holding the URI. One warning per fit says so.

``LAMIN_LIGHTNING_CLEARML_EVICTION`` says what happens to the record of a
checkpoint that top-k eviction removed: ``delete`` (default) deletes the model
(offline: the task artifact) and never the weights file, whose bytes the
persister already removed; ``untag`` keeps it, drops ``best`` and ``latest``
and tags it ``evicted``.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Literal, get_args

from lamin_lightning_core._errors import LaminLightningWarning, PluginUnavailable
from lamin_lightning_core._events import BackendRunLink
from lamin_lightning_core.hookspecs import hookimpl

if importlib.util.find_spec("clearml") is None:
    raise PluginUnavailable("clearml", "clearml")

if TYPE_CHECKING:
    from clearml import OutputModel, Task

    from lamin_lightning_core._events import (
        ArtifactRemovedEvent,
        ArtifactSavedEvent,
        FitEndedEvent,
        FitStartedEvent,
    )

log = logging.getLogger(__name__)

PLUGIN_NAME: Final = "clearml"
EVICTION_ENV: Final = "LAMIN_LIGHTNING_CLEARML_EVICTION"
PROJECT_ENV: Final = "LAMIN_LIGHTNING_CLEARML_PROJECT"
DEFAULT_PROJECT: Final = "lamin-lightning"
FRAMEWORK: Final = "PyTorch Lightning"
BASE_TAGS: Final = ("lamin-lightning", "checkpoint")
MOVING_TAGS: Final = ("latest", "best")
EVICTED_TAG: Final = "evicted"

EvictionPolicy = Literal["delete", "untag"]
EVICTION_POLICIES: Final[tuple[str, ...]] = get_args(EvictionPolicy)


@dataclass(frozen=True)
class ClearMLTaskLink:
    """Where a callback's checkpoints went in ClearML; record it on the run.

    Attributes:
        task_id: the ClearML task id (``offline-<hex>`` offline).
        project: the task's project name.
        url: the task's page in the web app; ``None`` offline (known after
            ``clearml-task --import-offline-session``).
        offline: whether the task records an offline session.
        started_here: whether this plugin started (and closes) the task.
    """

    task_id: str
    project: str | None
    url: str | None
    offline: bool
    started_here: bool


@dataclass
class _Registration:
    """What one callback registers during one fit."""

    task: Task
    link: ClearMLTaskLink
    eviction: EvictionPolicy
    models: dict[str, OutputModel] = field(default_factory=dict)
    tag_keys: dict[str, str] = field(default_factory=dict)


# Per callback id: the current fit's registration.
_registrations: dict[str, _Registration] = {}
# Per callback id: the newest link, kept after the fit for the caller to read.
_links: dict[str, ClearMLTaskLink] = {}
# Per task id this plugin started: the callbacks still using it.
_owners: dict[str, set[str]] = {}


def task_link(callback_id: str) -> ClearMLTaskLink | None:
    """Return the ClearML task that registered ``callback_id``'s newest fit.

    Available from ``fit_started`` on and kept after the fit ends, so the
    caller can record the task id and URL on the LaminDB run.

    Args:
        callback_id: ``Checkpoint.state_key`` of the callback.

    Returns:
        The link, or ``None`` if the plugin registered nothing for it.
    """
    return _links.get(callback_id)


def read_eviction_policy() -> EvictionPolicy:
    """Read ``LAMIN_LIGHTNING_CLEARML_EVICTION``; ``delete`` when unset.

    Raises:
        ValueError: naming the variable, its value and the accepted ones.
    """
    value = os.environ.get(EVICTION_ENV, "").strip().lower() or "delete"
    if value not in EVICTION_POLICIES:
        raise ValueError(
            f"{EVICTION_ENV}={value!r} is not an eviction policy of the ClearML "
            f"plugin: set it to one of {', '.join(EVICTION_POLICIES)} "
            "(default 'delete')."
        )
    return value  # type: ignore[return-value]


# -- hooks ------------------------------------------------------------------------


@hookimpl
def lamin_lightning_fit_started(event: FitStartedEvent) -> BackendRunLink | None:
    """Find or start the task that receives this fit's checkpoints.

    Returns:
        The task, for the persister to record on the tracked run.

    Raises:
        ValueError: if ``LAMIN_LIGHTNING_CLEARML_EVICTION`` is not a policy.
    """
    eviction = read_eviction_policy()
    found = _find_or_start_task(event)
    if found is None:
        return None
    task, started = found
    link = _link(task, started)
    _registrations[event.callback_id] = _Registration(task, link, eviction)
    _links[event.callback_id] = link
    if started:
        _owners.setdefault(link.task_id, set()).add(event.callback_id)
    log.info(
        "ClearML: registering checkpoints on task %s (%s)",
        link.task_id,
        link.url or "offline session",
    )
    if link.offline:
        log.warning(
            "ClearML: offline mode cannot register output models (that needs a "
            "server); checkpoint URIs go to task %s as task artifacts instead.",
            link.task_id,
        )
    return BackendRunLink(
        system="clearml", run_id=link.task_id, url=link.url, project=link.project
    )


@hookimpl
def lamin_lightning_artifact_saved(event: ArtifactSavedEvent) -> None:
    """Register a checkpoint; upload the config or ``hparams.yaml``."""
    registration = _registrations.get(event.callback_id)
    if registration is None:
        return
    if event.kind != "checkpoint":
        registration.task.upload_artifact(
            name=event.key,
            artifact_object=event.local_path,
            metadata=_metadata(event),
            wait_on_upload=True,
        )
        log.info("ClearML: uploaded %s as a task artifact", event.key)
    elif registration.link.offline:
        _record_artifact(registration, event)
        log.info("ClearML: recorded %s as a task artifact", event.key)
    else:
        model = _register_model(registration, event)
        log.info("ClearML: registered %s as output model %s", event.key, model.id)


@hookimpl
def lamin_lightning_artifact_removed(event: ArtifactRemovedEvent) -> None:
    """Mirror a top-k eviction on the checkpoint's ClearML record."""
    registration = _registrations.get(event.callback_id)
    if registration is None:
        return
    for tag, key in list(registration.tag_keys.items()):
        if key == event.key:
            del registration.tag_keys[tag]
    if registration.link.offline:
        _evict_artifact(registration, event)
    else:
        _evict_model(registration, event)
    log.info("ClearML: evicted %s (policy %r)", event.key, registration.eviction)


@hookimpl
def lamin_lightning_fit_ended(event: FitEndedEvent) -> None:
    """Close the task this plugin started; flush a task it reused."""
    registration = _registrations.pop(event.callback_id, None)
    if registration is None:
        return
    users = _owners.get(registration.link.task_id)
    if users is None:
        registration.task.flush(wait_for_uploads=True)
        return
    users.discard(event.callback_id)
    if not users:
        del _owners[registration.link.task_id]
        _close(registration.task, registration.link, event.status)


# -- the task -----------------------------------------------------------------------


def _find_or_start_task(event: FitStartedEvent) -> tuple[Task, bool] | None:
    from clearml import Task
    from clearml.backend_api.session.defs import MissingConfigError

    task: Task | None = Task.current_task()
    if task is not None:
        return task, False
    try:
        task = Task.init(
            project_name=os.environ.get(PROJECT_ENV) or DEFAULT_PROJECT,
            task_name=event.base_prefix,
            reuse_last_task_id=False,
            # ClearML's stream capture breaks on the stdout that ln.track()
            # wraps; its PyTorch binding would register checkpoints twice.
            # Its repository detection forks git and pip from a thread while
            # training threads run; a child that hangs before exec made
            # task.close() wait its full 300 s at the end of the demo.
            auto_connect_streams=False,
            auto_connect_frameworks={"pytorch": False, "detect_repository": False},
        )
    except MissingConfigError:
        warnings.warn(
            "The 'clearml' plugin found no ClearML configuration and no task, so "
            "checkpoints are not registered on ClearML (training goes on; "
            "checkpoints are still persisted). Run `clearml-init`, point "
            "CLEARML_CONFIG_FILE at a clearml.conf, or set CLEARML_OFFLINE_MODE=1 "
            "to record an offline session.",
            LaminLightningWarning,
            stacklevel=2,
        )
        return None
    return task, True


def _close(task: Task, link: ClearMLTaskLink, status: str) -> None:
    task.close()  # marks the task completed, whatever happened
    # An offline session keeps no status worth correcting.
    if status == "failed" and not link.offline:
        task.mark_failed(status_reason="Lightning fit failed", force=True)
    elif status == "interrupted" and not link.offline:
        task.stopped(force=True, status_message="Lightning fit interrupted")
    log.info("ClearML: closed task %s (fit %s)", link.task_id, status)


def _link(task: Task, started: bool) -> ClearMLTaskLink:
    offline = bool(task.is_offline())
    return ClearMLTaskLink(
        task_id=str(task.id),
        project=task.get_project_name(),
        url=None if offline else task.get_output_log_web_page(),
        offline=offline,
        started_here=started,
    )


# -- checkpoints ----------------------------------------------------------------------


def _metadata(event: ArtifactSavedEvent | ArtifactRemovedEvent) -> dict[str, Any]:
    values = {
        "key": event.key,
        "storage_uri": event.storage_uri,
        "epoch": event.epoch,
        "global_step": event.global_step,
        "lamindb_artifact_uid": event.artifact_uid,
        "lamindb_run_uid": event.run_uid,
    }
    return {name: value for name, value in values.items() if value is not None}


def _checkpoint_metadata(event: ArtifactSavedEvent) -> dict[str, Any]:
    values = _metadata(event)
    values["is_best"] = event.is_best
    if event.monitor is not None and event.score is not None:
        values.update(monitor=event.monitor, score=event.score)
    return values


def _comment(event: ArtifactSavedEvent) -> str:
    lines = [f"Lightning checkpoint {event.key}", f"stored at {event.storage_uri}"]
    if event.artifact_uid:
        lines.append(f"LaminDB artifact {event.artifact_uid}")
    if event.run_uid:
        lines.append(f"LaminDB run {event.run_uid}")
    if event.monitor and event.score is not None:
        lines.append(f"{event.monitor} = {event.score:g}")
    return "\n".join(lines)


def _take_moving_tags(
    registration: _Registration, key: str, is_best: bool
) -> list[str]:
    """Give ``key`` the moving tags and take them off their previous models."""
    taken = list(MOVING_TAGS) if is_best else ["latest"]
    for tag in taken:
        previous = registration.tag_keys.get(tag)
        registration.tag_keys[tag] = key
        model = registration.models.get(previous or "")
        if previous != key and model is not None:
            model.tags = [t for t in model.tags if t != tag]
    return taken


def _register_model(
    registration: _Registration, event: ArtifactSavedEvent
) -> OutputModel:
    from clearml import OutputModel

    tags = [*BASE_TAGS, *_take_moving_tags(registration, event.key, event.is_best)]
    model = registration.models.get(event.key)
    if model is None:
        model = OutputModel(
            task=registration.task,
            name=event.key,
            framework=FRAMEWORK,
            tags=tags,
            comment=_comment(event),
        )
        # Name the task's entry after the key; ClearML would use the URI's
        # stem, URL-quoted, and add an entry for each new URI of one key.
        model.connect(registration.task, name=event.key)
        registration.models[event.key] = model
    else:
        model.tags = tags
        model.comment = _comment(event)
    model.update_weights(
        register_uri=event.storage_uri,
        iteration=event.global_step,
        update_comment=False,
    )
    model.set_all_metadata(
        {
            name: {"value": str(value), "type": type(value).__name__}
            for name, value in _checkpoint_metadata(event).items()
        }
    )
    return model


def _record_artifact(registration: _Registration, event: ArtifactSavedEvent) -> None:
    tags = [*BASE_TAGS, *_take_moving_tags(registration, event.key, event.is_best)]
    # An artifact already recorded keeps its metadata: "tags" says which
    # moving tags the checkpoint had when it was saved.
    registration.task.upload_artifact(
        name=event.key,
        artifact_object=event.storage_uri,
        metadata={**_checkpoint_metadata(event), "tags": ",".join(tags)},
        preview=event.storage_uri,
        wait_on_upload=True,
    )


def _evict_model(registration: _Registration, event: ArtifactRemovedEvent) -> None:
    from clearml import Model

    model = registration.models.pop(event.key, None)
    if model is None:
        log.debug("ClearML: %s was not registered by this fit", event.key)
        return
    if registration.eviction == "untag":
        kept = [tag for tag in model.tags if tag not in MOVING_TAGS]
        model.tags = [*kept, EVICTED_TAG]
        return
    # Only the record goes: the persister already deleted the bytes. force,
    # because another task may use the model as input; it is gone either way.
    Model.remove(model.id, delete_weights_file=False, force=True, raise_on_errors=True)


def _evict_artifact(registration: _Registration, event: ArtifactRemovedEvent) -> None:
    if registration.eviction == "delete":
        registration.task.delete_artifacts(
            [event.key], raise_on_errors=True, delete_from_storage=False
        )
        return
    registration.task.upload_artifact(
        name=event.key,
        artifact_object=event.storage_uri,
        metadata={**_metadata(event), "tags": ",".join([*BASE_TAGS, EVICTED_TAG])},
        preview=event.storage_uri,
        wait_on_upload=True,
    )
