"""What the worker does with a save or a removal: persist, record, announce.

Everything here runs on the background thread of a
:class:`~lamin_lightning_core.Checkpoint` (inline with ``asynchronous=False``)
and only reads what the training thread captured at the moment of the save.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lamin_lightning_core._errors import PersistError
from lamin_lightning_core._events import (
    ArtifactRemovedEvent,
    ArtifactSavedEvent,
    CheckpointRank,
    PersistRequest,
)
from lamin_lightning_core._waiting import Waiting

if TYPE_CHECKING:
    from collections.abc import Callable
    from concurrent.futures import Future

    from lamin_lightning_core._bus import PluginBus
    from lamin_lightning_core._events import LifecycleEvent, PersistedArtifact
    from lamin_lightning_core._journal import Journal
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
        seq: its number in the journal.
    """

    request: PersistRequest
    original: Path
    fields: dict[str, Any]
    seq: int = 0

    def to_record(self) -> dict[str, Any]:
        """The journal's ``save`` record of this save (JSON types only)."""
        ranking = {k: v.model_dump() for k, v in self.fields["ranking"].items()}
        fields = {**self.fields, "ranking": ranking}
        return {
            "request": self.request.model_dump(mode="json"),
            "original": str(self.original),
            "fields": fields,
        }

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> PendingSave:
        """Rebuild a save from its journal record."""
        fields = dict(record["fields"])
        fields["ranking"] = {
            k: CheckpointRank.model_validate(v) for k, v in fields["ranking"].items()
        }
        return cls(
            PersistRequest.model_validate(record["request"]),
            Path(record["original"]),
            fields,
            record["seq"],
        )

    def event(self, persisted: PersistedArtifact) -> ArtifactSavedEvent:
        """The saved event of this file, as ``persisted`` stored it."""
        request = self.request
        local_path = self.original.resolve()
        storage_uri = persisted.storage_uri
        if storage_uri == request.local_path.resolve().as_uri():
            # A persister that keeps files where they are (the built-in one)
            # points at the staged name, which goes away: use Lightning's.
            storage_uri = local_path.as_uri()
        return ArtifactSavedEvent(
            callback_id=request.callback_id,
            run_uid=request.run_uid,
            kind=request.kind,
            key=request.key,
            local_path=local_path,
            storage_uri=storage_uri,
            artifact=persisted.artifact,
            artifact_uid=persisted.artifact_uid,
            features=request.features,
            **self.fields,
        )


class Delivery:
    """Persist staged files and announce them, in the order they come.

    Args:
        bus: the callback's plugin bus.
        stager: releases a staged file once its event is broadcast.
        journal: where each step is marked as done.
        cancellable: whether an eviction may cancel a save that waits in
            the worker's queue (``coalesce``, see :mod:`._waiting`).
    """

    def __init__(
        self,
        bus: PluginBus,
        stager: Stager,
        journal: Journal,
        cancellable: bool = False,
    ) -> None:
        self.bus = bus
        self.cancellable = cancellable
        self.stager = stager
        self.journal = journal
        self.last: dict[str, ArtifactSavedEvent] = {}
        self.last_event: ArtifactSavedEvent | ArtifactRemovedEvent | None = None
        self.persist_failures: list[PersistError] = []
        self.waiting = Waiting()
        self._saved: dict[Path, ArtifactSavedEvent] = {}

    def queue_save(
        self, pending: PendingSave, written: Future[Path] | None, strict: bool
    ) -> Callable[[], ArtifactSavedEvent | None]:
        """The worker's job for a save; registered as waiting until it runs."""
        if self.cancellable:
            self.waiting.add_save(pending)
        return functools.partial(self.save, pending, written, strict)

    def queue_removal(
        self, seq: int, path: Path, ranking: dict[str, CheckpointRank]
    ) -> Callable[[], None]:
        """The worker's job for a removal; registered as waiting until it runs."""
        if self.cancellable:
            self.waiting.add_removal(seq, ranking)
        return functools.partial(self.remove, seq, path, ranking)

    def save(
        self,
        pending: PendingSave,
        written: Future[Path] | None = None,
        strict: bool = True,
    ) -> ArtifactSavedEvent | None:
        """Persist, record and broadcast one file; release its staged name.

        Args:
            pending: the save, as the training thread took it.
            written: done once the file is complete and staged, for a file
                written in the background (``AsyncCheckpointIO``).
            strict: raise a persister failure instead of logging it.

        Returns:
            The event; ``None`` if the persister failed and not ``strict``, or
            if an eviction cancelled the save (see :mod:`._waiting`).

        Raises:
            PersistError: with ``strict``, if the persister failed; the
                staged file is kept either way.
        """
        current = self.waiting.start_save(pending)
        if written is not None:
            written.result()  # raises if the background write failed
        if current is None:
            # Evicted before its turn: nothing to persist, announce or delete.
            log.debug(
                "Skipped %s: evicted before it was persisted", pending.request.key
            )
            self.stager.release(pending.request.local_path, pending.original)
            return None
        try:
            return self._save(current)
        except PersistError as error:
            if strict:
                raise
            # Loud, and nothing lost: the file stays on disk and pending in
            # the journal, for `lamin-lightning replay` or the next fit.
            self.persist_failures.append(error)
            log.error(
                "%s Training goes on; the journal %s keeps it for "
                "`lamin-lightning replay` (or pass strict=True to stop).",
                error,
                self.journal.path,
            )
            return None

    def _save(self, pending: PendingSave) -> ArtifactSavedEvent:
        request, original = pending.request, pending.original
        self.journal.write("persisting", pending.seq)
        try:
            persisted = self.bus.persist(request)
        except PersistError as error:
            if request.local_path == original:
                raise
            # One error with the whole story, chained to the plugin's own.
            raise PersistError(
                f"{error} Lightning saved it as {original}; the staged file is "
                "kept, since top-k eviction may have deleted that one already."
            ) from error.__cause__
        event = pending.event(persisted)
        if event.kind == "checkpoint":
            self._saved[original] = event
        self.last[event.kind] = event
        self.last_event = event
        log.info("Persisted %s %s at %s", event.kind, event.key, event.storage_uri)
        announce(self.bus, self.journal, pending.seq, event, "persisted")
        self.stager.release(request.local_path, original)
        return event

    def remove(self, seq: int, path: Path, ranking: dict[str, CheckpointRank]) -> None:
        """Mirror an eviction in the persister and broadcast it.

        Args:
            seq: the removal's number in the journal.
            path: the evicted file, as Lightning wrote it.
            ranking: the other checkpoints whose standing changed with it.

        Raises:
            PersistError: if the persister failed to delete the record.
        """
        ranking = self.waiting.start_removal(seq, ranking)
        saved = self._saved.pop(path, None)
        if saved is None:
            return  # its save failed, and that error was raised on its own
        removed = removed_event(saved, ranking)
        self.bus.delete(removed)
        self.last_event = removed
        log.info("Removed evicted checkpoint %s", removed.key)
        announce(self.bus, self.journal, seq, removed, "deleted")


def removed_event(
    saved: ArtifactSavedEvent, ranking: dict[str, CheckpointRank]
) -> ArtifactRemovedEvent:
    """The removed event of a checkpoint that ``saved`` announced."""
    return ArtifactRemovedEvent(
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


def announce(
    bus: PluginBus,
    journal: Journal,
    seq: int,
    event: LifecycleEvent,
    done: str | None,
    only: list[str] | None = None,
) -> tuple[list[str], list[str]]:
    """Broadcast an artifact event and mark in the journal who handled it.

    Args:
        done: the journal mark of the persister's part (``persisted`` or
            ``deleted``) to write first, with the tracked plugins the event is
            due to; ``None`` if the journal has it already.
        only: the plugins to deliver to (a replay's missing ones); else all.

    Returns:
        The tracked plugins that handled the event, and those that failed.
    """
    hook = f"lamin_lightning_{event.event_type}"  # type: ignore[attr-defined]
    if done is not None:
        targets = bus.tracked_for(hook)
        journal.write(done, seq, event=event.model_dump(mode="json"), targets=targets)
    outcome = bus.deliver(hook, event, only)
    delivered = [p for p in outcome.delivered if p in bus.tracked]
    for plugin in delivered:
        journal.write("delivered", seq, plugin=plugin)
    failed = [p for p in outcome.failed if p in bus.tracked]
    for plugin in failed:
        journal.write("failed", seq, plugin=plugin, error=repr(outcome.failed[plugin]))
    return delivered, failed
