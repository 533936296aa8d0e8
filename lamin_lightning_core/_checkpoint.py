"""``Checkpoint``: a thin ``ModelCheckpoint`` that publishes what it writes.

Each save is split in two. On the training thread, right after Lightning wrote
the file, the callback takes what depends on that moment (key, score, ranking,
feature values, epoch and step) and stages the file (``_staging``). A worker
thread (``_worker``) then persists it, builds the event and broadcasts it, in
save order. With ``asynchronous=False`` the same job runs inline.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightning.pytorch.callbacks import ModelCheckpoint
from typing_extensions import override

from lamin_lightning_core import _keys, _preflight, _trainer
from lamin_lightning_core._journal import Journal, journal_dir
from lamin_lightning_core._keys import check_kind
from lamin_lightning_core._observers import ObserverPlugin, check_observer
from lamin_lightning_core._staging import Stager
from lamin_lightning_core._worker import Worker

# pydantic, the event models and the installed plugins load with the first
# Checkpoint(), not on import: DataLoader workers re-importing a script skip them.

if TYPE_CHECKING:
    from collections.abc import Callable
    from concurrent.futures import Future

    import lightning.pytorch as pl
    import pluggy

    from lamin_lightning_core._bus import DeliveryFailure, Retry
    from lamin_lightning_core._errors import PersistError
    from lamin_lightning_core._events import (
        ArtifactRemovedEvent,
        ArtifactSavedEvent,
        BackendRunLink,
        FitStatus,
    )
    from lamin_lightning_core._keys import ArtifactKind

log = logging.getLogger(__name__)


class Checkpoint(ModelCheckpoint):
    """Save checkpoints like ``ModelCheckpoint`` and publish each as an artifact.

    Every checkpoint file, Lightning's ``hparams.yaml`` and (with
    :class:`SaveConfigCallback`) the LightningCLI config is handed to the
    persister (LaminDB when installed, else the file stays where it is), then
    announced to bus plugins, observers and :meth:`on_artifact_saved`.

    By default this happens on a background thread, one per callback, where
    persister hooks, registrars, observers and the subclass hooks run (all
    but ``fit_started`` and ``fit_ended``). Right after Lightning writes a
    file, the training thread hard-links it into ``.lamin-lightning-staging/``
    so top-k eviction cannot delete it before it is persisted. ``trainer.fit``
    returns once everything is persisted and announced, also when the fit
    fails or is interrupted. Events of one key arrive in save order; a
    removed event never overtakes its saved event.

    Nothing is lost when a backend fails: each save and removal is written to
    a journal beside ``dirpath`` first, transient errors are retried, and a
    failing plugin (or persister, unless ``strict``) never stops training.
    ``lamin-lightning replay`` or the next fit in ``dirpath`` delivers what
    the journal misses (see the reliability guide).

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
        asynchronous: persist and announce on a background thread. With
            ``False`` each save is persisted and announced before Lightning's
            save returns, on the training thread.
        max_pending: with ``asynchronous``, how many saves may wait while one
            is persisted. A further save blocks training until one is done, so
            a slow backend slows training down instead of filling the disk
            with staged files.
        coalesce: with ``asynchronous``, skip a checkpoint that top-k
            eviction deleted before its turn came: neither it nor its removal
            is persisted or announced. Worth it when uploads are slow. The
            persister ends with the same ranks and flags, but while the
            worker catches up they may briefly not add up.
        strict: fail the fit when the persister fails (at the next save or
            when training ends), instead of logging it and going on.
        retry: how often transient plugin errors are retried (default: 3
            calls, 0.5 s then 1 s apart).
        **kwargs: keyword arguments of ``ModelCheckpoint`` (``monitor``,
            ``mode``, ``save_top_k``, ``dirpath``, ``filename``, ...).

    Raises:
        ValueError: if ``features`` has keys other than ``run``/``artifact``,
            ``max_pending`` is negative, ``dirpath`` or ``filename`` is not
            UTF-8, or ``filename`` makes names over 255 bytes.
        PluginLoadError: if an installed plugin fails to import or validate.
        NotADirectoryError: in ``setup``, if a file stands where a folder of
            ``dirpath`` should be; PermissionError if it is not writable.
    """

    def __init__(
        self,
        *args: Any,
        features: dict[str, dict[str, Any]] | None = None,
        run_uid_is_version: bool = True,
        artifact_observers: Sequence[Any] | None = None,
        plugins: Sequence[Any] | None = None,
        disable_plugins: Sequence[str] | None = None,
        asynchronous: bool = True,
        coalesce: bool = False,
        max_pending: int = 4,
        strict: bool = False,
        retry: Retry | None = None,
        **kwargs: Any,
    ) -> None:
        from lamin_lightning_core._annotations import check_features
        from lamin_lightning_core._bus import create_bus
        from lamin_lightning_core._delivery import Delivery
        from lamin_lightning_core._ranking import Ranking

        super().__init__(*args, **kwargs)
        self.features = check_features(features)
        self.run_uid_is_version = run_uid_is_version
        self.asynchronous = asynchronous
        self.coalesce = coalesce
        self.strict = strict
        self._user_dirpath = kwargs.get("dirpath", args[0] if args else None)
        _preflight.check_text("dirpath", self._user_dirpath)
        _preflight.check_filename(self)
        _preflight.check_worker_options(asynchronous=asynchronous, coalesce=coalesce)
        for observer in artifact_observers or ():
            check_observer(observer)
        self._bus = create_bus(
            plugins=plugins or (), disable=disable_plugins or (), retry=retry
        )
        for observer in artifact_observers or ():
            self._bus.register(ObserverPlugin(observer))
        self._bus.register(ObserverPlugin(self), name=f"{type(self).__name__}-hooks")
        self._worker = Worker(
            "lamin-lightning-checkpoint",
            max_pending=max_pending,
            synchronous=not asynchronous,
        )
        self._stager = Stager(enabled=asynchronous)
        self._base_prefix: str | None = None
        self._run_uid: str | None = None
        self._fit_status: FitStatus | None = None
        self._journal = Journal()
        self._delivery = Delivery(
            self._bus,
            self._stager,
            self._journal,
            cancellable=asynchronous and coalesce,
        )
        self._staged_keys: dict[Path, tuple[str, int]] = {}
        self._hparams_stamp: tuple[int, int] | None = None
        self._ranking = Ranking(self.mode)  # type: ignore[arg-type]
        self._backend_runs: list[BackendRunLink] = []

    # -- subclass hooks -------------------------------------------------------

    def on_artifact_saved(self, event: ArtifactSavedEvent) -> None:
        """Called on rank zero after each artifact is persisted; override it.

        Runs on the background thread unless ``asynchronous=False``."""

    def on_artifact_removed(self, event: ArtifactRemovedEvent) -> None:
        """Called on rank zero after an evicted checkpoint is removed.

        Runs on the background thread unless ``asynchronous=False``."""

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
    def persist_failures(self) -> list[PersistError]:
        """Files the persister failed to store (``strict=False``); they are
        still on disk and pending in the journal."""
        return list(self._delivery.persist_failures)

    @property
    def journal_path(self) -> Path | None:
        """The journal file of the current or last fit, on rank zero."""
        return self._journal.path

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
        """The record of the newest delivered checkpoint, or ``None``.

        Like every ``last_*`` accessor it reflects the events delivered so far:
        during an asynchronous fit it lags behind the training thread; after
        ``trainer.fit`` returns (or :meth:`flush`) it is final.
        """
        return self._last_artifact("checkpoint")

    @property
    def last_config_artifact(self) -> Any:
        """The record of the delivered LightningCLI config, or ``None``."""
        return self._last_artifact("config")

    @property
    def last_hparams_artifact(self) -> Any:
        """The record of the delivered ``hparams.yaml``, or ``None``."""
        return self._last_artifact("hparams")

    @property
    def last_artifact_event(self) -> ArtifactSavedEvent | ArtifactRemovedEvent | None:
        """The newest event of any kind this callback delivered."""
        return self._delivery.last_event

    def last_event(self, kind: ArtifactKind) -> ArtifactSavedEvent | None:
        """The newest delivered saved event of ``kind``."""
        return self._delivery.last.get(check_kind(kind))

    def _last_artifact(self, kind: str) -> Any:
        event = self._delivery.last.get(kind)
        return None if event is None else event.artifact

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every save and removal so far is persisted and announced.

        ``trainer.fit`` does this before it returns; call it yourself after
        :meth:`save_artifact` outside a fit, which also ends the background
        thread (the next save starts it again). A progress bar appears on
        stderr if it takes more than a second.

        Args:
            timeout: seconds to wait at most; ``None`` waits until done.

        Returns:
            ``True`` once everything is delivered, ``False`` on timeout.

        Raises:
            PersistError: if a persister failed in the background; the message
                names the plugin and the staged file, which is kept.
        """
        done = self._worker.flush(timeout)
        if done and self._fit_status is None:
            self._worker.stop()
        return done

    # -- Lightning hooks -------------------------------------------------------

    @override
    def setup(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str
    ) -> None:
        super().setup(trainer, pl_module, stage)
        if trainer.is_global_zero:
            # The run is prepared on this thread: let the worker finish the
            # config SaveConfigCallback queued, so that only one thread talks
            # to the backend at a time.
            self.flush()
        self.resolve_prefix(trainer)
        if stage == "fit" and trainer.is_global_zero:
            from lamin_lightning_core._annotations import fit_started
            from lamin_lightning_core._events import BackendRunLink
            from lamin_lightning_core._replay import resume

            _preflight.check_dirpath(self.dirpath)
            directory = journal_dir(Path(self.dirpath or "."))
            resume(directory, self._bus)
            self._journal.open(directory, self._run_uid)
            started = fit_started(self, trainer, pl_module)
            self._bus.prepare_run(started)
            self._fit_status = "finished"
            results = self._bus.broadcast("lamin_lightning_fit_started", started)
            self._backend_runs = [r for r in results if isinstance(r, BackendRunLink)]
            if self._backend_runs:
                self._bus.link_backend_runs(self._run_uid, self._backend_runs)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        if trainer.is_global_zero:
            self.flush()  # a background failure fails the fit here, loudly

    @override
    def on_exception(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        exception: BaseException,
    ) -> None:
        # Lightning calls no teardown hook after an exception: end here.
        if self._fit_status is not None:
            interrupted = isinstance(exception, KeyboardInterrupt)
            self._fit_status = "interrupted" if interrupted else "failed"
        try:
            super().on_exception(trainer, pl_module, exception)
        finally:
            if trainer.is_global_zero:
                self._end_fit(failing=True)

    @override
    def teardown(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str
    ) -> None:
        super().teardown(trainer, pl_module, stage)
        if not trainer.is_global_zero:
            return
        if self._fit_status is not None:
            self._publish_hparams(trainer)
            _preflight.warn_unlogged_monitor(self, trainer)
        self._end_fit(failing=False)

    @override
    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        path = Path(os.path.abspath(filepath))  # no system call, unlike resolve()
        if trainer.is_global_zero:
            # Before super(): a file Lightning saves again under the same name
            # (last.ckpt) may still be staged; unlink it so the new bytes go
            # to a new file and the staged ones stay as they were.
            self._stager.detach(path)
        super()._save_checkpoint(trainer, filepath)
        if not trainer.is_global_zero:
            return
        self.save_artifact(trainer, path, "checkpoint")
        self._publish_hparams(trainer)

    @override
    def _remove_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        writer = _trainer.background_writer(trainer)
        if writer is None:
            super()._remove_checkpoint(trainer, filepath)
        else:
            # AsyncCheckpointIO may not have written the file yet; removed
            # now, it would come back once written. Remove it after the write.
            removal = writer.submit(super()._remove_checkpoint, trainer, filepath)
            removal.add_done_callback(_trainer.log_failed_removal)
        if not trainer.is_global_zero:
            return
        path = Path(os.path.abspath(filepath))
        staged = self._staged_keys.pop(path, None)
        if staged is None:
            return  # not ours: a file of another run
        key, save_seq = staged
        ranking = self._ranking.remove(key)
        seq = self._journal.next_seq()
        ranks = {k: v.model_dump() for k, v in ranking.items()}
        self._journal.write("remove", seq, save=save_seq, key=key, ranking=ranks)
        if self._delivery.waiting.cancel(save_seq, key, ranking):
            return  # coalesce: its save had not started, so both are dropped
        self._worker.submit(lambda: self._delivery.queue_removal(seq, path, ranking))

    # -- publishing: training thread ------------------------------------------

    def resolve_prefix(self, trainer: pl.Trainer) -> str:
        """Derive the base key prefix once per fit, identically on every rank.

        Collective under distributed strategies: call it on all ranks.
        """
        uid = self._bus.run_uid() if trainer.is_global_zero else None
        prefix = _keys.base_prefix(
            dirpath=self._user_dirpath,
            logger=_trainer.logger_layout(trainer),
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
        relative = _trainer.relative_to_dirpath(local_path, self.dirpath)
        return _keys.checkpoint_key(base, relative)

    def save_artifact(
        self, trainer: pl.Trainer, local_path: str | Path, kind: ArtifactKind
    ) -> Future[ArtifactSavedEvent | None]:
        """Persist a file and announce it; rank zero only.

        Key, score, ranking and feature values are taken now. The file is
        persisted and announced on the background thread, after everything
        submitted before it (with ``asynchronous=False``: before this
        returns).

        Returns:
            A future of the saved event; already done if synchronous. Its
            result is ``None`` if the persister failed and ``strict`` is off.

        Raises:
            ValueError: for an unknown ``kind``.
            PersistError: with ``strict``, if the persister failed: for this
                file if synchronous, else for an earlier file whose failure
                was not raised yet (the staged file stays on disk either way).
        """
        path = Path(os.path.abspath(local_path))
        return self._worker.submit(lambda: self._stage_save(trainer, path, kind))

    def _stage_save(
        self, trainer: pl.Trainer, path: Path, kind: ArtifactKind
    ) -> Callable[[], ArtifactSavedEvent | None]:
        from lamin_lightning_core._annotations import pending_save

        key = self.key_for(kind, path)
        is_checkpoint = kind == "checkpoint"
        writer = _trainer.background_writer(trainer) if is_checkpoint else None
        staged, written = self._stager.stage_after(path, writer, link=is_checkpoint)
        score = _trainer.score(self.current_score) if is_checkpoint else None
        ranking = self._ranking.add(key, score) if is_checkpoint else {}
        seq = self._journal.next_seq()
        if is_checkpoint:
            self._staged_keys[path] = (key, seq)
        pending = pending_save(
            self, trainer, kind, key, staged, path, seq, score, ranking
        )
        self._journal.write("save", seq, **pending.to_record())
        return self._delivery.queue_save(pending, written, self.strict)

    def _publish_hparams(self, trainer: pl.Trainer) -> None:
        # Loggers write hparams.yaml at the start of fit and may rewrite it;
        # publish it whenever its size or mtime changed since we last did.
        found = _trainer.hparams_file(trainer)
        if found is not None and found[1] != self._hparams_stamp:
            self._hparams_stamp = found[1]
            self.save_artifact(trainer, found[0], "hparams")

    def _end_fit(self, *, failing: bool) -> None:
        from lamin_lightning_core._events import CheckpointQuery, FitEndedEvent

        try:
            self.flush()
        except Exception as error:
            if not failing:
                raise  # on_exception follows and ends the fit
            log.error("While the fit was failing: %s", error, exc_info=error)
        self._worker.stop()
        self._journal.close()
        self._stager.cleanup()
        if self._fit_status is not None and not failing:
            from lamin_lightning_core._table import log_summary  # imports rich

            query = CheckpointQuery(key_prefix=self.checkpoint_key_prefix)
            log_summary(self._bus.manager, query)
        if self._fit_status is not None:
            event = FitEndedEvent(
                callback_id=self.state_key,
                run_uid=self._run_uid,
                status=self._fit_status,
            )
            self._fit_status = None
            self._bus.broadcast("lamin_lightning_fit_ended", event)
