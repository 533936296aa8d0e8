"""Tiny Lightning pieces shared by the tests."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

QUIET = {
    "enable_progress_bar": False,
    "enable_model_summary": False,
    "accelerator": "cpu",
    "log_every_n_steps": 1,
}


class ScriptedModule(pl.LightningModule):
    """Logs ``score`` from a script, one value per training step.

    Args:
        scores: the value logged at step ``i`` is ``scores[i % len(scores)]``.
        lr: a hyperparameter, saved to ``hparams.yaml``.
    """

    def __init__(self, scores: Sequence[float] = (1.0,), lr: float = 0.01) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.layer(x), y)
        scores = self.hparams.scores
        self.log("score", float(scores[self.global_step % len(scores)]))
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


def loader(n: int = 32, batch_size: int = 4) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=generator)
    return DataLoader(TensorDataset(x, x.sum(dim=1, keepdim=True)), batch_size)


def fit(
    callbacks: list[Any],
    root: Any,
    *,
    steps: int = 4,
    scores: Sequence[float] = (1.0,),
    logger: Any = False,
    **trainer_kwargs: Any,
) -> pl.Trainer:
    """Run a small fit in ``root`` and return the trainer."""
    trainer = pl.Trainer(
        default_root_dir=root,
        max_steps=steps,
        callbacks=callbacks,
        logger=logger,
        **{**QUIET, **trainer_kwargs},
    )
    trainer.fit(ScriptedModule(scores), loader())
    return trainer


class TinyDataModule(pl.LightningDataModule):
    """Random regression data for CLI tests.

    Args:
        batch_size: samples per batch.
    """

    def __init__(self, batch_size: int = 4) -> None:
        super().__init__()
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        return loader(batch_size=self.batch_size)
