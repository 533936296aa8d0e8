"""LightningCLI end to end with a real config.yaml and the LaminDB persister."""

from __future__ import annotations

import os
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from lightning.pytorch.cli import LightningCLI

import lamin_lightning_core as ll
from tests.helpers import ScriptedModule, TinyDataModule

CONFIG = """
seed_everything: 0
trainer:
  max_steps: 3
  accelerator: cpu
  enable_progress_bar: false
  enable_model_summary: false
  logger:
    class_path: lightning.pytorch.loggers.TensorBoardLogger
    init_args:
      save_dir: logs
  callbacks:
    - class_path: lamin_lightning_core.Checkpoint
      init_args:
        monitor: score
        mode: min
        save_top_k: 3
        every_n_train_steps: 1
model:
  scores: [3.0, 2.0, 1.0]
data:
  batch_size: 4
"""


def test_cli_persists_config_as_run_input(
    ln: ModuleType,
    tracked_run: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["train.py"])
    monkeypatch.setenv("LAMIN_LIGHTNING_DISABLE_PLUGINS", "wandb,mlflow,clearml")
    (tmp_path / "config.yaml").write_text(CONFIG)

    cli = LightningCLI(
        ScriptedModule,
        TinyDataModule,
        save_config_callback=ll.SaveConfigCallback,
        args=["fit", "--config", "config.yaml"],
    )

    [checkpoint] = [c for c in cli.trainer.callbacks if isinstance(c, ll.Checkpoint)]
    assert checkpoint.save_top_k == 3
    base = f"logs/lightning_logs/{tracked_run.uid}"
    config = checkpoint.last_config_artifact
    assert config.key == f"{base}/config.yaml"
    assert list(tracked_run.input_artifacts.all()) == [config]
    assert config.run is None
    local = Path("logs/lightning_logs/version_0/config.yaml")
    assert config.path.read_text() == local.read_text()
    assert "lamin_lightning_core.Checkpoint" in local.read_text()
    keys = {a.key for a in ln.Artifact.filter(run=tracked_run, kind="model")}
    assert keys == {f"{base}/checkpoints/epoch=0-step={i}.ckpt" for i in (1, 2, 3)}
    assert os.path.exists(checkpoint.best_model_path)
