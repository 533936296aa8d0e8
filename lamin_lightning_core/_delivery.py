"""What the worker does with a save or a removal: persist, record, announce.

Everything here runs on the background thread of a
:class:`~lamin_lightning_core.Checkpoint` (inline with ``asynchronous=False``)
and only reads what the training thread captured at the moment of the save.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lamin_lightning_core._errors import PersistError
from lamin_lightning_core._events import ArtifactRemovedEvent, ArtifactSavedEvent

if TYPE_CHECKING:
    from pathlib import Path

    from lamin_lightning_core._bus import PluginBus
    from lamin_lightning_core._events import CheckpointRank, PersistRequest
    from lamin_lightning_core._staging import Stager

log = logging.getLogger(__name__)

DESCRIPTIONS = {
    "checkpoint": "Lightning model checkpoint",
    "config": "LightningCLI config",
    "hparams": "Lightning hparams.yaml",
}
"""The description a persister gives each kind of file."""


@dataclass(frozen=True)
class PendingSave:
    """A save as the training thread saw it, waiting for the worker.

    Attributes:
        request: what the persister gets; ``local_path`` is the staged file.
        original: the file Lightning wrote (the event's ``local_path``).
        fields: the event's fields taken at save time (epoch, step, score,
            ranking, ...).
    """

    request: PersistRequest
    original: Path
    fields: dict[str, Any]


class Delivery:
    """Persist staged files and announce them, in the order they come.

    Args:
        bus: the callback's plugin bus.
        stager: releases a staged file once its event is broadcast.
    """

    def __init__(self, bus: PluginBus, stager: Stager) -> None:
        self.bus = bus
        self.stager = stager
        self.last: dict[str, ArtifactSavedEvent] = {}
        self.last_event: ArtifactSavedEvent | ArtifactRemovedEvent | None = None
        self._saved: dict[Path, ArtifactSavedEvent] = {}

    def save(self, pending: PendingSave) -> ArtifactSavedEvent:
        """Persist, record and broadcast one file; release its staged name.

        Raises:
            PersistError: if the persister failed; the staged file is kept.
        """
        request, original = pending.request, pending.original
        try:
            persisted = self.bus.persist(request)
        except PersistError as error:
            if request.local_path == original:
                raise
            raise PersistError(
                f"{error} Lightning saved it as {original}; the staged file is "
                "kept, since top-k eviction may have deleted that one already."
            ) from error
        local_path = original.resolve()
        storage_uri = persisted.storage_uri
        if storage_uri == request.local_path.resolve().as_uri():
            # A persister that keeps files where they are (the built-in one)
            # points at the staged name, which goes away: use Lightning's.
            storage_uri = local_path.as_uri()
        event = ArtifactSavedEvent(
            callback_id=request.callback_id,
            run_uid=request.run_uid,
            kind=request.kind,
            key=request.key,
            local_path=local_path,
            storage_uri=storage_uri,
            artifact=persisted.artifact,
            artifact_uid=persisted.artifact_uid,
            features=request.features,
            **pending.fields,
        )
        if event.kind == "checkpoint":
            self._saved[original] = event
        self.last[event.kind] = event
        self.last_event = event
        log.info("Persisted %s %s at %s", event.kind, event.key, storage_uri)
        self.bus.broadcast("lamin_lightning_artifact_saved", event)
        self.stager.release(request.local_path, original)
        return event

    def remove(self, path: Path, ranking: dict[str, CheckpointRank]) -> None:
        """Mirror an eviction in the persister and broadcast it.

        Args:
            path: the evicted file, as Lightning wrote it.
            ranking: the other checkpoints whose standing changed with it.

        Raises:
            PersistError: if the persister failed to delete the record.
        """
        saved = self._saved.pop(path, None)
        if saved is None:
            return  # its save failed, and that error was raised on its own
        removed = ArtifactRemovedEvent(
            **saved.model_dump(
                include={"callback_id", "run_uid", "kind", "key", "local_path"}
            ),
            storage_uri=saved.storage_uri,
            artifact=saved.artifact,
            artifact_uid=saved.artifact_uid,
            epoch=saved.epoch,
            global_step=saved.global_step,
            ranking=ranking,
        )
        self.bus.delete(removed)
        self.last_event = removed
        log.info("Removed evicted checkpoint %s", removed.key)
        self.bus.broadcast("lamin_lightning_artifact_removed", removed)
