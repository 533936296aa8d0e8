"""Keep PyTorch Lightning checkpoints traceable.

Use it as ``import lamin_lightning_core as ll``.
"""

from __future__ import annotations

import typing as _typing

from lamin_lightning_core._bus import DeliveryFailure, Retry
from lamin_lightning_core._checkpoint import Checkpoint
from lamin_lightning_core._errors import (
    LaminLightningError,
    LaminLightningWarning,
    PersistError,
    PluginDeliveryWarning,
    PluginLoadError,
    PluginUnavailable,
)
from lamin_lightning_core._events import (
    SCHEMA_VERSION,
    ArtifactKind,
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
from lamin_lightning_core._observers import ArtifactObserver
from lamin_lightning_core._query import (
    CheckpointNotFoundError,
    best_checkpoint,
    checkpoint_path,
    find_checkpoints,
    last_checkpoint,
)
from lamin_lightning_core._replay import ReplayReport, replay
from lamin_lightning_core.hookspecs import hookimpl, hookspec

if _typing.TYPE_CHECKING:
    from lamin_lightning_core._cli import SaveConfigCallback

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
    # SaveConfigCallback extends Lightning's, whose module imports jsonargparse
    # (about 25 ms): a script that never uses LightningCLI should not pay that.
    if name == "SaveConfigCallback":
        from lamin_lightning_core._cli import SaveConfigCallback

        return SaveConfigCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
