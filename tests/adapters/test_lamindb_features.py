"""Features on the real instance: invariants after every save and eviction."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from statistics import median
from types import ModuleType
from typing import Any

import pytest
from django.db import connection

import lamin_lightning_core as ll
from lamin_lightning_adapters._lamindb_features import FEATURE_TYPE
from lamin_lightning_core._journal import read
from tests.helpers import ScriptedModule, fit, loader

REGISTRARS = ["wandb", "mlflow", "clearml"]
NAN = math.nan


@pytest.fixture(scope="module")
def auto_features(ln: ModuleType) -> None:
    ll.save_lightning_features()


def stored_features(ln: ModuleType, keys: list[str]) -> dict[str, dict[str, Any]]:
    """Read the auto-feature values of artifacts straight from the database."""
    from lamindb.models import ArtifactJsonValue

    rows = ArtifactJsonValue.objects.filter(
        artifact__key__in=keys, jsonvalue__feature__type__name=FEATURE_TYPE
    ).values_list("artifact__key", "jsonvalue__feature__name", "jsonvalue__value")
    values: dict[str, dict[str, Any]] = defaultdict(dict)
    for key, name, value in rows:
        assert name not in values[key], f"{key} has two {name} values"
        values[key][name] = value
    return dict(values)


class InvariantChecker:
    """After every saved/removed event, check the database for the prefix."""

    def __init__(self, ln: ModuleType, mode: str) -> None:
        self.ln, self.mode = ln, mode
        self.kept: dict[str, tuple[float, int]] = {}
        self.checks = 0
        self.order = 0

    def on_artifact_saved(self, event: ll.ArtifactSavedEvent) -> None:
        if event.kind == "checkpoint":
            self.order += 1
            score = math.nan if event.score is None else event.score
            self.kept[event.key] = (score, self.order)
            self.check()

    def on_artifact_removed(self, event: ll.ArtifactRemovedEvent) -> None:
        del self.kept[event.key]
        self.check()

    def expected_order(self) -> list[str]:
        def rank_key(key: str) -> tuple[bool, float, int]:
            score, order = self.kept[key]
            if math.isnan(score):
                return (True, 0.0, order)
            return (False, score if self.mode == "min" else -score, order)

        return sorted(self.kept, key=rank_key)

    def check(self) -> None:
        stored = stored_features(self.ln, list(self.kept))
        assert set(stored) == set(self.kept)
        best = [k for k, v in stored.items() if v["is_best_model"]]
        last = [k for k, v in stored.items() if v["is_last_model"]]
        newest = max(self.kept, key=lambda k: self.kept[k][1])
        by_rank = sorted(stored, key=lambda k: stored[k]["model_rank"])
        assert best == [self.expected_order()[0]]
        assert last == [newest]
        assert by_rank == self.expected_order()
        assert sorted(v["model_rank"] for v in stored.values()) == list(
            range(len(stored))
        )
        self.checks += 1


SCORES = {
    "improving": [5, 4, 3, 2, 1, 0.5],
    "worsening": [1, 2, 3, 4, 5, 6],
    "equal": [2, 2, 2, 2, 2, 2],
    "nan": [3, NAN, 1, NAN, 2, 0],
}


@pytest.mark.parametrize("top_k", [1, 3, -1], ids=["top1", "top3", "all"])
@pytest.mark.parametrize("mode", ["min", "max"])
@pytest.mark.parametrize("scores", list(SCORES.values()), ids=list(SCORES))
def test_one_best_one_last_and_dense_ranks_after_every_change(
    ln: ModuleType,
    auto_features: None,
    tracked_run: Any,
    tmp_path: Path,
    top_k: int,
    mode: str,
    scores: list[float],
) -> None:
    checker = InvariantChecker(ln, mode)
    checkpoint = ll.Checkpoint(
        monitor="score",
        mode=mode,
        save_top_k=top_k,
        every_n_train_steps=1,
        artifact_observers=[checker],
        disable_plugins=REGISTRARS,
    )
    fit([checkpoint], tmp_path, steps=len(scores), scores=scores)
    assert checker.checks >= 1
    kept = ln.Artifact.filter(run=tracked_run, kind="model").count()
    assert kept == len(checker.kept)
    if top_k == -1:
        assert kept == len(scores)


def test_two_callbacks_keep_separate_rankings(
    ln: ModuleType, auto_features: None, tracked_run: Any, tmp_path: Path
) -> None:
    low, high = InvariantChecker(ln, "min"), InvariantChecker(ln, "max")
    first = ll.Checkpoint(
        monitor="score",
        mode="min",
        save_top_k=-1,
        every_n_train_steps=1,
        dirpath=tmp_path / "low",
        artifact_observers=[low],
        disable_plugins=REGISTRARS,
    )
    second = ll.Checkpoint(
        monitor="score",
        mode="max",
        save_top_k=2,
        every_n_train_steps=1,
        dirpath=tmp_path / "high",
        artifact_observers=[high],
        disable_plugins=REGISTRARS,
    )
    os.chdir(tmp_path)
    fit([first, second], tmp_path, steps=4, scores=[2, 1, 3, 0])
    assert first.checkpoint_key_prefix != second.checkpoint_key_prefix
    assert low.checks == 4 and high.checks >= 4


def test_user_features_and_auto_features_side_by_side(
    ln: ModuleType, auto_features: None, tracked_run: Any, tmp_path: Path
) -> None:
    # the user's own "score"; type=None keeps lamindb from returning ours
    ln.Feature(name="score", dtype=float, type=None).save()
    ln.Feature(name="dataset_version", dtype=str).save()
    ln.Feature(name="training_framework", dtype=str).save()
    ln.Feature(name="lr", dtype=float).save()  # a model hyperparameter
    checkpoint = ll.Checkpoint(
        monitor="score",
        features={
            "run": {"training_framework": "lightning"},
            "artifact": {
                "dataset_version": "2026-03",
                "score": None,
                "max_steps": None,
            },
        },
        disable_plugins=REGISTRARS,
    )
    ln.Feature(name="max_steps", dtype=int, type=None).save()
    fit([checkpoint], tmp_path, steps=2, scores=[0.25])

    artifact = checkpoint.last_checkpoint_artifact
    values = artifact.features.get_values()
    assert values["dataset_version"] == "2026-03"
    assert values["max_steps"] == 2
    assert values["is_best_model"] is True
    from lamindb.models import ArtifactJsonValue

    scores = ArtifactJsonValue.objects.filter(
        artifact=artifact, jsonvalue__feature__name="score"
    ).values_list("jsonvalue__feature__type__name", "jsonvalue__value")
    assert sorted(scores, key=str) == sorted(
        [(FEATURE_TYPE, 0.25), (None, 0.25)], key=str
    )
    run_values = tracked_run.features.get_values()
    assert run_values["training_framework"] == "lightning"
    assert run_values["lr"] == 0.01
    assert run_values["max_steps"] == 2
    assert run_values["monitor"] == "score"
    assert checkpoint.last_event("checkpoint").features == {  # type: ignore[union-attr]
        "dataset_version": "2026-03",
        "score": 0.25,
        "max_steps": 2,
    }


def test_missing_features_are_listed_before_training(
    ln: ModuleType, tracked_run: Any, tmp_path: Path
) -> None:
    checkpoint = ll.Checkpoint(
        features={"run": {"nope_a": 1}, "artifact": {"nope_b": "x", "nope_c": None}},
        disable_plugins=REGISTRARS,
    )
    with pytest.raises(ll.LaminLightningError) as error:
        fit([checkpoint], tmp_path, steps=2)
    message = str(error.value)
    assert "nope_a, nope_b, nope_c" in message
    assert "ln.Feature(name='nope_a', dtype=int).save()" in message
    assert not list(tmp_path.rglob("*.ckpt"))


def test_feature_with_the_wrong_dtype_fails_before_training(
    ln: ModuleType, tracked_run: Any, tmp_path: Path
) -> None:
    ln.Feature(name="n_layers", dtype=int).save()
    checkpoint = ll.Checkpoint(
        features={"artifact": {"n_layers": "three"}}, disable_plugins=REGISTRARS
    )
    with pytest.raises(ll.LaminLightningError, match=r"'n_layers' has dtype 'int'"):
        fit([checkpoint], tmp_path, steps=1)
    assert not list(tmp_path.rglob("*.ckpt"))


class QueryCounter:
    """Counts SQL statements between consecutive saved checkpoints."""

    def __init__(self) -> None:
        self.current = 0
        self.per_save: list[int] = []

    def __call__(
        self, execute: Any, sql: str, params: Any, many: bool, ctx: Any
    ) -> Any:
        self.current += 1
        return execute(sql, params, many, ctx)

    def on_artifact_saved(self, event: ll.ArtifactSavedEvent) -> None:
        if event.kind == "checkpoint":
            self.per_save.append(self.current)
            self.current = 0


def count_queries_per_save(
    tmp_path: Path, steps: int, offset: float, **hparams: float
) -> list[int]:
    import lightning.pytorch as pl

    counter = QueryCounter()
    checkpoint = ll.Checkpoint(
        dirpath=tmp_path,  # keys of the two fits in one run must not collide
        monitor="score",
        save_top_k=-1,
        every_n_train_steps=1,
        artifact_observers=[counter],
        disable_plugins=REGISTRARS,
    )

    class WithHparams(ScriptedModule):
        def __init__(self, **kwargs: float) -> None:
            # distinct, improving scores: every save adds a new score value
            super().__init__(scores=[offset + steps - i for i in range(steps)])
            self.save_hyperparameters(kwargs)

    trainer = pl.Trainer(
        default_root_dir=tmp_path,
        max_steps=steps,
        callbacks=[checkpoint],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with connection.execute_wrapper(counter):
        trainer.fit(WithHparams(**hparams), loader(n=4 * steps))
    return counter.per_save


def test_queries_per_save_do_not_grow_with_checkpoints_or_hparams(
    ln: ModuleType, auto_features: None, tracked_run: Any, tmp_path: Path
) -> None:
    names = [f"hp_{i}" for i in range(40)]
    for name in names:
        ln.Feature(name=name, dtype=float).save()
    few = count_queries_per_save(tmp_path / "a", 12, 1000, hp_0=1.0, hp_1=2.0)
    many = count_queries_per_save(tmp_path / "b", 40, 2000, **{n: 1.0 for n in names})
    # Compare saves that each create a new score and a new model_rank value
    # (earlier tests and the first fit created the lower ranks already).
    # lamindb itself adds a query now and then; medians must not move.
    assert median(few[8:]) == median(many[12:20]) == median(many[-8:]), (few, many)
    assert max(many[12:]) <= max(few[8:]) + 2, (few, many)
    assert tracked_run.features.get_values()["hp_39"] == 1.0


@pytest.mark.slow
def test_save_lightning_features_is_idempotent_across_processes(
    tmp_path: Path,
) -> None:
    settings = os.environ["LAMIN_SETTINGS_DIR"]
    name = f"ll-race-{os.getpid()}"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "lamin_cli",
            "init",
            "--storage",
            str(tmp_path / "store"),
            "--name",
            name,
        ],
        check=True,
        capture_output=True,
        cwd=tmp_path,
    )
    env = {
        **os.environ,
        "LAMIN_SETTINGS_DIR": settings,
        "LAMIN_CURRENT_INSTANCE": f"anonymous/{name}",
    }
    code = (
        "import lamin_lightning_core as ll; ll.save_lightning_features(); "
        "ll.save_lightning_features(); import lamindb as ln; "
        f"print(ln.Feature.filter(type__name={FEATURE_TYPE!r}).count())"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=120) for p in procs]
    for proc, (out, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err
        assert out.strip().splitlines()[-1] == "20"


class EndStateChecker(InvariantChecker):
    """Tracks events like its parent, but checks only when asked."""

    def check(self) -> None:
        pass


def test_coalescing_skips_evicted_saves_and_ends_with_exact_ranks(
    ln: ModuleType, auto_features: None, tracked_run: Any, tmp_path: Path
) -> None:
    class SlowRegistrar:  # the worker falls behind the training loop
        @ll.hookimpl
        def lamin_lightning_artifact_saved(self, event: ll.ArtifactSavedEvent) -> None:
            time.sleep(0.05)

    checker = EndStateChecker(ln, "min")
    checkpoint = ll.Checkpoint(
        monitor="score",
        save_top_k=2,
        every_n_train_steps=1,
        artifact_observers=[checker],
        plugins=[SlowRegistrar()],
        disable_plugins=REGISTRARS,
        coalesce=True,
    )
    fit([checkpoint], tmp_path, steps=8, scores=[1, 5, 4, 3, 2, 6, 0.5, 7])

    InvariantChecker.check(checker)
    kept = {p.name for p in Path(checkpoint.dirpath).glob("*.ckpt")}
    stored = ln.Artifact.filter(run=tracked_run, kind="model")
    assert {a.key.rsplit("/", 1)[1] for a in stored} == kept
    assert checkpoint.journal_path is not None
    saves = [e for e in read(checkpoint.journal_path) if e.op == "save"]
    assert checker.order < len(saves)  # some were never persisted


def test_replay_annotates_the_checkpoints_it_persists(
    ln: ModuleType,
    auto_features: None,
    tracked_run: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Found by a new user: checkpoints that `lamin-lightning replay` persisted
    # had no score, rank or flags, so best_checkpoint() found none.
    import lamin_lightning_adapters.lamindb as persister

    class Unreachable:
        @ll.hookimpl(tryfirst=True)
        def lamin_lightning_persist_artifact(self, request: Any) -> Any:
            raise ConnectionError("instance unreachable")

    checkpoint = ll.Checkpoint(
        monitor="score",
        save_top_k=2,
        every_n_train_steps=1,
        plugins=[Unreachable()],
        disable_plugins=REGISTRARS,
        retry=ll.Retry(attempts=1),
    )
    fit([checkpoint], tmp_path, steps=4, scores=[4, 3, 2, 1])
    assert len(checkpoint.persist_failures) == 4
    monkeypatch.setattr(persister, "_writers", {})  # as in a new process

    (report,) = ll.replay(tmp_path, disable=REGISTRARS)

    assert report.ok and report.persisted == 2
    prefix = checkpoint.checkpoint_key_prefix
    third, fourth = (f"{prefix}/epoch=0-step={n}.ckpt" for n in (3, 4))
    stored = stored_features(ln, [third, fourth])
    assert stored[fourth] == {
        "score": 1,
        "model_rank": 0,
        "is_best_model": True,
        "is_last_model": True,
        "mode": "min",
        "monitor": "score",
        "save_weights_only": False,
    }
    assert (stored[third]["model_rank"], stored[third]["is_last_model"]) == (1, False)
    assert ll.best_checkpoint(tracked_run).key == fourth
