"""W&B model artifact versions and run files behind the ``wandb`` registrar's hooks.

What one callback registers during one fit (``_Registration``) and the calls
that put it into W&B: a checkpoint logged as a version of the model artifact
(by reference or as a copy) with its metadata, the ``best`` alias following
the ranking, evictions an offline run cannot apply, and config files saved as
run files. The hooks, the run they record to, the policies and the
documentation of the plugin live in :mod:`lamin_lightning_adapters.wandb`.
``wandb`` is imported inside the functions only (:func:`_wandb`), so importing
this module never imports it.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlparse
from urllib.request import url2pathname

if TYPE_CHECKING:
    from collections.abc import Mapping
    from types import ModuleType

    from lamin_lightning_adapters.wandb import WandbRunLink
    from lamin_lightning_core._events import ArtifactSavedEvent, CheckpointRank

# The plugin's logger: users and tests configure the plugin, not this helper.
log = logging.getLogger("lamin_lightning_adapters.wandb")

REFERENCE_SCHEMES: Final = frozenset({"file", "s3", "gs", "http", "https"})
"""Schemes W&B checksums by reference; others would dedupe by URI alone."""
NAMESPACE: Final = "lamin_lightning"
"""Folder of run files and prefix of run summary keys."""
BEST_ALIAS: Final = "best"
LATEST_ALIAS: Final = "latest"


@dataclass
class _Registration:
    """What one callback registers during one fit."""

    run: Any
    link: WandbRunLink
    upload: str
    eviction: str
    versions: dict[str, Any] = field(default_factory=dict)
    alias_keys: dict[str, str] = field(default_factory=dict)
    """Which key's version holds each alias in W&B."""
    best_key: str | None = None
    """The best checkpoint by the ranking; offline, may differ from the alias."""
    evicted: list[str] = field(default_factory=list)


def _wandb() -> ModuleType:
    import wandb

    return wandb


def _log_checkpoint(registration: _Registration, event: ArtifactSavedEvent) -> None:
    wandb = _wandb()
    artifact = wandb.Artifact(
        registration.link.artifact_name,
        type="model",
        description=(
            f"Lightning checkpoints, best by {event.monitor}"
            if event.monitor
            else "Lightning checkpoints, the newest is best (no monitor)"
        ),
        metadata=_metadata(event),
    )
    try:
        how = _add_checkpoint(artifact, event, registration.upload)
    except (OSError, ValueError):
        # Registrars run after the save, on the callback's worker thread: with
        # the built-in persister, Lightning may have evicted or rewritten the
        # file meanwhile. Its removal event follows; nothing is lost.
        gone = _missing_source(event, registration.upload)
        if gone is None:
            raise
        log.info(
            "W&B: skipped %s, %s is gone (evicted or replaced before the "
            "registrar ran)",
            event.key,
            gone,
        )
        return
    aliases = [LATEST_ALIAS, BEST_ALIAS] if event.is_best else [LATEST_ALIAS]
    registration.versions[event.key] = registration.run.log_artifact(
        artifact, aliases=aliases
    )
    for alias in aliases:
        registration.alias_keys[alias] = event.key
    if event.is_best:
        _record_best(registration, event.key)
    log.info(
        "Registered %s in W&B as %s (%s) by %s",
        event.key,
        artifact.name,
        ", ".join(aliases),
        how,
    )
    _follow_ranking(registration, event.ranking, saved_key=event.key)


def _metadata(event: ArtifactSavedEvent) -> dict[str, Any]:
    standing = event.ranking.get(event.key)
    return {
        "key": event.key,
        "storage_uri": event.storage_uri,
        "monitor": event.monitor,
        "mode": event.mode,
        "score": event.score,
        "save_weights_only": event.save_weights_only,
        "epoch": event.epoch,
        "global_step": event.global_step,
        "lamindb_artifact_uid": event.artifact_uid,
        "lamindb_run_uid": event.run_uid,
        **(standing.model_dump() if standing is not None else {}),
        "features": dict(event.features),
    }


def _follow_ranking(
    registration: _Registration,
    ranking: Mapping[str, CheckpointRank],
    saved_key: str | None = None,
) -> None:
    """Move ``best`` to an older version that the ranking made the best."""
    best = next(
        (
            key
            for key, standing in ranking.items()
            if standing.is_best_model and key != saved_key
        ),
        None,
    )
    if best is None or best == registration.best_key:
        return
    version = registration.versions.get(best)
    if version is None:
        log.debug("No W&B version of %s, the best checkpoint now", best)
        return
    _record_best(registration, best)
    if registration.link.offline:
        log.info(
            "W&B run %s is offline: %s is the best checkpoint again, but alias "
            "%r cannot move back to its version before `wandb sync`",
            registration.link.run_id,
            best,
            BEST_ALIAS,
        )
        return
    version.wait()
    version.aliases = sorted({*version.aliases, BEST_ALIAS})
    version.save()
    registration.alias_keys[BEST_ALIAS] = best
    log.info("Moved W&B alias %r to version %s (%s)", BEST_ALIAS, version.name, best)


def _record_best(registration: _Registration, key: str) -> None:
    registration.best_key = key
    name = registration.link.artifact_name
    registration.run.summary[f"{NAMESPACE}/{name}/{BEST_ALIAS}"] = key


def _missing_source(event: ArtifactSavedEvent, upload: str) -> Path | None:
    """The local file W&B would read for this checkpoint, if it is gone."""
    uri = urlparse(event.storage_uri)
    if upload == "reference" and uri.scheme == "file":
        path = Path(url2pathname(uri.path))
    elif upload == "reference" and uri.scheme in REFERENCE_SCHEMES:
        return None  # remote: W&B checks it, not us
    else:
        path = event.local_path
    return None if path.exists() else path


def _add_checkpoint(artifact: Any, event: ArtifactSavedEvent, upload: str) -> str:
    """Add the checkpoint by reference or as a copy; return which."""
    name = PurePosixPath(event.key).name
    scheme = urlparse(event.storage_uri).scheme
    if upload == "reference" and scheme in REFERENCE_SCHEMES:
        artifact.add_reference(event.storage_uri, name=name)
        return f"reference to {event.storage_uri}"
    # A copy is staged now: Lightning may delete the file before W&B uploads.
    if event.local_path.is_dir():
        artifact.add_dir(str(event.local_path), name=name)
    else:
        artifact.add_file(str(event.local_path), name=name)
    if upload == "reference":
        return f"upload (W&B cannot refer to {scheme}:// URIs)"
    return "upload"


def _record_offline_eviction(registration: _Registration, key: str) -> None:
    link = registration.link
    run = registration.run
    run.summary[f"{NAMESPACE}/{link.artifact_name}/evicted"] = list(
        registration.evicted
    )
    stale = sorted(
        alias for alias, held in registration.alias_keys.items() if held == key
    )
    if stale or registration.eviction == "delete":
        log.warning(
            "W&B run %s is offline: the version of evicted %s cannot be %s "
            "before `wandb sync`%s; it is listed in the run summary under %s.",
            link.run_id,
            key,
            "deleted" if registration.eviction == "delete" else "untagged",
            f" and keeps alias(es) {', '.join(stale)}" if stale else "",
            f"{NAMESPACE}/{link.artifact_name}/evicted",
        )
    else:
        log.info(
            "W&B run %s is offline: evicted %s keeps its version, which holds "
            "no alias any more",
            link.run_id,
            key,
        )


def _save_run_file(registration: _Registration, event: ArtifactSavedEvent) -> None:
    run = registration.run
    run_dir = Path(run.dir)
    target = run_dir / NAMESPACE / event.key
    target.parent.mkdir(parents=True, exist_ok=True)
    # Copy, not link: Lightning rewrites hparams.yaml and the copy must show
    # what was persisted at this event.
    shutil.copyfile(event.local_path, target)
    run.save(str(target), base_path=str(run_dir), policy="now", glob=False)
    run.config.update(
        {
            f"lamin_{event.kind}": {
                "key": event.key,
                "storage_uri": event.storage_uri,
                "artifact_uid": event.artifact_uid,
            }
        },
        allow_val_change=True,
    )
    log.info("Saved %s to W&B run %s as a run file", event.key, run.id)
