"""What the callback reads from a Lightning trainer: logger layout, files, score."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lamin_lightning_core import _keys

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from concurrent.futures import Executor, Future

    import lightning.pytorch as pl


def logger_layout(trainer: pl.Trainer) -> _keys.LoggerLayout | None:
    """Where the trainer's first logger writes, or ``None`` without a logger."""
    if not trainer.loggers:
        return None
    logger = trainer.loggers[0]
    save_dir = logger.save_dir if logger.save_dir is not None else None
    return _keys.LoggerLayout(
        save_dir=save_dir or trainer.default_root_dir,
        name=logger.name,
        version=logger.version,
    )


def hparams_file(trainer: pl.Trainer) -> tuple[Path, tuple[int, int]] | None:
    """The ``hparams.yaml`` of the first logger with a log folder, if written.

    Returns:
        The path and its ``(mtime_ns, size)``, or ``None`` if there is none.
    """
    for logger in trainer.loggers:
        log_dir = getattr(logger, "log_dir", None)
        if isinstance(log_dir, str):
            path = Path(log_dir) / _keys.HPARAMS_FILENAME
            try:
                stat = path.stat()  # one system call: this runs at every save
            except FileNotFoundError:
                return None
            return path, (stat.st_mtime_ns, stat.st_size)
    return None


def relative_to_dirpath(path: str | Path, dirpath: str | Path | None) -> str:
    """``path`` relative to the checkpoint folder, or its name if outside."""
    if dirpath is not None:
        # Lightning joins dirpath and the file name: the lexical match is the
        # common case and costs no system call on the training thread.
        for absolute in (os.path.abspath, os.path.realpath):
            try:
                relative = Path(absolute(path)).relative_to(absolute(dirpath))
            except ValueError:
                continue
            return relative.as_posix()
    return Path(path).name


def score(value: Any) -> float | None:
    """A monitored value as a float, or ``None`` if missing or not finite."""
    if value is None:
        return None
    number = float(value)
    # Lightning replaces a NaN score with +-inf to compare it; neither is a score.
    return number if math.isfinite(number) else None


def background_writer(trainer: pl.Trainer) -> Executor | None:
    """The thread Lightning's ``AsyncCheckpointIO`` writes files on, if any.

    ``AsyncCheckpointIO`` returns from a save before the file is written, on
    a one-thread executor. Work submitted there after a save runs once that
    file is complete, in order.
    """
    from lightning.pytorch.plugins.io import AsyncCheckpointIO

    io = getattr(trainer.strategy, "checkpoint_io", None)
    if not isinstance(io, AsyncCheckpointIO):
        return None
    # Lightning keeps the executor private; it exists after the first save.
    executor: Executor | None = getattr(io, "_executor", None)
    return executor


def log_failed_removal(removal: Future[None]) -> None:
    """Log the error of a removal that ran on a background writer, if any."""
    error = removal.exception()
    if error is not None:
        log.error("Could not remove an evicted checkpoint: %r", error)
