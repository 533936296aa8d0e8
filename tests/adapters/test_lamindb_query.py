"""Find, load and resume from persisted checkpoints (real LaminDB instance)."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

import lamin_lightning_core as ll
from tests.helpers import ScriptedModule, fit, loader

REGISTRARS = ["wandb", "mlflow", "clearml"]


@pytest.fixture(scope="module")
def auto_features(ln: ModuleType) -> None:
    ll.save_lightning_features()


def test_best_last_and_all_after_evictions(
    ln: ModuleType, auto_features: None, tracked_run: Any, tmp_path: Path
) -> None:
    checkpoint = ll.Checkpoint(
        monitor="score", save_top_k=2, every_n_train_steps=1, disable_plugins=REGISTRARS
    )
    fit([checkpoint], tmp_path, steps=5, scores=[3, 1, 4, 2, 5])

    records = ll.find_checkpoints(tracked_run)
    prefix = checkpoint.checkpoint_key_prefix
    assert [r.key for r in records] == [
        f"{prefix}/epoch=0-step=2.ckpt",
        f"{prefix}/epoch=0-step=4.ckpt",
    ]
    assert [r.model_rank for r in records] == [0, 1]
    assert [(r.epoch, r.global_step) for r in records] == [(0, 2), (0, 4)]
    best = ll.best_checkpoint(tracked_run.uid)
    assert best.key == checkpoint.key_for("checkpoint", checkpoint.best_model_path)
    assert best.score == 1.0 and best.mode == "min"
    assert ll.last_checkpoint(key_prefix=prefix).key.endswith("step=4.ckpt")
    assert ll.find_checkpoints(latest_run=True) == records


def test_epoch_and_step_come_from_the_save_not_the_file_name(
    ln: ModuleType, tracked_run: Any, tmp_path: Path
) -> None:
    # Found by a new user: `lamin-lightning ls` showed -/- for last.ckpt and
    # for any filename without epoch= and step= in it.
    checkpoint = ll.Checkpoint(
        every_n_train_steps=3,
        save_last=True,
        filename="weights",
        disable_plugins=REGISTRARS,
    )
    fit([checkpoint], tmp_path, steps=6)

    records = {r.key.rsplit("/", 1)[1]: r for r in ll.find_checkpoints(tracked_run)}
    assert {name: (r.epoch, r.global_step) for name, r in records.items()} == {
        "weights.ckpt": (0, 6),
        "last.ckpt": (0, 6),
    }


def test_loading_on_a_fresh_directory_restores_the_weights(
    ln: ModuleType, auto_features: None, tracked_run: Any, tmp_path: Path
) -> None:
    checkpoint = ll.Checkpoint(monitor="score", disable_plugins=REGISTRARS)
    fit([checkpoint], tmp_path / "run", steps=3, scores=[1])
    expected = torch.load(checkpoint.best_model_path, weights_only=True)["state_dict"]
    shutil.rmtree(tmp_path / "run")

    path = ll.checkpoint_path(ll.best_checkpoint(tracked_run))

    restored = ScriptedModule.load_from_checkpoint(path).state_dict()
    assert restored.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(restored[name], tensor), name


@pytest.mark.filterwarnings("ignore:The dirpath has changed:UserWarning")
@pytest.mark.filterwarnings("ignore:You.re resuming from a checkpoint that ended")
def test_resuming_records_the_checkpoint_as_input_of_the_new_run(
    ln: ModuleType,
    auto_features: None,
    tracked_run: Any,
    new_run: Any,
    tmp_path: Path,
) -> None:
    first = ll.Checkpoint(monitor="score", disable_plugins=REGISTRARS)
    fit([first], tmp_path / "a", steps=2)
    best = ll.best_checkpoint(tracked_run)

    second_run = new_run()
    assert second_run.uid != tracked_run.uid
    second = ll.Checkpoint(monitor="score", disable_plugins=REGISTRARS)
    import lightning.pytorch as pl

    trainer = pl.Trainer(
        default_root_dir=tmp_path / "b",
        max_steps=4,
        callbacks=[second],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(ScriptedModule(), loader(), ckpt_path=ll.checkpoint_path(best))

    inputs = [a.uid for a in second_run.input_artifacts.all()]
    assert best.artifact_uid in inputs
    assert trainer.global_step == 4
    [resumed] = ll.find_checkpoints(second_run)
    assert resumed.run_uid == second_run.uid


def test_feature_query_and_a_clear_error_when_nothing_matches(
    ln: ModuleType, auto_features: None, tracked_run: Any, tmp_path: Path
) -> None:
    ln.Feature(name="corpus_version", dtype=str).save()
    checkpoint = ll.Checkpoint(
        features={"artifact": {"corpus_version": "2026-03"}}, disable_plugins=REGISTRARS
    )
    fit([checkpoint], tmp_path, steps=1)

    [record] = ll.find_checkpoints(features={"corpus_version": "2026-03"})
    assert record.features == {"corpus_version": "2026-03"}
    with pytest.raises(
        ll.CheckpointNotFoundError,
        match=r"features \{'corpus_version': '1999'\}.*nothing matched",
    ):
        ll.best_checkpoint(features={"corpus_version": "1999"})
    with pytest.raises(ll.CheckpointNotFoundError, match="run nope"):
        ll.last_checkpoint("nope")


def test_console_ls_prints_the_table_and_writes_the_plot(
    ln: ModuleType, auto_features: None, tracked_run: Any, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from lamin_lightning_core._console import app

    checkpoint = ll.Checkpoint(
        monitor="score", save_top_k=3, every_n_train_steps=1, disable_plugins=REGISTRARS
    )
    fit([checkpoint], tmp_path, steps=4, scores=[4, 2, 3, 1])
    png = tmp_path / "scores.png"

    result = CliRunner().invoke(
        app,
        ["ls", "--run", tracked_run.uid, "--plot", str(png)],
        env={"COLUMNS": "250"},
    )

    assert result.exit_code == 0, result.output
    assert "3 checkpoint(s)" in result.output
    assert "epoch=0-step=4.ckpt" in result.output and "best last" in result.output
    assert "0/4" in result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 5000

    missing = CliRunner().invoke(app, ["ls", "--run", "nope"])
    assert missing.exit_code == 1
    assert "No checkpoints in run nope" in missing.output


def test_the_fit_logs_the_table_of_its_checkpoints_once(
    ln: ModuleType,
    auto_features: None,
    tracked_run: Any,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    checkpoint = ll.Checkpoint(
        monitor="score", save_top_k=2, every_n_train_steps=1, disable_plugins=REGISTRARS
    )
    with caplog.at_level("INFO", logger="lamin_lightning_core"):
        fit([checkpoint], tmp_path, steps=4, scores=[3, 1, 4, 2])

    summaries = [r for r in caplog.records if "Persisted checkpoints" in r.message]
    assert len(summaries) == 1
    text = summaries[0].getMessage()
    assert "2 checkpoint(s)" in text
    assert "epoch=0-step=2.ckpt" in text and "epoch=0-step=4.ckpt" in text
    assert "step=1.ckpt" not in text  # evicted before the fit ended
    assert "best" in text and "last" in text
