"""Saves and removals queued for the worker, and evictions that cancel saves.

When training saves faster than the backend persists, top-k eviction often
deletes a checkpoint whose save is still waiting in the queue. Persisting it
and deleting it again a moment later changes nothing in the end, at the
price of two backend round trips (a LaminDB delete alone is about 30
queries). :meth:`Waiting.cancel` drops such a save instead: neither it nor
its removal reaches a plugin.

The rank changes that the dropped save and its removal carried are not lost:
each is folded into the queued job that would have run right after it, so
the persister ends with the same ``model_rank``, ``is_best_model`` and
``is_last_model`` values as without the shortcut. Rank changes are
standings (not increments), so a later value simply replaces an earlier one.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import TYPE_CHECKING, Union, cast

if TYPE_CHECKING:
    from lamin_lightning_core._delivery import PendingSave
    from lamin_lightning_core._events import CheckpointRank

Ranking = dict[str, "CheckpointRank"]
_Work = Union["PendingSave", Ranking]
"""A waiting save, or the rank changes of a waiting removal."""


class Waiting:
    """Jobs of one callback that the worker has not started, by journal seq."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._work: dict[int, _Work] = {}
        self._cancelled: set[int] = set()

    def add_save(self, pending: PendingSave) -> None:
        """Register a save before its job is queued (training thread)."""
        with self._lock:
            self._work[pending.seq] = pending

    def add_removal(self, seq: int, ranking: Ranking) -> None:
        """Register a removal before its job is queued (training thread)."""
        with self._lock:
            self._work[seq] = dict(ranking)

    def start_save(self, pending: PendingSave) -> PendingSave | None:
        """Take a save off the list as the worker starts it.

        Returns:
            The save with the rank changes folded into it since it was
            queued, or ``None`` if an eviction cancelled it.
        """
        with self._lock:
            if pending.seq in self._cancelled:
                self._cancelled.discard(pending.seq)
                return None
            return cast("PendingSave", self._work.pop(pending.seq, pending))

    def start_removal(self, seq: int, ranking: Ranking) -> Ranking:
        """Take a removal off the list as the worker starts it; its ranking."""
        with self._lock:
            return cast("Ranking", self._work.pop(seq, ranking))

    def cancel(self, save_seq: int, key: str, ranking: Ranking) -> bool:
        """Drop the save ``save_seq`` of ``key`` if the worker has not started it.

        Args:
            save_seq: the journal seq of the evicted checkpoint's save.
            key: its artifact key.
            ranking: the rank changes of its eviction.

        Returns:
            Whether the save was dropped; if not, the caller queues the
            removal as usual.
        """
        with self._lock:
            save = self._work.get(save_seq)
            if save is None or isinstance(save, dict):
                return False
            later = [s for s in self._work if s > save_seq and _ranked(self._work[s])]
            if not later:
                return False  # nothing queued to take its rank changes
            del self._work[save_seq]
            self._cancelled.add(save_seq)
            for seq, work in self._work.items():
                self._work[seq] = _without(work, key)
            # The save's own changes go to the job that would have run next,
            # whose own (newer) changes win; the eviction's to the newest job,
            # over whose changes they win, being newer still.
            own = {k: v for k, v in save.fields["ranking"].items() if k != key}
            self._work[later[0]] = _fold(self._work[later[0]], own, newer=False)
            self._work[later[-1]] = _fold(self._work[later[-1]], ranking, newer=True)
            return True


def _ranked(work: _Work) -> bool:
    # Config and hparams saves carry no ranking for the persister.
    return isinstance(work, dict) or work.request.kind == "checkpoint"


def _without(work: _Work, key: str) -> _Work:
    if isinstance(work, dict):
        work.pop(key, None)
        return work
    if key not in work.fields["ranking"]:
        return work
    ranking = {k: v for k, v in work.fields["ranking"].items() if k != key}
    return _with_ranking(work, ranking)


def _fold(work: _Work, changes: Ranking, *, newer: bool) -> _Work:
    if isinstance(work, dict):
        return {**work, **changes} if newer else {**changes, **work}
    current = work.fields["ranking"]
    merged = {**current, **changes} if newer else {**changes, **current}
    return _with_ranking(work, merged)


def _with_ranking(save: PendingSave, ranking: Ranking) -> PendingSave:
    # The save's own standing may have moved too: its annotations follow.
    key = save.request.key
    standing = ranking.get(key)
    update: dict[str, object] = {
        "ranking": {k: v for k, v in ranking.items() if k != key}
    }
    fields = {**save.fields, "ranking": ranking}
    if standing is not None and save.request.auto_features:
        update["auto_features"] = {
            **save.request.auto_features,
            **standing.model_dump(),
        }
        fields["is_best"] = standing.is_best_model
    request = save.request.model_copy(update=update)
    return dataclasses.replace(save, request=request, fields=fields)
