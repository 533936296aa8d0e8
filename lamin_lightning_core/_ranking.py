"""Rank and flag the kept checkpoints of one callback, in memory.

After every save and every eviction, exactly one checkpoint is the best (by
``mode``; ties go to the earliest; NaN or missing scores rank last), exactly
one is the last (the newest), and ``model_rank`` runs 0..n-1 by score. Only
the checkpoints whose standing changed are reported, so a persister writes
what changed and nothing else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from lamin_lightning_core._events import CheckpointRank


@dataclass(frozen=True)
class _Entry:
    score: float | None
    order: int


class Ranking:
    """The standing of every kept checkpoint of one callback.

    Args:
        mode: ``"min"`` if lower scores are better, ``"max"`` otherwise.
    """

    def __init__(self, mode: Literal["min", "max"]) -> None:
        self.mode = mode
        self._entries: dict[str, _Entry] = {}
        self._standing: dict[str, CheckpointRank] = {}
        self._order = 0

    def __len__(self) -> int:
        return len(self._entries)

    def standing(self, key: str) -> CheckpointRank | None:
        return self._standing.get(key)

    def add(self, key: str, score: float | None) -> dict[str, CheckpointRank]:
        """Record a saved (or re-saved) checkpoint; return what changed."""
        if score is not None and math.isnan(score):
            score = None
        self._order += 1
        self._entries[key] = _Entry(score, self._order)
        return self._update()

    def remove(self, key: str) -> dict[str, CheckpointRank]:
        """Forget an evicted checkpoint; return what changed for the others."""
        self._entries.pop(key, None)
        self._standing.pop(key, None)
        return self._update()

    def _sort_key(self, item: tuple[str, _Entry]) -> tuple[bool, float, int]:
        entry = item[1]
        if entry.score is None:
            return (True, 0.0, entry.order)
        score = entry.score if self.mode == "min" else -entry.score
        return (False, score, entry.order)

    def _update(self) -> dict[str, CheckpointRank]:
        if not self._entries:
            return {}
        ranked = sorted(self._entries.items(), key=self._sort_key)
        newest = max(self._entries.items(), key=lambda item: item[1].order)[0]
        changed = {}
        for rank, (key, _) in enumerate(ranked):
            standing = CheckpointRank(
                model_rank=rank, is_best_model=rank == 0, is_last_model=key == newest
            )
            if self._standing.get(key) != standing:
                self._standing[key] = standing
                changed[key] = standing
        return changed
