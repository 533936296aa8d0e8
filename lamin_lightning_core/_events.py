"""Typed, frozen lifecycle events that travel over the hook bus.

Every event serialises to JSON with ``model_dump_json()``. The persisted record
(``artifact``) is a live object of whichever persister produced it, so it is
excluded from the JSON form; ``artifact_uid`` and ``storage_uri`` carry what a
downstream system needs to find it again.
"""

from __future__ import annotations

import math
import posixpath
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Final, Literal
from urllib.parse import urlsplit, urlunsplit
from uuid import UUID, uuid4

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
)

from lamin_lightning_core._keys import ArtifactKind

SCHEMA_VERSION: Final = 1
"""Bumped whenever a field changes meaning or is removed."""


FitStatus = Literal["finished", "failed", "interrupted"]


def check_key(key: str) -> str:
    """Return ``key`` if it is a safe, relative POSIX artifact key.

    Raises:
        ValueError: if the key is empty, absolute, or climbs with ``..``.
    """
    if not key:
        raise ValueError("An artifact key must not be empty.")
    if key.startswith("/") or "\\" in key:
        raise ValueError(f"Artifact key {key!r} must be a relative POSIX path.")
    parts = key.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise ValueError(
            f"Artifact key {key!r} must not contain empty, '.' or '..' segments."
        )
    if posixpath.normpath(key) != key:
        raise ValueError(f"Artifact key {key!r} is not normalised.")
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"Artifact key {key!r} is not valid UTF-8.") from None
    return key


_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/?#]*@")
_SECRET_PARAM = re.compile(r"sig|token|secret|password|credential", re.IGNORECASE)


def redact_credentials(uri: str) -> str:
    """Return ``uri`` with its credentials replaced by ``***``.

    Credentials are the user and password of the authority
    (``s3://key:secret@bucket/x`` becomes ``s3://***@bucket/x``) and the values
    of query parameters that sign or authorise a URL (``X-Amz-Signature``,
    ``sig``, ``token``, ...). A URI without either is returned unchanged.
    """
    try:
        parts = urlsplit(uri)
    except ValueError:  # unparseable (a bad IPv6 host): still drop the userinfo
        return _USERINFO.sub(r"\1***@", uri)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rpartition("@")[2]
    params = parts.query.split("&") if parts.query else []
    query = "&".join(
        f"{name}=***" if sep and _SECRET_PARAM.search(name) else f"{name}{sep}{value}"
        for name, sep, value in (param.partition("=") for param in params)
    )
    if netloc == parts.netloc and query == parts.query:
        return uri
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def _redact_optional(uri: str | None) -> str | None:
    return None if uri is None else redact_credentials(uri)


def _finite_or_none(value: float | None) -> float | None:
    # JSON has no NaN or infinity; Lightning turns a NaN score into +-inf for
    # its comparisons. Either means "no usable score" for every consumer.
    if value is None or not math.isfinite(value):
        return None
    return value


ArtifactKey = Annotated[str, AfterValidator(check_key)]
Score = Annotated[float | None, AfterValidator(_finite_or_none)]
StorageUri = Annotated[str, AfterValidator(redact_credentials)]
"""A URI as events and records carry it: never with credentials in it."""
FeatureValue = StrictBool | StrictInt | float | str | None
"""A feature value as it travels on events: JSON scalars only."""


# Models build their validators on first use instead of at import: importing
# the core stays cheap next to `import lightning`, and a fit pays it once.
_FROZEN = ConfigDict(frozen=True, extra="forbid", defer_build=True)
_FROZEN_ANY = ConfigDict(
    frozen=True, extra="forbid", arbitrary_types_allowed=True, defer_build=True
)


def _now() -> datetime:
    return datetime.now(timezone.utc)


class LifecycleEvent(BaseModel):
    """Fields shared by every event on the bus."""

    model_config = _FROZEN

    schema_version: Literal[1] = SCHEMA_VERSION
    event_id: UUID = Field(default_factory=uuid4)
    created_at: datetime = Field(default_factory=_now)
    callback_id: str = Field(
        description="State key of the Checkpoint callback that emitted the event; "
        "two callbacks on one trainer have different ids."
    )
    run_uid: str | None = Field(
        default=None, description="UID of the tracked run, if a persister has one."
    )


class CheckpointRank(BaseModel):
    """Where a checkpoint stands among the kept checkpoints of its callback."""

    model_config = _FROZEN

    model_rank: int = Field(ge=0, description="0 is the best by score and mode.")
    is_best_model: bool
    is_last_model: bool


class FitStartedEvent(LifecycleEvent):
    """A fit with a publishing checkpoint callback is about to train."""

    event_type: Literal["fit_started"] = "fit_started"
    base_prefix: str
    checkpoint_key_prefix: str
    logger_name: str | None = None
    logger_version: str | None = None
    monitor: str | None = None
    mode: Literal["min", "max"]
    run_features: dict[str, FeatureValue] = Field(
        default_factory=dict, description="The user's run-level feature values."
    )
    artifact_features: dict[str, FeatureValue] = Field(
        default_factory=dict,
        description="The user's artifact-level values; None is filled at save time.",
    )
    trainer_config: dict[str, FeatureValue] = Field(
        default_factory=dict,
        description="Run-level auto-feature values: logger_name, logger_version, "
        "max_epochs, max_steps, precision, accumulate_grad_batches, "
        "gradient_clip_val, monitor, mode.",
    )
    hyperparameters: dict[str, FeatureValue] = Field(
        default_factory=dict,
        description="Scalar hyperparameters of the model and the datamodule.",
    )


class BackendRunLink(BaseModel):
    """A run in another tracking system that mirrors this fit.

    A registrar returns it from ``lamin_lightning_fit_started``; the persister
    records it on the tracked run, so each system points at the other.
    """

    model_config = _FROZEN

    system: str = Field(description="Short name: 'wandb', 'mlflow', 'clearml'.")
    run_id: str
    url: Annotated[str | None, AfterValidator(_redact_optional)] = None
    project: str | None = None


class FitEndedEvent(LifecycleEvent):
    """The fit ended; ``status`` says how."""

    event_type: Literal["fit_ended"] = "fit_ended"
    status: FitStatus


class _ArtifactEvent(LifecycleEvent):
    model_config = _FROZEN_ANY

    kind: ArtifactKind
    key: ArtifactKey
    local_path: Path = Field(description="The file Lightning wrote, on this host.")
    storage_uri: StorageUri = Field(description="Where the persisted bytes live.")
    artifact: object | None = Field(
        default=None,
        exclude=True,
        repr=False,
        description="The persisted record (a LaminDB Artifact with the LaminDB "
        "plugin); never serialised.",
    )
    artifact_uid: str | None = None
    epoch: int | None = None
    global_step: int | None = None
    ranking: dict[str, CheckpointRank] = Field(
        default_factory=dict,
        description="Checkpoint keys of this callback whose rank or flags changed "
        "with this event, and their new standing (empty for config/hparams).",
    )


class ArtifactSavedEvent(_ArtifactEvent):
    """A file was written by Lightning and persisted.

    Example:
        >>> def on_artifact_saved(self, event):
        ...     if event.kind == "checkpoint":
        ...         registry.register(uri=event.storage_uri, key=event.key)
    """

    event_type: Literal["artifact_saved"] = "artifact_saved"
    monitor: str | None = None
    score: Score = Field(
        default=None, description="Value of ``monitor`` at save time; None if NaN."
    )
    is_best: bool = Field(
        default=False,
        description="Whether this checkpoint is the callback's best model now.",
    )
    mode: Literal["min", "max"] | None = None
    save_weights_only: bool | None = None
    features: dict[str, FeatureValue] = Field(
        default_factory=dict,
        description="The user's artifact-level feature values for this file.",
    )


class ArtifactRemovedEvent(_ArtifactEvent):
    """Lightning deleted a checkpoint it had saved (top-k eviction)."""

    event_type: Literal["artifact_removed"] = "artifact_removed"


class PersistRequest(BaseModel):
    """What the callback asks a persister to store."""

    model_config = _FROZEN

    kind: ArtifactKind
    key: ArtifactKey
    local_path: Path
    run_uid: str | None = None
    description: str = ""
    is_run_input: bool = Field(
        default=False, description="Link the artifact as an input of the run."
    )
    is_run_output: bool = Field(
        default=True, description="Link the artifact as an output of the run."
    )
    callback_id: str = ""
    features: dict[str, FeatureValue] = Field(
        default_factory=dict, description="The user's artifact-level values."
    )
    auto_features: dict[str, FeatureValue] = Field(
        default_factory=dict,
        description="Auto-feature values of this file (score, monitor, mode, "
        "save_weights_only, model_rank, is_best_model, is_last_model).",
    )
    ranking: dict[str, CheckpointRank] = Field(
        default_factory=dict,
        description="Other checkpoint keys whose rank or flags changed.",
    )


class PersistedArtifact(BaseModel):
    """What a persister returns for a stored file."""

    model_config = _FROZEN_ANY

    storage_uri: StorageUri
    artifact: object | None = Field(default=None, exclude=True, repr=False)
    artifact_uid: str | None = None


class CheckpointQuery(BaseModel):
    """Which persisted checkpoints to look up; unset fields don't filter."""

    model_config = _FROZEN

    run_uid: str | None = Field(default=None, description="Checkpoints of this run.")
    key_prefix: str | None = Field(
        default=None, description="Checkpoints whose key starts with this prefix."
    )
    features: dict[str, FeatureValue] = Field(
        default_factory=dict,
        description="Artifact feature values the checkpoints must have.",
    )
    latest_run: bool = Field(
        default=False,
        description="Without run_uid: the newest run that persisted checkpoints.",
    )

    def describe(self) -> str:
        """A short human phrase of what is searched, for messages."""
        parts = []
        if self.run_uid:
            parts.append(f"run {self.run_uid}")
        elif self.latest_run:
            parts.append("the latest run")
        if self.key_prefix:
            parts.append(f"key prefix {self.key_prefix!r}")
        if self.features:
            parts.append(f"features {self.features}")
        return ", ".join(parts) or "all checkpoints"


class CheckpointRecord(BaseModel):
    """A persisted checkpoint, as a query returns it."""

    model_config = _FROZEN_ANY

    key: ArtifactKey
    artifact_uid: str | None = None
    run_uid: str | None = None
    storage_uri: StorageUri
    size: int | None = None
    created_at: datetime | None = None
    epoch: int | None = None
    global_step: int | None = None
    score: Score = None
    mode: Literal["min", "max"] | None = None
    model_rank: int | None = None
    is_best_model: bool | None = None
    is_last_model: bool | None = None
    features: dict[str, FeatureValue] = Field(default_factory=dict)
    artifact: object | None = Field(default=None, exclude=True, repr=False)
