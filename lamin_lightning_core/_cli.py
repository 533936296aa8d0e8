"""``SaveConfigCallback``: Lightning's, plus the config as a tracked artifact."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from lightning.pytorch.cli import SaveConfigCallback as _LightningSaveConfigCallback
from typing_extensions import override

from lamin_lightning_core._checkpoint import Checkpoint

if TYPE_CHECKING:
    import lightning.pytorch as pl


class SaveConfigCallback(_LightningSaveConfigCallback):
    """Write the resolved LightningCLI config, then persist it as an artifact.

    The local ``config.yaml`` is written exactly as Lightning does. It is then
    handed to every :class:`Checkpoint` on the trainer, which stores it under
    ``{base_prefix}/config.yaml`` as an input of the tracked run. Pass it as
    ``LightningCLI(save_config_callback=SaveConfigCallback)``.
    """

    _log_dir: str | None = None

    @override
    def setup(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str
    ) -> None:
        # Checkpoint callbacks run their own setup after this one; derive their
        # key prefixes now, on every rank, so save_config (rank zero only) can
        # use them without a collective call. trainer.log_dir is collective
        # too: read it here, on every rank, for save_config.
        if not self.already_saved:
            for callback in _publishing_callbacks(trainer):
                callback.resolve_prefix(trainer)
            self._log_dir = trainer.log_dir if self.save_to_log_dir else None
        super().setup(trainer, pl_module, stage)

    @override
    def save_config(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str
    ) -> None:
        # Rank zero only: never read trainer.log_dir here, it broadcasts.
        if not self.save_to_log_dir or self._log_dir is None:
            return
        config_path = os.path.join(self._log_dir, self.config_filename)
        keys: set[str] = set()
        for callback in _publishing_callbacks(trainer):
            key = callback.key_for("config", config_path)
            if key not in keys:  # two callbacks may share one prefix
                keys.add(key)
                callback.save_artifact(trainer, config_path, "config")


def _publishing_callbacks(trainer: pl.Trainer) -> list[Checkpoint]:
    return [cb for cb in trainer.checkpoint_callbacks if isinstance(cb, Checkpoint)]
