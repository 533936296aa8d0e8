"""Feature values: checked at construction, resolved from the trainer."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from lamin_lightning_core import _trainer
from lamin_lightning_core._events import FitStartedEvent
from lamin_lightning_core._keys import version_segment

if TYPE_CHECKING:
    from pathlib import Path

    import lightning.pytorch as pl

    from lamin_lightning_core._checkpoint import Checkpoint
    from lamin_lightning_core._delivery import PendingSave
    from lamin_lightning_core._events import CheckpointRank, FeatureValue
    from lamin_lightning_core._keys import ArtifactKind, LoggerLayout

log = logging.getLogger(__name__)

FEATURE_LEVELS = ("run", "artifact")

AUTO_ARTIFACT_FEATURES = (
    "is_best_model",
    "is_last_model",
    "score",
    "model_rank",
    "save_weights_only",
    "monitor",
    "mode",
)
AUTO_RUN_FEATURES = (
    "logger_name",
    "logger_version",
    "max_epochs",
    "max_steps",
    "precision",
    "accumulate_grad_batches",
    "gradient_clip_val",
    "monitor",
    "mode",
)


def check_features(
    features: Mapping[str, Mapping[str, Any]] | None,
) -> dict[str, dict[str, FeatureValue]]:
    """Validate ``features``: ``{"run": {...}, "artifact": {...}}`` of scalars.

    Raises:
        TypeError: if ``features`` or a level is not a dict, or a value is not
            a bool, int, float, str (or ``None`` at artifact level).
        ValueError: naming any key other than ``run`` and ``artifact``.
    """
    if features is None:
        return {}
    if not isinstance(features, Mapping):
        raise TypeError(
            "features must be a dict like {'run': {...}, 'artifact': {...}}, "
            f"got {type(features).__name__}."
        )
    unknown = sorted(set(features) - set(FEATURE_LEVELS))
    if unknown:
        raise ValueError(
            f"features has unknown key(s) {unknown}: use 'run' for values of the "
            "tracked run and 'artifact' for values of each checkpoint, e.g. "
            "features={'run': {'lr': 0.1}, 'artifact': {'dataset_version': '1'}}."
        )
    checked: dict[str, dict[str, FeatureValue]] = {}
    for level, values in features.items():
        if not isinstance(values, Mapping):
            raise TypeError(f"features[{level!r}] must be a dict of name -> value.")
        for name, value in values.items():
            allowed_none = level == "artifact" and value is None
            if not (allowed_none or isinstance(value, (bool, int, float, str))):
                raise TypeError(
                    f"features[{level!r}][{name!r}] is {value!r}: use a bool, int, "
                    "float or str"
                    + (
                        ", or None to fill it at save time."
                        if level == "artifact"
                        else "."
                    )
                )
        checked[level] = dict(values)
    return checked


def _scalar(value: Any) -> FeatureValue:
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    return None


def resolve_artifact_features(
    trainer: pl.Trainer, values: Mapping[str, FeatureValue]
) -> dict[str, FeatureValue]:
    """Fill artifact features given as ``None`` from logged metrics or the trainer.

    A logged metric of the same name wins over a trainer attribute; a name
    matching neither stays ``None`` (and is logged at DEBUG).
    """
    resolved = {}
    for name, value in values.items():
        if value is None:
            if name in trainer.callback_metrics:
                value = _scalar(trainer.callback_metrics[name])
            else:
                value = _scalar(getattr(trainer, name, None))
            if value is None:
                log.debug("Artifact feature %r matches no metric or attribute", name)
        resolved[name] = value
    return resolved


def trainer_config(
    trainer: pl.Trainer,
    layout: LoggerLayout | None,
    monitor: str | None,
    mode: str,
) -> dict[str, FeatureValue]:
    """Values of the run-level auto-features."""
    clip = trainer.gradient_clip_val
    return {
        "logger_name": layout.name if layout else None,
        "logger_version": version_segment(layout.version) if layout else None,
        "max_epochs": trainer.max_epochs,
        "max_steps": trainer.max_steps,
        "precision": str(trainer.precision),
        "accumulate_grad_batches": trainer.accumulate_grad_batches,
        "gradient_clip_val": None if clip is None else float(clip),
        "monitor": monitor,
        "mode": mode,
    }


def hyperparameters(
    pl_module: pl.LightningModule, trainer: pl.Trainer
) -> dict[str, FeatureValue]:
    """Scalar hyperparameters of the model and the datamodule (model wins)."""
    found: dict[str, FeatureValue] = {}
    datamodule = getattr(trainer, "datamodule", None)
    for source in (datamodule, pl_module):
        hparams = getattr(source, "hparams", None) or {}
        for name, value in hparams.items():
            scalar = _scalar(value)
            if scalar is not None:
                found[str(name)] = scalar
    return found


def auto_features(
    checkpoint: Checkpoint, score: float | None, standing: CheckpointRank | None
) -> dict[str, FeatureValue]:
    """Artifact-level auto-feature values of a checkpoint just saved."""
    if standing is None:
        return {}
    return {
        "score": score,
        "monitor": checkpoint.monitor,
        "mode": checkpoint.mode,
        "save_weights_only": checkpoint.save_weights_only,
        **standing.model_dump(),
    }


def fit_started(
    checkpoint: Checkpoint, trainer: pl.Trainer, pl_module: pl.LightningModule
) -> FitStartedEvent:
    """The event that tells plugins a fit with ``checkpoint`` starts."""
    layout = _trainer.logger_layout(trainer)
    mode = checkpoint.mode
    return FitStartedEvent(
        callback_id=checkpoint.state_key,
        run_uid=checkpoint.run_uid,
        base_prefix=checkpoint.base_prefix,
        checkpoint_key_prefix=checkpoint.checkpoint_key_prefix,
        logger_name=layout.name if layout else None,
        logger_version=version_segment(layout.version) if layout else None,
        monitor=checkpoint.monitor,
        mode=mode,  # type: ignore[arg-type]
        run_features=checkpoint.features.get("run", {}),
        artifact_features=checkpoint.features.get("artifact", {}),
        trainer_config=trainer_config(trainer, layout, checkpoint.monitor, mode),
        hyperparameters=hyperparameters(pl_module, trainer),
    )


def event_fields(
    checkpoint: Checkpoint,
    trainer: pl.Trainer,
    ranking: dict[str, CheckpointRank],
    score: float | None,
    standing: CheckpointRank | None,
) -> dict[str, Any]:
    """The saved event's fields taken at save time; ``standing`` is ``None``
    for a file that is not a checkpoint (config, hparams)."""
    ours = standing is not None
    return {
        "epoch": trainer.current_epoch,
        "global_step": trainer.global_step,
        "ranking": ranking,
        "monitor": checkpoint.monitor if ours else None,
        "score": score,
        "is_best": standing is not None and standing.is_best_model,
        "mode": checkpoint.mode if ours else None,
        "save_weights_only": checkpoint.save_weights_only if ours else None,
    }


def pending_save(
    checkpoint: Checkpoint,
    trainer: pl.Trainer,
    kind: ArtifactKind,
    key: str,
    staged: Path,
    original: Path,
    seq: int,
    score: float | None,
    ranking: dict[str, CheckpointRank],
) -> PendingSave:
    """A save as the worker will persist it, with everything taken now.

    Args:
        score: the monitored value (``None`` for config and hparams).
        ranking: the checkpoints whose standing this save changed.
    """
    from lamin_lightning_core._delivery import PendingSave
    from lamin_lightning_core._events import PersistRequest

    is_checkpoint = kind == "checkpoint"
    standing = checkpoint._ranking.standing(key) if is_checkpoint else None
    values = checkpoint.features.get("artifact", {}) if is_checkpoint else {}
    request = PersistRequest(
        kind=kind,
        key=key,
        local_path=staged,
        run_uid=checkpoint.run_uid,
        description=describe(kind, trainer),
        is_run_input=kind == "config",
        is_run_output=is_checkpoint,
        callback_id=checkpoint.state_key,
        features=resolve_artifact_features(trainer, values),
        auto_features=auto_features(checkpoint, score, standing),
        ranking={k: v for k, v in ranking.items() if k != key},
    )
    fields = event_fields(checkpoint, trainer, ranking, score, standing)
    return PendingSave(request, original, fields, seq)


def describe(kind: ArtifactKind, trainer: pl.Trainer) -> str:
    """The artifact's description; a checkpoint's names its epoch and step,
    which its file name may not (``last.ckpt``, a custom ``filename``)."""
    from lamin_lightning_core._delivery import DESCRIPTIONS

    if kind != "checkpoint":
        return DESCRIPTIONS[kind]
    epoch, step = trainer.current_epoch, trainer.global_step
    return f"{DESCRIPTIONS[kind]}, epoch {epoch}, step {step}"
