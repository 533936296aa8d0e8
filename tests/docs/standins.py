"""Stand-ins for the user's own code that the docs' examples import.

The examples read like a user's script: ``from my_project import MyModel``.
The test harness puts this module in ``sys.modules`` as ``my_project`` and as
``my_model_registry``, so the examples run unchanged.
"""

from __future__ import annotations

from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset


class MyModel(pl.LightningModule):
    """A linear regression that logs ``train_loss`` and ``val_loss``.

    Args:
        learning_rate: SGD learning rate.
    """

    def __init__(self, learning_rate: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", self._loss(batch))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.learning_rate)

    def _loss(self, batch: Any) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.mse_loss(self.layer(x), y)


class MyDataModule(pl.LightningDataModule):
    """640 training and 128 validation samples of ``y = x.sum()``.

    With the default batch size an epoch is 10 training steps.

    Args:
        batch_size: samples per batch.
    """

    def __init__(self, batch_size: int = 64) -> None:
        super().__init__()
        self.save_hyperparameters()

    def train_dataloader(self) -> DataLoader:
        return self._loader(640, seed=0)

    def val_dataloader(self) -> DataLoader:
        return self._loader(128, seed=1)

    def _loader(self, n: int, seed: int) -> DataLoader:
        generator = torch.Generator().manual_seed(seed)
        x = torch.randn(n, 4, generator=generator)
        dataset = TensorDataset(x, x.sum(dim=1, keepdim=True))
        return DataLoader(dataset, batch_size=self.hparams.batch_size)


class ModelRegistry:
    """An external model registry that remembers what was registered."""

    registered: ClassVar[list[dict[str, Any]]] = []

    def register(self, **entry: Any) -> None:
        self.registered.append(entry)
