"""Replay: deliver what a journal says is still missing, once, in order.

Used by ``lamin-lightning replay`` and by a fit that starts where an earlier
one left journals with pending work (a crash, an outage, a failing plugin).
A save that was never persisted is persisted from its staged file (or from
Lightning's, if the staged one is gone); a persisted event is delivered to
the tracked plugins that have not handled it. Removals follow their saves.
Each step is marked in the same journal, so replaying twice does nothing the
second time.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from lamin_lightning_core import _journal
from lamin_lightning_core._delivery import PendingSave, announce, removed_event
from lamin_lightning_core._errors import PersistError
from lamin_lightning_core._events import (
    ArtifactRemovedEvent,
    ArtifactSavedEvent,
    CheckpointRank,
)
from lamin_lightning_core._staging import release

if TYPE_CHECKING:
    from collections.abc import Sequence

    from lamin_lightning_core._bus import PluginBus
    from lamin_lightning_core._events import LifecycleEvent
    from lamin_lightning_core._journal import Entry, Journal

log = logging.getLogger(__name__)


@dataclass
class ReplayReport:
    """What a replay of one journal did and could not do."""

    journal: Path
    persisted: int = 0
    deleted: int = 0
    delivered: int = 0
    failed: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    unreachable: Counter[str] = field(default_factory=Counter)

    @property
    def ok(self) -> bool:
        """Whether nothing is left to do (that this process could do)."""
        return not (self.failed or self.lost or self.unreachable)


def replay(
    root: str | os.PathLike[str],
    plugins: Sequence[object] = (),
    disable: Sequence[str] = (),
) -> list[ReplayReport]:
    """Deliver what the journals below ``root`` still miss, once, in order.

    What ``lamin-lightning replay`` does: saves that were never persisted
    are persisted, and each persisted event goes to the installed plugins
    (and ``plugins``) that have not handled it yet.

    Args:
        root: a journal file, a checkpoint folder, or any folder above them.
        plugins: plugin objects of the fit (``Checkpoint(plugins=...)``)
            that owe deliveries too.
        disable: installed plugins to leave out, by name.

    Returns:
        One report per journal that had pending work; empty if none had.
    """
    from lamin_lightning_core._bus import create_bus

    return replay_with(Path(root), create_bus(plugins=plugins, disable=disable))


def replay_with(root: Path, bus: PluginBus) -> list[ReplayReport]:
    """:func:`replay` with a bus of the caller's (a fit's own, on resume)."""
    reports = []
    for path in _journal.pending(_journal.find_journals(root)):
        report = replay_journal(path, bus)
        if report is not None:
            reports.append(report)
    return reports


def resume(directory: Path, bus: PluginBus) -> None:
    """Deliver what earlier fits left pending in a journal folder, with a
    fit's own bus, before it starts a journal there; log what stays."""
    if not directory.is_dir():
        return
    for report in replay_with(directory, bus):
        if not report.ok:
            log.warning("Still pending in %s: %s", report.journal, report)


def replay_journal(path: Path, bus: PluginBus) -> ReplayReport | None:
    """Deliver what one journal misses; append the marks to it.

    Returns:
        What it did, or ``None`` if the journal is in use (its fit is still
        running, or another replay has it): then nothing is done.
    """
    journal = _journal.Journal.reopen(path)
    if journal is None:
        log.info("Not replaying %s: its fit or another replay is using it", path)
        return None
    entries = _journal.read(path)
    saves = {e.seq: e for e in entries if e.op == "save"}
    report = ReplayReport(path)
    try:
        for entry in entries:
            if entry.op == "save" and (
                entry.complete or (entry.evicted and entry.done is None)
            ):
                # Its staged name is no longer needed; a killed fit left it.
                _release(PendingSave.from_record(entry.record))
            if entry.complete:
                continue
            if entry.op == "save" and entry.evicted and entry.done is None:
                _settle(entry, entries, bus, journal, report)
            elif entry.op == "save":
                _replay_save(entry, bus, journal, report)
            else:
                save = saves.get(entry.record["save"])
                _replay_remove(entry, save, bus, journal, report)
    finally:
        journal.close()
    log.info(
        "Replayed %s: %d persisted, %d deleted, %d deliveries, %d failed, %d lost",
        path,
        report.persisted,
        report.deleted,
        report.delivered,
        len(report.failed),
        len(report.lost),
    )
    return report


def _replay_save(
    entry: Entry, bus: PluginBus, journal: Journal, report: ReplayReport
) -> None:
    pending = PendingSave.from_record(entry.record)
    staged, original = pending.request.local_path, pending.original
    if entry.done is None:
        source = next((p for p in (staged, original) if p.exists()), None)
        if source is None:
            report.lost.append(
                f"{pending.request.key}: neither {staged} nor {original} exists"
            )
            return
        request = pending.request.model_copy(update={"local_path": source})
        journal.write("persisting", entry.seq)
        try:
            persisted = bus.persist(request)
        except PersistError as error:
            report.failed.append(f"{pending.request.key}: {error}")
            return
        event = PendingSave(request, original, pending.fields, entry.seq).event(
            persisted
        )
        report.persisted += 1
        delivered, failed = announce(bus, journal, entry.seq, event, "persisted")
    else:
        event = ArtifactSavedEvent.model_validate(entry.done["event"])
        delivered, failed = _deliver_missing(entry, event, bus, journal, report)
    report.delivered += len(delivered)
    report.failed.extend(f"{event.key}: plugin {p!r} failed" for p in failed)
    if not failed:
        _release(pending)


def _settle(
    entry: Entry,
    entries: list[Entry],
    bus: PluginBus,
    journal: Journal,
    report: ReplayReport,
) -> None:
    # The fit died between persisting this save and marking it, and Lightning
    # evicted the file since: delete what the persister may hold of it, by
    # key and run, unless a later save of the same key replaced it.
    request = PendingSave.from_record(entry.record).request
    later = any(
        e.record["request"]["key"] == request.key
        for e in entries
        if e.op == "save" and e.seq > entry.seq
    )
    if not later:
        eviction = next(
            e for e in entries if e.op == "remove" and e.record["save"] == entry.seq
        )
        removed = ArtifactRemovedEvent(
            ranking=_ranking(eviction),
            callback_id=request.callback_id,
            run_uid=request.run_uid,
            kind=request.kind,
            key=request.key,
            local_path=request.local_path,
            storage_uri=request.local_path.absolute().as_uri(),
        )
        if not _delete(removed, bus, report):
            return
    journal.write("settled", entry.seq)


def _replay_remove(
    entry: Entry,
    save: Entry | None,
    bus: PluginBus,
    journal: Journal,
    report: ReplayReport,
) -> None:
    if save is None or save.done is None:
        return  # never persisted: nothing to delete or announce
    saved = ArtifactSavedEvent.model_validate(save.done["event"])
    removed = removed_event(saved, _ranking(entry))
    if entry.done is None:
        if not _delete(removed, bus, report):
            return
        delivered, failed = announce(bus, journal, entry.seq, removed, "deleted")
    else:
        delivered, failed = _deliver_missing(entry, removed, bus, journal, report)
    report.delivered += len(delivered)
    report.failed.extend(f"{saved.key} (removal): plugin {p!r} failed" for p in failed)


def _delete(
    removed: ArtifactRemovedEvent, bus: PluginBus, report: ReplayReport
) -> bool:
    """Mirror a removal in the persister; whether it did."""
    try:
        bus.delete(removed)
    except PersistError as error:
        report.failed.append(f"{removed.key}: {error}")
        return False
    report.deleted += 1
    return True


def _ranking(removal: Entry) -> dict[str, CheckpointRank]:
    # The standings its eviction changed, as the fit journaled them.
    standings = removal.record.get("ranking", {})
    return {k: CheckpointRank.model_validate(v) for k, v in standings.items()}


def _deliver_missing(
    entry: Entry,
    event: LifecycleEvent,
    bus: PluginBus,
    journal: Journal,
    report: ReplayReport,
) -> tuple[list[str], list[str]]:
    here = [p for p in entry.missing if bus.manager.has_plugin(p)]
    for plugin in entry.missing:
        if plugin not in here:
            report.unreachable[plugin] += 1
    if not here:
        return [], []
    return announce(bus, journal, entry.seq, event, None, only=here)


def _release(pending: PendingSave) -> None:
    # The staged name of a file that needs it no more; its folder if empty.
    if pending.request.local_path.exists():
        release(pending.request.local_path, pending.original, prune=True)
