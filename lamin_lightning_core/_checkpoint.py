"""``Checkpoint``: a thin ``ModelCheckpoint`` that publishes what it writes."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightning.pytorch.callbacks import ModelCheckpoint
from typing_extensions import override

from lamin_lightning_core import _annotations, _keys
from lamin_lightning_core._bus import DeliveryFailure, create_bus
from lamin_lightning_core._events import (
    ArtifactRemovedEvent,
    ArtifactSavedEvent,
    BackendRunLink,
    FitEndedEvent,
    FitStartedEvent,
    FitStatus,
    PersistRequest,
    check_kind,
)
from lamin_lightning_core._observers import ObserverPlugin, check_observer
from lamin_lightning_core._ranking import Ranking

if TYPE_CHECKING:
    import lightning.pytorch as pl
    import pluggy

    from lamin_lightning_core._events import (
        ArtifactKind,
        CheckpointRank,
        FeatureValue,
    )

log = logging.getLogger(__name__)

_DESCRIPTIONS = {
    "checkpoint": "Lightning model checkpoint",
    "config": "LightningCLI config",
    "hparams": "Lightning hparams.yaml",
}


class Checkpoint(ModelCheckpoint):
    """Save checkpoints like ``ModelCheckpoint`` and publish each as an artifact.

    Every checkpoint file, Lightning's ``hparams.yaml`` and (with
    :class:`SaveConfigCallback`) the LightningCLI config is handed to the
    persister (LaminDB when installed, else the file stays where it is), then
    announced to bus plugins, observers and :meth:`on_artifact_saved`.

    Args:
        *args: positional arguments of ``ModelCheckpoint``.
        features: ``{"run": {...}, "artifact": {...}}`` feature values to
            annotate the tracked run and each checkpoint with.
        run_uid_is_version: use the tracked run's UID instead of the logger's
            ``version_N`` in artifact keys.
        artifact_observers: objects with ``on_artifact_saved(event)`` and/or
            ``on_artifact_removed(event)``.
        plugins: plugin objects with ``hookimpl`` methods, added to those
            installed through the ``lamin_lightning`` entry-point group.
        disable_plugins: names of installed plugins to switch off.
        **kwargs: keyword arguments of ``ModelCheckpoint`` (``monitor``,
            ``mode``, ``save_top_k``, ``dirpath``, ``filename``, ...).

    Raises:
        ValueError: if ``features`` has keys other than ``run``/``artifact``.
        PluginLoadError: if an installed plugin fails to import or validate.
    """

    def __init__(
        self,
        *args: Any,
        features: dict[str, dict[str, Any]] | None = None,
        run_uid_is_version: bool = True,
        artifact_observers: Sequence[Any] | None = None,
        plugins: Sequence[Any] | None = None,
        disable_plugins: Sequence[str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.features = _annotations.check_features(features)
        self.run_uid_is_version = run_uid_is_version
        self._user_dirpath = kwargs.get("dirpath", args[0] if args else None)
        for observer in artifact_observers or ():
            check_observer(observer)
        self._bus = create_bus(plugins=plugins or (), disable=disable_plugins or ())
        for observer in artifact_observers or ():
            self._bus.register(ObserverPlugin(observer))
        self._bus.register(ObserverPlugin(self), name=f"{type(self).__name__}-hooks")
        self._base_prefix: str | None = None
        self._run_uid: str | None = None
        self._fit_status: FitStatus | None = None
        self._saved: dict[str, ArtifactSavedEvent] = {}
        self._last: dict[str, ArtifactSavedEvent] = {}
        self._last_event: ArtifactSavedEvent | ArtifactRemovedEvent | None = None
        self._hparams_stamp: tuple[int, int] | None = None
        self._ranking = Ranking(self.mode)  # type: ignore[arg-type]
        self._backend_runs: list[BackendRunLink] = []

    # -- subclass hooks -------------------------------------------------------

    def on_artifact_saved(self, event: ArtifactSavedEvent) -> None:
        """Called on rank zero after each artifact is persisted; override it."""

    def on_artifact_removed(self, event: ArtifactRemovedEvent) -> None:
        """Called on rank zero after an evicted checkpoint is removed."""

    # -- public state ---------------------------------------------------------

    @property
    def plugin_manager(self) -> pluggy.PluginManager:
        """The pluggy manager of this callback; register more plugins on it."""
        return self._bus.manager

    @property
    def delivery_failures(self) -> list[DeliveryFailure]:
        """Broadcasts that a plugin or observer failed to handle."""
        return list(self._bus.failures)

    @property
    def backend_runs(self) -> list[BackendRunLink]:
        """Runs of other tracking systems that registrars opened for this fit."""
        return list(self._backend_runs)

    @property
    def run_uid(self) -> str | None:
        """UID of the tracked run, known after ``setup()``."""
        return self._run_uid

    @property
    def base_prefix(self) -> str:
        """Key prefix of this callback's config; checkpoints sit below it.

        Raises:
            RuntimeError: before ``setup()`` (before ``trainer.fit`` starts).
        """
        if self._base_prefix is None:
            raise RuntimeError(
                "base_prefix is known once the trainer has set the callback up; "
                "read it during or after trainer.fit()."
            )
        return self._base_prefix

    @property
    def checkpoint_key_prefix(self) -> str:
        """``{base_prefix}/checkpoints``: the prefix of checkpoint keys."""
        return _keys.checkpoint_key_prefix(self.base_prefix)

    @property
    def last_checkpoint_artifact(self) -> Any:
        """The record of the newest persisted checkpoint, or ``None``."""
        return self._last_artifact("checkpoint")

    @property
    def last_config_artifact(self) -> Any:
        """The record of the persisted LightningCLI config, or ``None``."""
        return self._last_artifact("config")

    @property
    def last_hparams_artifact(self) -> Any:
        """The record of the persisted ``hparams.yaml``, or ``None``."""
        return self._last_artifact("hparams")

    @property
    def last_artifact_event(self) -> ArtifactSavedEvent | ArtifactRemovedEvent | None:
        """The newest event of any kind this callback emitted."""
        return self._last_event

    def last_event(self, kind: ArtifactKind) -> ArtifactSavedEvent | None:
        """The newest saved event of ``kind``."""
        return self._last.get(check_kind(kind))

    def _last_artifact(self, kind: str) -> Any:
        event = self._last.get(kind)
        return None if event is None else event.artifact

    # -- Lightning hooks -------------------------------------------------------

    @override
    def setup(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str
    ) -> None:
        super().setup(trainer, pl_module, stage)
        self.resolve_prefix(trainer)
        if stage == "fit" and trainer.is_global_zero:
            started = self._fit_started(trainer, pl_module)
            self._bus.prepare_run(started)
            self._fit_status = "finished"
            results = self._bus.broadcast("lamin_lightning_fit_started", started)
            self._backend_runs = [r for r in results if isinstance(r, BackendRunLink)]
            if self._backend_runs:
                self._bus.link_backend_runs(self._run_uid, self._backend_runs)

    @override
    def on_exception(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        exception: BaseException,
    ) -> None:
        interrupted = isinstance(exception, KeyboardInterrupt)
        self._fit_status = "interrupted" if interrupted else "failed"

    @override
    def teardown(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str
    ) -> None:
        super().teardown(trainer, pl_module, stage)
        if self._fit_status is None or not trainer.is_global_zero:
            return
        self._publish_hparams(trainer)
        event = FitEndedEvent(
            callback_id=self.state_key, run_uid=self._run_uid, status=self._fit_status
        )
        self._fit_status = None
        self._bus.broadcast("lamin_lightning_fit_ended", event)

    @override
    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        if not trainer.is_global_zero:
            return
        self.save_artifact(trainer, filepath, "checkpoint")
        self._publish_hparams(trainer)

    @override
    def _remove_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        super()._remove_checkpoint(trainer, filepath)
        if not trainer.is_global_zero:
            return
        saved = self._saved.pop(str(Path(filepath).resolve()), None)
        if saved is None:
            return  # not ours: a file of another run, or never persisted
        removed = ArtifactRemovedEvent(
            **saved.model_dump(
                include={"callback_id", "run_uid", "kind", "key", "local_path"}
            ),
            storage_uri=saved.storage_uri,
            artifact=saved.artifact,
            artifact_uid=saved.artifact_uid,
            epoch=saved.epoch,
            global_step=saved.global_step,
            ranking=self._ranking.remove(saved.key),
        )
        self._bus.delete(removed)
        self._last_event = removed
        log.info("Removed evicted checkpoint %s", removed.key)
        self._bus.broadcast("lamin_lightning_artifact_removed", removed)

    # -- publishing ------------------------------------------------------------

    def resolve_prefix(self, trainer: pl.Trainer) -> str:
        """Derive the base key prefix once per fit, identically on every rank.

        Collective under distributed strategies: call it on all ranks.
        """
        uid = self._bus.run_uid() if trainer.is_global_zero else None
        prefix = _keys.base_prefix(
            dirpath=self._user_dirpath,
            logger=_logger_layout(trainer),
            run_uid=uid,
            run_uid_is_version=self.run_uid_is_version,
        )
        self._base_prefix, self._run_uid = trainer.strategy.broadcast((prefix, uid))
        log.debug("Artifact key prefix: %r (run %s)", self._base_prefix, uid)
        return self._base_prefix

    def key_for(self, kind: ArtifactKind, local_path: str | Path) -> str:
        """The artifact key of a file of ``kind`` written by this callback."""
        base = self.base_prefix
        if check_kind(kind) == "config":
            return _keys.config_key(base, Path(local_path).name)
        if kind == "hparams":
            return _keys.hparams_key(base)
        return _keys.checkpoint_key(base, self._relative_to_dirpath(local_path))

    def save_artifact(
        self, trainer: pl.Trainer, local_path: str | Path, kind: ArtifactKind
    ) -> ArtifactSavedEvent:
        """Persist a file and announce it; rank zero only.

        Raises:
            ValueError: for an unknown ``kind``.
            PersistError: if the persister failed (the file stays on disk).
        """
        path = Path(local_path).resolve()
        key = self.key_for(kind, path)
        is_checkpoint = kind == "checkpoint"
        score = _as_float(self.current_score) if is_checkpoint else None
        ranking = self._ranking.add(key, score) if is_checkpoint else {}
        standing = self._ranking.standing(key) if is_checkpoint else None
        features = self._artifact_features(trainer) if is_checkpoint else {}
        try:
            persisted = self._bus.persist(
                PersistRequest(
                    kind=kind,
                    key=key,
                    local_path=path,
                    run_uid=self._run_uid,
                    description=_DESCRIPTIONS[kind],
                    is_run_input=kind == "config",
                    is_run_output=is_checkpoint,
                    callback_id=self.state_key,
                    features=features,
                    auto_features=self._auto_features(score, standing),
                    ranking={k: v for k, v in ranking.items() if k != key},
                )
            )
        except Exception:
            if is_checkpoint:
                self._ranking.remove(key)
            raise
        event = ArtifactSavedEvent(
            callback_id=self.state_key,
            run_uid=self._run_uid,
            kind=kind,
            key=key,
            local_path=path,
            storage_uri=persisted.storage_uri,
            artifact=persisted.artifact,
            artifact_uid=persisted.artifact_uid,
            epoch=trainer.current_epoch,
            global_step=trainer.global_step,
            ranking=ranking,
            monitor=self.monitor if is_checkpoint else None,
            score=score,
            is_best=standing is not None and standing.is_best_model,
            mode=self.mode if is_checkpoint else None,  # type: ignore[arg-type]
            save_weights_only=self.save_weights_only if is_checkpoint else None,
            features=features,
        )
        if is_checkpoint:
            self._saved[str(path)] = event
        self._last[kind] = event
        self._last_event = event
        log.info("Persisted %s %s at %s", kind, key, event.storage_uri)
        self._bus.broadcast("lamin_lightning_artifact_saved", event)
        return event

    def _publish_hparams(self, trainer: pl.Trainer) -> None:
        # Loggers write hparams.yaml at the start of fit and may rewrite it;
        # publish it whenever its size or mtime changed since we last did.
        path = _hparams_file(trainer)
        if path is None or not path.is_file():
            return
        stat = path.stat()
        stamp = (stat.st_mtime_ns, stat.st_size)
        if stamp != self._hparams_stamp:
            self._hparams_stamp = stamp
            self.save_artifact(trainer, path, "hparams")

    def _relative_to_dirpath(self, local_path: str | Path) -> str:
        path = Path(local_path).resolve()
        if self.dirpath is not None:
            try:
                return path.relative_to(Path(self.dirpath).resolve()).as_posix()
            except ValueError:
                pass
        return path.name

    def _artifact_features(self, trainer: pl.Trainer) -> dict[str, FeatureValue]:
        values = self.features.get("artifact", {})
        return _annotations.resolve_artifact_features(trainer, values)

    def _auto_features(
        self, score: float | None, standing: CheckpointRank | None
    ) -> dict[str, FeatureValue]:
        if standing is None:
            return {}
        return {
            "score": score,
            "monitor": self.monitor,
            "mode": self.mode,
            "save_weights_only": self.save_weights_only,
            **standing.model_dump(),
        }

    def _fit_started(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule
    ) -> FitStartedEvent:
        layout = _logger_layout(trainer)
        config = _annotations.trainer_config(trainer, layout, self.monitor, self.mode)
        return FitStartedEvent(
            callback_id=self.state_key,
            run_uid=self._run_uid,
            base_prefix=self.base_prefix,
            checkpoint_key_prefix=self.checkpoint_key_prefix,
            logger_name=layout.name if layout else None,
            logger_version=_keys.version_segment(layout.version) if layout else None,
            monitor=self.monitor,
            mode=self.mode,  # type: ignore[arg-type]
            run_features=self.features.get("run", {}),
            artifact_features=self.features.get("artifact", {}),
            trainer_config=config,
            hyperparameters=_annotations.hyperparameters(pl_module, trainer),
        )


def _logger_layout(trainer: pl.Trainer) -> _keys.LoggerLayout | None:
    if not trainer.loggers:
        return None
    logger = trainer.loggers[0]
    save_dir = logger.save_dir if logger.save_dir is not None else None
    return _keys.LoggerLayout(
        save_dir=save_dir or trainer.default_root_dir,
        name=logger.name,
        version=logger.version,
    )


def _hparams_file(trainer: pl.Trainer) -> Path | None:
    for logger in trainer.loggers:
        log_dir = getattr(logger, "log_dir", None)
        if isinstance(log_dir, str):
            return Path(log_dir) / _keys.HPARAMS_FILENAME
    return None


def _as_float(value: Any) -> float | None:
    if value is None:
        return None
    number = float(value)
    # Lightning replaces a NaN score with +-inf to compare it; neither is a score.
    return number if math.isfinite(number) else None
