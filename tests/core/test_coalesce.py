"""A checkpoint evicted before the worker reached it is skipped, ranks intact."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

import lamin_lightning_core as ll
from lamin_lightning_core._journal import read
from lamin_lightning_core._staging import STAGING_DIRNAME
from tests.helpers import fit

LOCAL_ONLY = ["lamindb", "wandb", "mlflow", "clearml", "recorder"]
RANKS = ("model_rank", "is_best_model", "is_last_model")
SCORES = [5, 3, 4, 1, 2, 6, 0.5, 7, 2.5, 1.5, 0.2, 9]


class StandingsPersister:
    """Keeps the rank and flags of each stored checkpoint, as a persister with
    features does; each call takes ``delay`` seconds, so the worker lags."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.standings: dict[str, dict[str, Any]] = {}
        self.persisted: list[str] = []
        self.deleted: list[str] = []

    @ll.hookimpl(tryfirst=True)
    def lamin_lightning_persist_artifact(
        self, request: ll.PersistRequest
    ) -> ll.PersistedArtifact:
        time.sleep(self.delay)
        if request.kind == "checkpoint":
            self.persisted.append(request.key)
            self.standings[request.key] = {n: request.auto_features[n] for n in RANKS}
            self._rerank(request.ranking)
        return ll.PersistedArtifact(storage_uri=f"memory://{request.key}")

    @ll.hookimpl(tryfirst=True)
    def lamin_lightning_delete_artifact(self, event: ll.ArtifactRemovedEvent) -> bool:
        time.sleep(self.delay)
        self.deleted.append(event.key)
        del self.standings[event.key]
        self._rerank(event.ranking)
        return True

    def _rerank(self, ranking: dict[str, ll.CheckpointRank]) -> None:
        for key, standing in ranking.items():
            if key in self.standings:
                self.standings[key] = standing.model_dump()


class Events:
    def __init__(self) -> None:
        self.log: list[tuple[str, str]] = []

    @ll.hookimpl
    def lamin_lightning_artifact_saved(self, event: ll.ArtifactSavedEvent) -> None:
        self.log.append(("saved", event.key))

    @ll.hookimpl
    def lamin_lightning_artifact_removed(self, event: ll.ArtifactRemovedEvent) -> None:
        self.log.append(("removed", event.key))


def run(
    root: Path, *, coalesce: bool, mode: str, top_k: int, scores: list[float] = SCORES
) -> Any:
    persister, events = StandingsPersister(delay=0.03), Events()
    checkpoint = ll.Checkpoint(
        monitor="score",
        mode=mode,
        save_top_k=top_k,
        every_n_train_steps=1,
        plugins=[persister, events],
        disable_plugins=LOCAL_ONLY,
        coalesce=coalesce,
    )
    fit([checkpoint], root, steps=len(scores), scores=scores)
    kept = {f"checkpoints/{p.name}" for p in Path(checkpoint.dirpath).glob("*.ckpt")}
    return checkpoint, persister, events, kept


@pytest.mark.parametrize(("mode", "top_k"), [("min", 1), ("min", 3), ("max", 2)])
def test_an_evicted_waiting_save_is_skipped_and_ranks_stay_right(
    tmp_path: Path, mode: str, top_k: int
) -> None:
    _, every, _, kept = run(tmp_path / "every", coalesce=False, mode=mode, top_k=top_k)
    checkpoint, skipping, events, kept_too = run(
        tmp_path / "skip", coalesce=True, mode=mode, top_k=top_k
    )

    assert kept_too == kept and set(skipping.standings) == kept
    assert skipping.standings == every.standings  # the same ranks and flags
    assert len(skipping.persisted) < len(every.persisted)
    assert len(skipping.deleted) == len(skipping.persisted) - len(kept)
    saved = [key for kind, key in events.log if kind == "saved"]
    removed = [key for kind, key in events.log if kind == "removed"]
    assert saved == skipping.persisted  # nothing announced twice
    assert removed == skipping.deleted
    for key in removed:
        assert events.log.index(("saved", key)) < events.log.index(("removed", key))
    assert not list(tmp_path.rglob(STAGING_DIRNAME))
    assert checkpoint.journal_path is not None
    assert all(entry.complete for entry in read(checkpoint.journal_path))


def test_rank_changes_of_a_skipped_save_reach_the_checkpoints_it_demoted(
    tmp_path: Path,
) -> None:
    # step 1 stays the best; step 2 took "last" from it and was then evicted
    # (by step 3) before the worker, busy with step 1, got to it.
    _, skipping, _, kept = run(
        tmp_path, coalesce=True, mode="min", top_k=2, scores=[1, 5, 4, 3, 2]
    )

    assert "checkpoints/epoch=0-step=2.ckpt" not in skipping.persisted
    assert set(skipping.standings) == kept
    assert skipping.standings == {
        "checkpoints/epoch=0-step=1.ckpt": {
            "model_rank": 0,
            "is_best_model": True,
            "is_last_model": False,
        },
        "checkpoints/epoch=0-step=5.ckpt": {
            "model_rank": 1,
            "is_best_model": False,
            "is_last_model": True,
        },
    }


def test_coalescing_without_a_background_worker_warns() -> None:
    with pytest.warns(ll.LaminLightningWarning, match="no effect with asynchronous"):
        ll.Checkpoint(asynchronous=False, coalesce=True, disable_plugins=LOCAL_ONLY)
