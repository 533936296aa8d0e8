"""Checks of ``Checkpoint`` arguments that would otherwise fail mid-fit.

Each check runs before the first training step (at construction or in
``setup``) and raises an error naming the argument at fault and how to fix it;
:func:`warn_unlogged_monitor` runs when the fit ends, for the one mistake
that only shows then.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from lamin_lightning_core._errors import LaminLightningWarning

if TYPE_CHECKING:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

NAME_MAX = 255
"""Bytes in one file name on ext4, XFS, APFS and most other file systems."""


def check_text(argument: str, value: str | os.PathLike[str] | None) -> None:
    """Reject text that cannot be encoded as UTF-8.

    Python keeps undecodable bytes of a path as lone surrogates (``\\udcff``);
    keys, JSON events and every backend need real text.

    Raises:
        ValueError: naming the argument and the first offending character.
    """
    if value is None:
        return
    text = os.fspath(value)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(
            f"Checkpoint({argument}={text!r}) is not valid UTF-8: "
            f"{text[error.start : error.end]!r} at position {error.start} is an "
            "undecodable byte. Artifact keys and events are text; use a "
            f"{argument} of UTF-8 characters only."
        ) from None


def check_filename(callback: ModelCheckpoint) -> None:
    """Reject a ``filename`` whose checkpoint names cannot be written.

    Metrics missing from the template format as ``0``, so the name checked is
    the shortest the template can produce.

    Raises:
        ValueError: if it is not UTF-8, or a part of it exceeds ``NAME_MAX``.
    """
    check_text("filename", callback.filename)
    formatted = callback.format_checkpoint_name({})
    if callback.dirpath:
        formatted = os.path.relpath(formatted, callback.dirpath)
    longest = max(formatted.replace(os.sep, "/").split("/"), key=_size)
    if _size(longest) > NAME_MAX:
        shown = repr(callback.filename)
        shown = shown if len(shown) <= 60 else f"{shown[:40]}...{shown[-12:]}"
        raise ValueError(
            f"Checkpoint(filename={shown}) makes file names of at "
            f"least {_size(longest)} bytes, over the {NAME_MAX}-byte limit of a "
            "file name on most file systems: the first save would fail with "
            "'File name too long'. Use a shorter filename."
        )


def check_worker_options(*, asynchronous: bool, coalesce: bool) -> None:
    """Warn about ``coalesce=True`` where it cannot do anything."""
    if coalesce and not asynchronous:
        warnings.warn(
            "Checkpoint(coalesce=True) has no effect with asynchronous=False: "
            "each save is persisted before the next one, so none is ever "
            "waiting when top-k eviction deletes it. Drop coalesce=True, or "
            "persist in the background (asynchronous=True, the default).",
            LaminLightningWarning,
            stacklevel=3,
        )


def check_dirpath(dirpath: str | os.PathLike[str] | None) -> None:
    """Reject a local ``dirpath`` that cannot be created or written to.

    Nothing is created; a remote ``dirpath`` (``s3://...``) is left to
    Lightning.

    Raises:
        NotADirectoryError: if a file stands where a folder of the path is.
        PermissionError: if the nearest existing folder is not writable.
    """
    if dirpath is None:
        return
    text = os.fspath(dirpath)
    if "://" in text and not text.startswith("file://"):
        return
    path = Path(text.removeprefix("file://")).absolute()
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    fix = (
        "Pass Checkpoint(dirpath=...) in a writable folder (without dirpath, "
        "it follows the logger's save_dir or the trainer's default_root_dir)."
    )
    if not existing.is_dir():
        raise NotADirectoryError(
            f"Cannot save checkpoints in {path}: {existing} is a file, not a "
            f"folder. {fix}"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(
            f"Cannot save checkpoints in {path}: {existing} is not writable by "
            f"this user. {fix}"
        )


def warn_unlogged_monitor(callback: ModelCheckpoint, trainer: pl.Trainer) -> None:
    """Warn if ``monitor`` was never logged and so nothing was saved.

    Lightning puts a step-interval save whose monitor is missing off until a
    validation loop; without one it saves nothing and says nothing.
    """
    monitor = callback.monitor
    if monitor is None or monitor in trainer.callback_metrics:
        return
    if callback.best_k_models or callback.last_model_path:
        return
    logged = ", ".join(sorted(trainer.callback_metrics)) or "none"
    warnings.warn(
        f"Checkpoint(monitor={monitor!r}) saved nothing: {monitor!r} was never "
        f"logged (logged metrics: {logged}). Log it with "
        f"self.log({monitor!r}, ...) in your LightningModule, or fix the name.",
        LaminLightningWarning,
        stacklevel=2,
    )


def _size(name: str) -> int:
    return len(name.encode("utf-8", "surrogateescape"))
