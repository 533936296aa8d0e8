"""A plugin distribution installed with pip receives events, no code change."""

from __future__ import annotations

import json
from importlib.metadata import distribution
from pathlib import Path

import pytest

import lamin_lightning_core as ll
from tests.helpers import fit


def test_pip_installed_plugin_receives_every_event(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert distribution("lamin-lightning-recorder").version == "0.1.0"
    record = tmp_path / "events.jsonl"
    monkeypatch.setenv("LL_RECORDER_FILE", str(record))
    checkpoint = ll.Checkpoint(
        monitor="score",
        every_n_train_steps=1,
        disable_plugins=["lamindb", "wandb", "mlflow", "clearml"],
    )
    assert checkpoint.plugin_manager.has_plugin("recorder")

    fit([checkpoint], tmp_path, steps=3, scores=[1, 2, 0])

    events = [json.loads(line) for line in record.read_text().splitlines()]
    assert [e["event_type"] for e in events] == [
        "fit_started",
        "artifact_saved",
        "artifact_saved",
        "artifact_removed",
        "fit_ended",
    ]
    assert events[-1]["status"] == "finished"
    assert events[3]["key"] == events[1]["key"] == "checkpoints/epoch=0-step=1.ckpt"
    assert {e["callback_id"] for e in events} == {checkpoint.state_key}
