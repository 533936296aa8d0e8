"""The hooks a lamin-lightning plugin may implement.

This module is the contract for plugin authors. A plugin is any object (a
module, a class instance) whose methods carry the ``hookimpl`` marker and are
named after one of the hooks below. Install it through the ``lamin_lightning``
entry-point group, or pass it to ``Checkpoint(plugins=[...])``.

Two roles exist:

* A **persister** turns a local file into a persisted record. Its hooks are
  ``firstresult``: the first plugin that returns something wins, and its
  errors stop the save loudly (the file stays where Lightning wrote it). The
  built-in local persister answers last, so a LaminDB persister, when
  installed, takes precedence.
* A **registrar** or observer reacts to events. Its hooks are broadcasts:
  every plugin is called, and one plugin failing never stops the others nor
  the fit; the failure is logged with the plugin's name and kept on
  ``Checkpoint.delivery_failures``.

Every hook runs on global rank zero only, on the process that trains.

Hooks are called with keyword arguments; an implementation may accept any
subset of a hook's arguments.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from lamin_lightning_core._events import (
        ArtifactRemovedEvent,
        ArtifactSavedEvent,
        BackendRunLink,
        CheckpointQuery,
        CheckpointRecord,
        FitEndedEvent,
        FitStartedEvent,
        PersistedArtifact,
        PersistRequest,
    )

PROJECT_NAME = "lamin_lightning"
"""pluggy project name and entry-point group."""

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


# -- persister: run identity and storage -------------------------------------


@hookspec(firstresult=True)
def lamin_lightning_run_uid() -> str | None:
    """Return the UID of the run being tracked, if any.

    Called once per fit during ``setup``, before the first training step and
    before any key is derived. The UID becomes the version segment of every
    artifact key (see the key tables in the docs) unless the callback was built
    with ``run_uid_is_version=False``.

    Raising here stops the fit before training with your message: use it to
    report a persister that is installed but not configured.

    Returns:
        The run UID, or ``None`` if no run is tracked. Stops at the first
        non-None result.
    """


@hookspec(firstresult=True)
def lamin_lightning_prepare_run(event: FitStartedEvent) -> bool | None:
    """Check and record what the fit will annotate, before training starts.

    Called once per fit and callback during ``setup``, after
    ``lamin_lightning_run_uid`` and before the ``fit_started`` broadcast. A
    persister with a feature registry checks here that every name in
    ``event.run_features`` and ``event.artifact_features`` exists, and
    annotates the run with the run-level values, the trainer configuration and
    the hyperparameters whose names exist as features.

    Raising here stops the fit before the first training step: list every
    missing name at once and say how to create them.

    Returns:
        ``True`` once handled. Stops at the first non-None result.
    """


@hookspec(firstresult=True)
def lamin_lightning_persist_artifact(
    request: PersistRequest,
) -> PersistedArtifact | None:
    """Persist the file ``request.local_path`` under ``request.key``.

    Called after Lightning finished writing a checkpoint, the LightningCLI
    config or ``hparams.yaml``, and before any ``artifact_saved`` broadcast.
    Saving a key that the same run saved before replaces it.

    For checkpoints, ``request.features`` and ``request.auto_features`` are
    the values to annotate the new artifact with, and ``request.ranking`` the
    other checkpoints of the same callback whose ``model_rank``,
    ``is_best_model`` or ``is_last_model`` changed with this save.

    Args:
        request: kind, key, local path, run UID, how to link the artifact to
            the run, and its annotations.

    Returns:
        The persisted record and its storage URI. Stops at the first non-None
        result; the built-in local persister answers last with a ``file://``
        URI of the file where Lightning wrote it.
    """


@hookspec(firstresult=True)
def lamin_lightning_link_backend_runs(
    run_uid: str | None, links: list[BackendRunLink]
) -> bool | None:
    """Record the runs that registrars opened or reused for this fit.

    Called once per fit and callback, right after the ``fit_started``
    broadcast, if any registrar returned a :class:`BackendRunLink`.

    Args:
        run_uid: the tracked run, as from ``lamin_lightning_run_uid``.
        links: one per registrar that mirrors the fit.

    Returns:
        ``True`` once handled. Stops at the first non-None result.
    """


@hookspec(firstresult=True)
def lamin_lightning_delete_artifact(event: ArtifactRemovedEvent) -> bool | None:
    """Mirror Lightning's deletion of a checkpoint in the persister.

    Called when top-k eviction deleted ``event.local_path``, before the
    ``artifact_removed`` broadcast. ``event.artifact`` is the record the same
    persister returned when the file was saved; ``event.ranking`` the
    remaining checkpoints whose standing changed with the eviction.

    On replay, ``event.artifact`` is ``None``: the record is then the one
    with ``event.artifact_uid``. If that is ``None`` too, the fit was killed
    while the persister saved the file: delete whatever the run
    ``event.run_uid`` holds under ``event.key``, if anything.

    Returns:
        ``True`` once handled. Stops at the first non-None result.
    """


# -- persister: finding and fetching checkpoints again -------------------------


@hookspec(firstresult=True)
def lamin_lightning_find_checkpoints(
    query: CheckpointQuery,
) -> list[CheckpointRecord] | None:
    """Return the persisted checkpoints matching ``query``, oldest first.

    Called by ``ll.find_checkpoints()`` and the ``lamin-lightning ls``
    command, in any process, not only during a fit.

    Returns:
        The records (possibly empty) if this persister can search; ``None``
        if it can't, so the next one is asked. Stops at the first non-None
        result.
    """


@hookspec(firstresult=True)
def lamin_lightning_fetch_checkpoint(record: CheckpointRecord) -> str | None:
    """Return a local path of the checkpoint's bytes, downloading if needed.

    Fetching through the persister lets it record the checkpoint as an input
    of the run being tracked (lineage across runs).

    Returns:
        A local path usable as ``ckpt_path``. Stops at the first non-None
        result.
    """


# -- registrars and observers: broadcasts -------------------------------------


@hookspec
def lamin_lightning_fit_started(event: FitStartedEvent) -> BackendRunLink | None:
    """A fit is about to train; key prefixes and the run UID are known.

    Called once per fit and callback, after ``lamin_lightning_prepare_run``.
    A registrar opens or finds its own run here.

    Returns:
        Optionally the registrar's run, which the persister then records on
        the tracked run (``lamin_lightning_link_backend_runs``).
    """


@hookspec
def lamin_lightning_artifact_saved(event: ArtifactSavedEvent) -> None:
    """A checkpoint, config or ``hparams.yaml`` was persisted.

    ``event.storage_uri`` is where the persisted bytes live;
    ``event.artifact`` the persister's record. Events of one key arrive in the
    order they happened.
    """


@hookspec
def lamin_lightning_artifact_removed(event: ArtifactRemovedEvent) -> None:
    """A checkpoint was evicted by top-k and removed from the persister.

    Always arrives after the ``artifact_saved`` event of the same file.
    """


@hookspec
def lamin_lightning_fit_ended(event: FitEndedEvent) -> None:
    """The fit ended, normally or not; close what ``fit_started`` opened."""
