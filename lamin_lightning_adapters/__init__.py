"""Plugins for lamin-lightning, each loaded through the ``lamin_lightning``
entry-point group and active only when its backend is installed.

* ``lamin_lightning_adapters.lamindb``: the LaminDB persister.
* ``lamin_lightning_adapters.wandb``: Weights & Biases registrar.
* ``lamin_lightning_adapters.mlflow``: MLflow registrar.
* ``lamin_lightning_adapters.clearml``: ClearML registrar.
"""

from __future__ import annotations

__all__: list[str] = []
