from __future__ import annotations

import math

import pytest

from lamin_lightning_core._ranking import Ranking


def standings(ranking: Ranking, keys: list[str]) -> list[tuple[int, bool, bool]]:
    result = []
    for key in keys:
        s = ranking.standing(key)
        assert s is not None
        result.append((s.model_rank, s.is_best_model, s.is_last_model))
    return result


def test_min_mode_ranks_by_score_ties_to_earliest_nan_last() -> None:
    ranking = Ranking("min")
    for key, score in [("a", 2.0), ("b", 1.0), ("c", math.nan), ("d", 1.0)]:
        ranking.add(key, score)
    assert standings(ranking, ["a", "b", "c", "d"]) == [
        (2, False, False),
        (0, True, False),
        (3, False, False),
        (1, False, True),
    ]


def test_max_mode_and_only_changes_are_reported() -> None:
    ranking = Ranking("max")
    assert set(ranking.add("a", 1.0)) == {"a"}
    changed = ranking.add("b", 0.5)
    assert set(changed) == {"a", "b"}  # a lost is_last_model
    assert changed["a"].is_best_model and not changed["a"].is_last_model
    changed = ranking.add("c", 0.7)
    assert set(changed) == {"b", "c"}  # b moved to rank 2, lost last
    assert changed["b"].model_rank == 2


def test_eviction_closes_the_gap() -> None:
    ranking = Ranking("min")
    for key, score in [("a", 3.0), ("b", 2.0), ("c", 1.0)]:
        ranking.add(key, score)
    changed = ranking.remove("c")
    assert changed["b"].is_best_model and changed["b"].is_last_model
    assert standings(ranking, ["a", "b"]) == [(1, False, False), (0, True, True)]
    assert ranking.standing("c") is None
    assert ranking.remove("a") == {}  # b keeps its standing
    assert ranking.remove("b") == {}
    assert len(ranking) == 0


@pytest.mark.parametrize("mode", ["min", "max"])
def test_all_nan_scores_still_have_one_best_and_one_last(mode: str) -> None:
    ranking = Ranking(mode)  # type: ignore[arg-type]
    for key in "abc":
        ranking.add(key, None)
    assert standings(ranking, list("abc")) == [
        (0, True, False),
        (1, False, False),
        (2, False, True),
    ]
