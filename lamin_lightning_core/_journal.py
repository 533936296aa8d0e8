"""The journal: a durable outbox of what a callback has to deliver.

Every save and removal is appended here before anything is persisted or
announced, then marked as persisted (or deleted) and as delivered to each
tracked plugin. One JSON object a line, in a file per fit beside the
checkpoint folder ``<parent>/<folder>``, as
``<parent>/.lamin-lightning-journal/<folder>/<stamp>-<run>.jsonl``. So a
crash, an outage or a fixed plugin loses nothing: :func:`replay` delivers
exactly what is missing, in order, and appends its own marks, so a second
replay finds nothing to do.

Each line is flushed to the operating system as it is written: the journal
survives the training process being killed, not a power cut.

Records (``op``):

* ``save``: a file to persist (the persist request, Lightning's path, the
  event fields taken at save time); ``remove``: an eviction of save ``save``;
* ``persisting``: the persister was called for a save. A save with this
  mark and no ``persisted`` one may be persisted without the journal knowing
  (the process died in between); replay settles it;
* ``settled``: replay made sure that such a save, evicted since, left no
  record behind;
* ``persisted`` / ``deleted``: the persister did its part; carries the event
  (without the live record) and the tracked plugins it is due to;
* ``delivered`` / ``failed``: one tracked plugin handled the event, or not.

Tracked plugins are those a later process can load again: entry-point
plugins and plugin objects passed to ``Checkpoint(plugins=...)``. Observers
and subclass hooks live in the training process only and are not journaled.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator

log = logging.getLogger(__name__)

JOURNAL_DIRNAME = ".lamin-lightning-journal"
"""Folder next to a callback's checkpoints that holds its journals."""


class Journal:
    """Append records to one journal file; thread-safe.

    Records written before :meth:`open` (the LightningCLI config is saved
    before the checkpoint folder is known) wait in memory and are written
    first once the file is open.
    """

    def __init__(self) -> None:
        self.path: Path | None = None
        self._lock = threading.Lock()
        self._stream: IO[str] | None = None
        self._buffer: list[str] = []
        self._seq = 0

    def open(self, directory: Path, run_uid: str | None) -> Path:
        """Start the journal file of a fit in ``directory``.

        Raises:
            OSError: if the folder cannot be created or written, naming it.
        """
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%f")
        path = directory / f"{stamp}-{run_uid or 'untracked'}.jsonl"
        try:
            directory.mkdir(parents=True, exist_ok=True)
            stream = open(path, "a", encoding="utf-8")  # noqa: SIM115
        except OSError as error:
            raise OSError(
                error.errno,
                f"Cannot write the lamin-lightning journal in {directory}: "
                f"{error.strerror}. Make the checkpoint folder writable or "
                "pick another dirpath.",
            ) from error
        _try_lock(stream)  # a new file: no one else holds it
        with self._lock:
            self._close_locked()
            self.path, self._stream = path, stream
            for line in self._buffer:
                stream.write(line)
            self._buffer.clear()
            stream.flush()
        return path

    @classmethod
    def reopen(cls, path: Path) -> Journal | None:
        """Append to an existing journal file (to mark what a replay did).

        Returns:
            ``None`` if the file is in use: its fit is still running (in this
            process or another), or another replay has it.
        """
        stream = open(path, "a", encoding="utf-8")  # noqa: SIM115
        if not _try_lock(stream):
            stream.close()
            return None
        journal = cls()
        journal.path, journal._stream = path, stream
        entries = read(path)
        journal._seq = max((e.seq for e in entries), default=0)
        return journal

    def next_seq(self) -> int:
        with self._lock:
            self._seq += 1
            return self._seq

    def write(self, op: str, seq: int, **data: Any) -> None:
        """Append one record; ``data`` must be JSON-serialisable."""
        line = json.dumps({"op": op, "seq": seq, **data}, default=str) + "\n"
        with self._lock:
            if self._stream is None:
                self._buffer.append(line)
                return
            self._stream.write(line)
            self._stream.flush()

    def close(self) -> None:
        with self._lock:
            self._close_locked()

    def _close_locked(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None


def _try_lock(stream: IO[str]) -> bool:
    # An exclusive advisory lock for as long as the file is open: a running
    # fit holds its journal, so that no replay (a second fit in the same
    # folder, `lamin-lightning replay`) delivers its events behind its back.
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; replay a finished fit
        return True
    try:
        fcntl.flock(stream.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


@dataclass
class Entry:
    """A save or removal as the journal tells it, folded from its records."""

    seq: int
    op: str
    record: dict[str, Any]
    done: dict[str, Any] | None = None
    delivered: set[str] = field(default_factory=set)
    failed: dict[str, str] = field(default_factory=dict)
    evicted: bool = False
    void: bool = False
    """A removal of a file that was never persisted: nothing to undo."""
    attempted: bool = False
    """The persister was called for this save; it may hold a record of it."""
    settled: bool = False

    @property
    def missing(self) -> list[str]:
        """Tracked plugins that have not handled this entry's event yet."""
        if self.done is None:
            return []
        return [p for p in self.done.get("targets", []) if p not in self.delivered]

    @property
    def staged_left(self) -> bool:
        """A save whose staged name (not Lightning's own) is still on disk."""
        if self.op != "save":
            return False
        staged = Path(self.record["request"]["local_path"])
        return staged != Path(self.record["original"]) and staged.exists()

    @property
    def complete(self) -> bool:
        if self.op == "save" and self.done is None:
            # Evicted before it was persisted: nothing is due, unless the
            # persister may have saved it unmarked and that record must go.
            return self.evicted and (self.settled or not self.attempted)
        if self.op == "remove" and self.done is None:
            return self.void
        return not self.missing


def read(path: Path) -> list[Entry]:
    """Fold a journal file into its entries, in order.

    A line that is not a JSON object (the last line of a killed process may
    be cut short) is skipped with a warning; the rest is still read.
    """
    entries: dict[int, Entry] = {}
    for number, record in _records(path):
        op, seq = record.get("op"), record.get("seq")
        if op in ("save", "remove") and isinstance(seq, int):
            entries[seq] = Entry(seq, op, record)
            if op == "remove" and record.get("save") in entries:
                entries[record["save"]].evicted = True
            continue
        entry = entries.get(seq) if isinstance(seq, int) else None
        if entry is None:
            log.warning("%s:%d: a %r mark of no known entry; ignored", path, number, op)
        elif op in ("persisted", "deleted"):
            entry.done = record
        elif op == "persisting":
            entry.attempted = True
        elif op == "settled":
            entry.settled = True
        elif op == "delivered":
            entry.delivered.add(str(record.get("plugin")))
            entry.failed.pop(str(record.get("plugin")), None)
        elif op == "failed":
            entry.failed[str(record.get("plugin"))] = str(record.get("error"))
        else:
            log.warning("%s:%d: unknown journal record %r; ignored", path, number, op)
    for entry in entries.values():
        if entry.op == "remove":
            save = entries.get(entry.record.get("save"))  # type: ignore[arg-type]
            entry.void = save is None or save.done is None
    return [entries[seq] for seq in sorted(entries)]


def _records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    with open(path, encoding="utf-8", errors="replace") as stream:
        for number, line in enumerate(stream, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if not isinstance(record, dict):
                log.warning(
                    "%s:%d: not a journal record (cut short or corrupt); skipped",
                    path,
                    number,
                )
                continue
            yield number, record


def journal_dir(checkpoint_dir: Path) -> Path:
    """Where the journals of the checkpoints in ``checkpoint_dir`` are kept.

    Beside the folder, not in it: Lightning warns about a checkpoint folder
    that is not empty, and a resume would set that off.
    """
    checkpoint_dir = checkpoint_dir.absolute()
    return checkpoint_dir.parent / JOURNAL_DIRNAME / checkpoint_dir.name


def find_journals(root: Path) -> list[Path]:
    """Journal files below ``root`` (a checkpoint folder or above), oldest first."""
    if root.is_file():
        return [root] if JOURNAL_DIRNAME in root.absolute().parts else []
    if JOURNAL_DIRNAME in root.absolute().parts:
        found = set(root.rglob("*.jsonl"))
    else:  # below root, and beside it if it is a checkpoint folder
        found = set(root.rglob(f"{JOURNAL_DIRNAME}/**/*.jsonl"))
        found.update(journal_dir(root).glob("*.jsonl"))
    return sorted(found, key=lambda p: (p.parent, p.name))


def pending(paths: Iterable[Path]) -> dict[Path, list[Entry]]:
    """The incomplete entries of each journal that has work left: entries to
    complete, or staged files that a killed fit did not release."""
    result = {}
    for path in paths:
        entries = read(path)
        incomplete = [e for e in entries if not e.complete]
        if incomplete or any(e.staged_left for e in entries):
            result[path] = incomplete
    return result
