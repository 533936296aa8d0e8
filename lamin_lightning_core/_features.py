"""Feature helpers that need a persister with a feature registry."""

from __future__ import annotations

import importlib.util

from lamin_lightning_core._errors import LaminLightningError


def save_lightning_features() -> None:
    """Create the LaminDB features that ``Checkpoint`` fills automatically.

    Raises:
        LaminLightningError: if the ``lamindb`` extra is not installed.
    """
    if importlib.util.find_spec("lamindb") is None:
        raise LaminLightningError(
            "save_lightning_features() creates LaminDB features and needs the "
            'lamindb extra: pip install "lamin-lightning[lamindb]"'
        )
    # TODO(3): create the auto-features once the feature annotator lands.
    raise NotImplementedError(
        "Auto-features are not implemented yet; they arrive with issue 3."
    )
