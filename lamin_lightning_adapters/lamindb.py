"""LaminDB persister: checkpoints, configs and hparams as LaminDB artifacts.

Lineage follows the spec: checkpoints are outputs of the tracked run, the
LightningCLI config is an input, ``hparams.yaml`` is neither. The run comes
from ``ln.track()``.

Offline: saving a file that lies outside the instance's storage root makes
lamindb ask the LaminHub whether the instance is registered there, which fails
without network. An anonymous user cannot have registered an instance on the
hub, so for a local instance of an anonymous user we record "not on hub"
before the first save. This touches a private lamindb-setup attribute
(``InstanceSettings._is_on_hub``); the lamindb range in ``pyproject.toml`` is
pinned to versions where that is tested.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lamin_lightning_adapters._lamindb_storage import link_into_storage
from lamin_lightning_core._errors import LaminLightningError, PluginUnavailable
from lamin_lightning_core._events import PersistedArtifact
from lamin_lightning_core.hookspecs import hookimpl

if TYPE_CHECKING:
    from types import ModuleType

    from lamin_lightning_adapters._lamindb_features import FeatureWriter
    from lamin_lightning_core._events import (
        ArtifactRemovedEvent,
        BackendRunLink,
        CheckpointQuery,
        CheckpointRecord,
        FitStartedEvent,
        PersistRequest,
    )

if importlib.util.find_spec("lamindb") is None:
    raise PluginUnavailable("lamindb", "lamindb")

log = logging.getLogger(__name__)

_writers: dict[str, FeatureWriter] = {}
"""Feature writers of the fits in progress, by callback id."""

_KINDS = {"checkpoint": "model", "config": None, "hparams": None}


def _lamindb() -> ModuleType:
    """Import lamindb, check an instance is configured, make saves offline-safe.

    Raises:
        LaminLightningError: if no LaminDB instance is configured.
    """
    import lamindb_setup

    if not lamindb_setup.settings.is_configured:
        raise LaminLightningError(
            "The lamindb plugin is installed but no LaminDB instance is "
            "configured. Create a local one with `lamin init --storage ./lamindb` "
            "(or connect with `lamin connect <owner/name>`), or switch the plugin "
            "off with LAMIN_LIGHTNING_DISABLE_PLUGINS=lamindb."
        )
    mark_local_instance_offline_safe()
    return importlib.import_module("lamindb")


def mark_local_instance_offline_safe() -> None:
    """Spare a local instance of an anonymous user the LaminHub lookup."""
    import lamindb_setup

    settings = lamindb_setup.settings
    instance = settings.instance
    if (
        instance._is_on_hub is None
        and settings.user.handle == "anonymous"
        and not instance.is_remote
    ):
        log.debug("Local instance of an anonymous user: not on LaminHub")
        instance._is_on_hub = False


def ensure_local_instance(root: str | os.PathLike[str], name: str) -> str:
    """Use the configured LaminDB instance, or an embedded one under ``root``.

    Call it before ``lamindb`` is imported. If the environment already names
    an instance (``LAMIN_CURRENT_INSTANCE``, or a current instance in the
    LaminDB settings folder), nothing changes. Otherwise a local SQLite
    instance ``name`` is created once under ``root`` (no network needed), its
    settings are kept in ``root/settings`` so they don't touch the user's
    home folder, and it becomes the current instance of this process and its
    children.

    Returns:
        The slug of the instance in use, or ``"configured"`` if the
        environment already had one.

    Raises:
        RuntimeError: if ``lamindb`` was imported already, or ``lamin init``
            failed (its output is included).
    """
    if (
        "LAMIN_CURRENT_INSTANCE" in os.environ
        or _settings_file("current_instance.env").exists()
    ):
        return "configured"
    if "lamindb_setup" in sys.modules:
        raise RuntimeError(
            "ensure_local_instance() must run before lamindb is imported: the "
            "settings folder is read at import time."
        )
    root = Path(root).resolve()
    os.environ["LAMIN_SETTINGS_DIR"] = str(root / "settings")
    os.environ.setdefault("LAMIN_CACHE_DIR", str(root / "cache"))
    slug = f"anonymous/{name}"
    if not _settings_file(f"instance--anonymous--{name}.env").exists():
        # the lamin CLI of this interpreter, whether or not it is on PATH
        command = [sys.executable, "-m", "lamin_cli", "init"]
        command += ["--storage", str(root / "storage"), "--name", name]
        # lamin init leaves a marker file in its working directory: keep it
        # inside root rather than in the user's project folder.
        root.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(
            command, capture_output=True, text=True, check=False, cwd=root
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"`{' '.join(command)}` failed with exit code {done.returncode}:\n"
                f"{done.stdout}{done.stderr}"
            )
        log.info("Created the local LaminDB instance %s under %s", slug, root)
    os.environ["LAMIN_CURRENT_INSTANCE"] = slug
    return slug


def _settings_file(name: str) -> Path:
    base = os.environ.get("LAMIN_SETTINGS_DIR") or str(Path.home())
    return Path(base) / ".lamin" / name


def storage_uri(artifact: Any) -> str:
    """The URI of an artifact's bytes: ``file://`` locally, else the cloud URI."""
    path = artifact.path
    if isinstance(path, Path):
        return path.resolve().as_uri()
    return str(path)


@hookimpl
def lamin_lightning_run_uid() -> str | None:
    run = _lamindb().context.run
    return None if run is None else str(run.uid)


def _tracked_run(ln: ModuleType, run_uid: str | None) -> Any:
    if run_uid is None:
        return None
    run = ln.context.run
    if run is not None and run.uid == run_uid:
        return run
    # A replay, in a later process: the file still belongs to its own run.
    return ln.Run.filter(uid=run_uid).one_or_none()


@hookimpl
def lamin_lightning_prepare_run(event: FitStartedEvent) -> bool:
    from lamin_lightning_adapters._lamindb_features import FeatureWriter

    ln = _lamindb()
    run = _tracked_run(ln, event.run_uid)
    _writers[event.callback_id] = FeatureWriter(ln, event, run)
    return True


@hookimpl
def lamin_lightning_link_backend_runs(
    run_uid: str | None, links: list[BackendRunLink]
) -> bool:
    ln = _lamindb()
    run = _tracked_run(ln, run_uid)
    names: dict[str, str | None] = {}
    for link in links:
        names[f"{link.system}_run_id"] = link.run_id
        names[f"{link.system}_run_url"] = link.url
        log.info(
            "LaminDB run %s is mirrored in %s run %s", run_uid, link.system, link.run_id
        )
    if run is None:
        return True
    from lamin_lightning_adapters._lamindb_features import FEATURE_TYPE

    features = ln.Feature.filter(
        name__in=list(names), type__name=FEATURE_TYPE, type__is_type=True
    )
    values = {f: names[f.name] for f in features if names[f.name] is not None}
    if values:
        run.features.add_values(values)
    return True


@hookimpl
def lamin_lightning_persist_artifact(request: PersistRequest) -> PersistedArtifact:
    ln = _lamindb()
    run = _tracked_run(ln, request.run_uid)
    previous = ln.Artifact.filter(key=request.key, is_latest=True).first()
    linked = None
    if request.kind == "checkpoint":
        linked = link_into_storage(ln, request.local_path)
    try:
        artifact = ln.Artifact(
            linked or request.local_path,
            key=request.key,
            description=request.description,
            kind=_KINDS[request.kind],
            run=run if request.is_run_output and run is not None else False,
            skip_hash_lookup=True,
        ).save()
    except BaseException:
        if linked is not None:
            linked.unlink(missing_ok=True)  # the error itself is raised
        raise
    if request.is_run_input and run is not None:
        run.input_artifacts.add(artifact)
    if previous is not None and run is not None and previous.run_id == run.id:
        # Lightning overwrote a file it wrote earlier in this run (last.ckpt):
        # keep one artifact per key and run, as on disk. Another run's
        # artifact under the same key stays, as an older version.
        previous.delete(permanent=True, storage=True)
    writer = _writers.get(request.callback_id)
    if writer is None and request.kind == "checkpoint":
        # A replay, in a process where that fit never started: annotate the
        # same way, with what the journal kept.
        from lamin_lightning_adapters._lamindb_features import FeatureWriter

        writer = FeatureWriter.for_replay(ln, request.features)
        _writers[request.callback_id] = writer
    if writer is not None and request.kind == "checkpoint":
        writer.annotate(artifact, request.key, request.features, request.auto_features)
        writer.rerank(request.ranking)
    log.debug("Saved LaminDB artifact %s for %s", artifact.uid, request.key)
    return PersistedArtifact(
        storage_uri=storage_uri(artifact), artifact=artifact, artifact_uid=artifact.uid
    )


@hookimpl
def lamin_lightning_find_checkpoints(query: CheckpointQuery) -> list[CheckpointRecord]:
    from lamin_lightning_adapters._lamindb_query import find_checkpoints

    return find_checkpoints(_lamindb(), query)


@hookimpl
def lamin_lightning_fetch_checkpoint(record: CheckpointRecord) -> str:
    from lamin_lightning_adapters._lamindb_query import fetch_checkpoint

    return fetch_checkpoint(_lamindb(), record)


@hookimpl
def lamin_lightning_delete_artifact(event: ArtifactRemovedEvent) -> bool | None:
    ln = _lamindb()
    artifact = event.artifact
    if artifact is None and event.artifact_uid is not None:
        # A replayed removal carries no live record: find it by its UID.
        artifact = ln.Artifact.filter(uid=event.artifact_uid).one_or_none()
        if artifact is None:
            return True  # deleted already: replaying twice changes nothing
    elif artifact is None:
        # A save that a killed fit may have persisted without telling its
        # journal: whatever this run holds under the key goes.
        run = {"run__uid": event.run_uid} if event.run_uid else {"run": None}
        for stray in ln.Artifact.filter(key=event.key, **run):
            log.info("Deleting %s, persisted by a killed fit", event.key)
            stray.delete(permanent=True, storage=True)
        return True
    if not isinstance(artifact, ln.Artifact):
        return None
    artifact.delete(permanent=True, storage=True)
    writer = _writers.get(event.callback_id)
    if writer is not None:
        writer.forget(event.key)
        writer.rerank(event.ranking)
    log.debug("Deleted LaminDB artifact %s (%s)", event.artifact_uid, event.key)
    return True
