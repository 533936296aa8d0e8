"""A tracked two-process DDP fit on CPU (gloo), with a plain Trainer or the CLI.

Run by ``test_ddp.py`` as ``python tests/reliability/ddp_fit.py OUTDIR
[--failing] [--cli]`` from the repository root, in the test session's LaminDB
instance. Lightning's launcher runs this script again for rank 1 (same
arguments, ``LOCAL_RANK=1``), so everything here runs on both ranks unless it
says otherwise; ``ln.track()`` runs on rank 0 only.

Each rank writes ``OUTDIR/rank<N>.json`` with what its callback knows after
the fit. Every event any rank receives is appended to ``OUTDIR/events.jsonl``
with the rank of the process. ``--failing`` adds a registrar that raises a
transient error on every ``lamin_lightning_artifact_saved`` call (retried,
then recorded as a delivery failure). ``--cli`` trains through LightningCLI
with ``SaveConfigCallback``; without it, a small callback persists the config.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # run as a file, tests.helpers is importable

import lightning.pytorch as pl  # noqa: E402
import torch.distributed as dist  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402
from lightning.pytorch.cli import LightningCLI  # noqa: E402
from lightning.pytorch.loggers import TensorBoardLogger  # noqa: E402

import lamin_lightning_core as ll  # noqa: E402
from tests.helpers import ScriptedModule, TinyDataModule, loader  # noqa: E402

REGISTRARS = ["wandb", "mlflow", "clearml", "recorder"]
SCORES = [5.0, 4.0, 6.0, 3.0, 7.0, 2.0]
"""With ``mode=min`` and top 2: steps 1, 2, 4 and 6 are saved, 1 and 2 evicted."""
PROCESS_RANK = int(os.environ.get("LOCAL_RANK", "0"))
"""Rank 0 is the process the test starts; Lightning sets ``LOCAL_RANK=1``
for the process it launches."""

CONFIG = f"""
seed_everything: 0
trainer:
  max_steps: {len(SCORES)}
  accelerator: cpu
  devices: 2
  strategy: ddp
  enable_progress_bar: false
  enable_model_summary: false
  log_every_n_steps: 1
model:
  scores: {SCORES}
data:
  batch_size: 4
"""


class RankRecorder:
    """Appends each event it receives, with this process's rank, to a file."""

    __name__ = "rank-recorder"

    def __init__(self, path: Path) -> None:
        self.path = path

    def _record(self, hook: str, event: Any) -> None:
        line = {
            "rank": PROCESS_RANK,
            "dist_rank": dist.get_rank() if dist.is_initialized() else None,
            "pid": os.getpid(),
            "hook": hook,
            "kind": getattr(event, "kind", None),
            "key": getattr(event, "key", None),
        }
        with self.path.open("a", encoding="utf-8") as stream:
            stream.write(json.dumps(line) + "\n")

    @ll.hookimpl
    def lamin_lightning_fit_started(self, event: ll.FitStartedEvent) -> None:
        self._record("fit_started", event)

    @ll.hookimpl
    def lamin_lightning_artifact_saved(self, event: ll.ArtifactSavedEvent) -> None:
        self._record("artifact_saved", event)

    @ll.hookimpl
    def lamin_lightning_artifact_removed(self, event: ll.ArtifactRemovedEvent) -> None:
        self._record("artifact_removed", event)

    @ll.hookimpl
    def lamin_lightning_fit_ended(self, event: ll.FitEndedEvent) -> None:
        self._record("fit_ended", event)


class FailingRegistrar:
    """A registrar whose backend is down: every saved event fails."""

    __name__ = "failing-registrar"

    @ll.hookimpl
    def lamin_lightning_artifact_saved(self, event: ll.ArtifactSavedEvent) -> None:
        raise ConnectionError(f"backend unreachable, cannot register {event.key}")


def start_run() -> str:
    """``ln.track()`` on rank 0, the only rank that talks to LaminDB."""
    from lamin_lightning_adapters.lamindb import mark_local_instance_offline_safe

    mark_local_instance_offline_safe()  # ln.track() asks the hub otherwise
    import lamindb as ln

    ln.track()
    return str(ln.context.run.uid)


class ConfigWriter(Callback):
    """Writes a config file and persists it as the run's config, on rank 0.

    The plain-Trainer stand-in for ``SaveConfigCallback``: ``trainer.log_dir``
    is collective, so it is read on every rank; only rank 0 saves.
    """

    def __init__(self, checkpoint: ll.Checkpoint) -> None:
        self.checkpoint = checkpoint

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        log_dir = Path(trainer.log_dir or trainer.default_root_dir)
        if trainer.is_global_zero:
            log_dir.mkdir(parents=True, exist_ok=True)
            path = log_dir / "config.yaml"
            path.write_text(CONFIG)
            self.checkpoint.save_artifact(trainer, path, "config")


def report(trainer: pl.Trainer, checkpoint: ll.Checkpoint) -> dict[str, Any]:
    """What this rank's callback knows after the fit."""
    dirpath = Path(checkpoint.dirpath)
    return {
        "rank": trainer.global_rank,
        "world_size": trainer.world_size,
        "pid": os.getpid(),
        "run_uid": checkpoint.run_uid,
        "base_prefix": checkpoint.base_prefix,
        "checkpoint_key_prefix": checkpoint.checkpoint_key_prefix,
        "config_key": checkpoint.key_for("config", "config.yaml"),
        "kept_keys": sorted(
            checkpoint.key_for("checkpoint", p) for p in checkpoint.best_k_models
        ),
        "files": sorted(p.name for p in dirpath.glob("*.ckpt")),
        "dirpath": str(dirpath),
        "plugins": sorted(n for n, _ in checkpoint.plugin_manager.list_name_plugin()),
        "delivery_failures": [
            [f.plugin, f.hook, getattr(f.event, "key", None), type(f.error).__name__]
            for f in checkpoint.delivery_failures
        ],
        "persist_failures": [str(e) for e in checkpoint.persist_failures],
    }


def fit_with_trainer(outdir: Path, checkpoint: ll.Checkpoint) -> pl.Trainer:
    trainer = pl.Trainer(
        default_root_dir=outdir,
        max_steps=len(SCORES),
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        callbacks=[checkpoint, ConfigWriter(checkpoint)],
        logger=TensorBoardLogger(outdir / "logs"),
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    )
    trainer.fit(ScriptedModule(SCORES), loader())
    return trainer


def fit_with_cli(outdir: Path, checkpoint: ll.Checkpoint) -> pl.Trainer:
    cli = LightningCLI(
        ScriptedModule,
        TinyDataModule,
        save_config_callback=ll.SaveConfigCallback,
        trainer_defaults={
            "callbacks": [checkpoint],
            "default_root_dir": str(outdir),
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": str(outdir / "logs")},
            },
        },
        args=["fit", "--config", CONFIG],
    )
    return cli.trainer


def main(outdir: Path, flags: list[str]) -> None:
    tracked = start_run() if PROCESS_RANK == 0 else None
    plugins: list[Any] = [RankRecorder(outdir / "events.jsonl")]
    if "--failing" in flags:
        plugins.append(FailingRegistrar())
    checkpoint = ll.Checkpoint(
        monitor="score",
        mode="min",
        save_top_k=2,
        every_n_train_steps=1,
        plugins=plugins,
        disable_plugins=REGISTRARS,
    )
    fit = fit_with_cli if "--cli" in flags else fit_with_trainer
    trainer = fit(outdir, checkpoint)
    result = {**report(trainer, checkpoint), "tracked_run_uid": tracked}
    path = outdir / f"rank{trainer.global_rank}.json"
    path.write_text(json.dumps(result, indent=1))
    if tracked is not None:
        import lamindb as ln

        ln.finish()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
