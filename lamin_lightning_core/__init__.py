"""Keep PyTorch Lightning checkpoints traceable.

Use it as ``import lamin_lightning_core as ll``.
"""

from __future__ import annotations

import importlib as _importlib
import typing as _typing

from lamin_lightning_core._errors import (
    LaminLightningError,
    LaminLightningWarning,
    PersistError,
    PluginDeliveryWarning,
    PluginLoadError,
    PluginUnavailable,
)
from lamin_lightning_core.hookspecs import hookimpl, hookspec

if _typing.TYPE_CHECKING:
    from lamin_lightning_core._bus import DeliveryFailure, Retry
    from lamin_lightning_core._checkpoint import Checkpoint
    from lamin_lightning_core._cli import SaveConfigCallback
    from lamin_lightning_core._events import (
        SCHEMA_VERSION,
        ArtifactRemovedEvent,
        ArtifactSavedEvent,
        BackendRunLink,
        CheckpointQuery,
        CheckpointRank,
        CheckpointRecord,
        FitEndedEvent,
        FitStartedEvent,
        PersistedArtifact,
        PersistRequest,
    )
    from lamin_lightning_core._features import save_lightning_features
    from lamin_lightning_core._keys import ArtifactKind
    from lamin_lightning_core._observers import ArtifactObserver
    from lamin_lightning_core._query import (
        CheckpointNotFoundError,
        best_checkpoint,
        checkpoint_path,
        find_checkpoints,
        last_checkpoint,
    )
    from lamin_lightning_core._replay import ReplayReport, replay

# Where each public name lives. They load on first access: pydantic and the
# event models only when a script uses them, and SaveConfigCallback (whose
# Lightning base imports jsonargparse) only with LightningCLI.
_LAZY = {
    "DeliveryFailure": "_bus",
    "Retry": "_bus",
    "Checkpoint": "_checkpoint",
    "SaveConfigCallback": "_cli",
    **dict.fromkeys(
        [
            "SCHEMA_VERSION",
            "ArtifactRemovedEvent",
            "ArtifactSavedEvent",
            "BackendRunLink",
            "CheckpointQuery",
            "CheckpointRank",
            "CheckpointRecord",
            "FitEndedEvent",
            "FitStartedEvent",
            "PersistedArtifact",
            "PersistRequest",
        ],
        "_events",
    ),
    "save_lightning_features": "_features",
    "ArtifactKind": "_keys",
    "ArtifactObserver": "_observers",
    **dict.fromkeys(
        [
            "CheckpointNotFoundError",
            "best_checkpoint",
            "checkpoint_path",
            "find_checkpoints",
            "last_checkpoint",
        ],
        "_query",
    ),
    "ReplayReport": "_replay",
    "replay": "_replay",
}

__all__ = [
    "SCHEMA_VERSION",
    "ArtifactKind",
    "ArtifactObserver",
    "ArtifactRemovedEvent",
    "ArtifactSavedEvent",
    "BackendRunLink",
    "Checkpoint",
    "CheckpointNotFoundError",
    "CheckpointQuery",
    "CheckpointRank",
    "CheckpointRecord",
    "DeliveryFailure",
    "FitEndedEvent",
    "FitStartedEvent",
    "LaminLightningError",
    "LaminLightningWarning",
    "PersistError",
    "PersistRequest",
    "PersistedArtifact",
    "PluginDeliveryWarning",
    "PluginLoadError",
    "PluginUnavailable",
    "ReplayReport",
    "Retry",
    "SaveConfigCallback",
    "best_checkpoint",
    "checkpoint_path",
    "find_checkpoints",
    "hookimpl",
    "hookspec",
    "last_checkpoint",
    "replay",
    "save_lightning_features",
]


def __getattr__(name: str) -> _typing.Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(_importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # the next access skips this function
    return value


def __dir__() -> list[str]:
    public = {name for name in globals() if not name.startswith("_")}
    return sorted((public - {"annotations"}) | set(__all__))
