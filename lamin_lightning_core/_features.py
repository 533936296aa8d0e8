"""Feature helpers that need a persister with a feature registry."""

from __future__ import annotations

import importlib.util

from lamin_lightning_core._errors import LaminLightningError


def save_lightning_features() -> None:
    """Create the LaminDB features that ``Checkpoint`` fills automatically.

    They are grouped under the feature type ``lamin_lightning`` so they never
    clash with a user's own ``score`` or ``mode`` features. Safe to call twice,
    and from two processes at once. Call it once per LaminDB instance.

    Artifact level: ``is_best_model``, ``is_last_model``, ``score``,
    ``model_rank``, ``save_weights_only``, ``monitor``, ``mode``. Run level:
    ``logger_name``, ``logger_version``, ``max_epochs``, ``max_steps``,
    ``precision``, ``accumulate_grad_batches``, ``gradient_clip_val``,
    ``monitor``, ``mode``.

    Raises:
        LaminLightningError: if the ``lamindb`` extra is not installed.
    """
    if importlib.util.find_spec("lamindb") is None:
        raise LaminLightningError(
            "save_lightning_features() creates LaminDB features and needs the "
            'lamindb extra: pip install "lamin-lightning[lamindb]"'
        )
    from lamin_lightning_adapters._lamindb_features import (
        save_lightning_features as save,
    )
    from lamin_lightning_adapters.lamindb import _lamindb

    _lamindb()  # checks the instance, offline-safe
    save()
