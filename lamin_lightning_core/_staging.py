"""Staging: keep the bytes of a saved file until the worker has persisted them.

Lightning deletes an evicted top-k checkpoint right after it saved a better
one, and rewrites ``last.ckpt`` under the same name; either may happen while
the background worker has not read the file yet. Before handing a file to the
worker, the training thread gives it a second name in a staging folder next
to it, ``<folder>/.lamin-lightning-staging/<unique prefix>-<name>``:

* checkpoints get a hard link: O(1) whatever their size, no second copy of the
  bytes. Lightning replaces files by renaming a new file over the old name,
  which leaves the link's bytes alone; for writers that truncate in place,
  :meth:`Stager.detach` drops the old name before Lightning writes again.
  Where the filesystem refuses hard links, the file is copied instead;
* ``hparams.yaml`` and the LightningCLI config are small and rewritten in place
  by loggers, so they are always copied.

A sharded checkpoint (a directory) is staged as a tree of links.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import stat
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from concurrent.futures import Executor, Future

log = logging.getLogger(__name__)

STAGING_DIRNAME = ".lamin-lightning-staging"
"""Folder created next to a staged file; removed once empty."""


class Stager:
    """Stage files on the training thread, release them on the worker.

    Args:
        enabled: stage at all; when false (synchronous mode: nothing can
            delete the file before it is persisted) :meth:`stage` returns the
            path itself and :meth:`release` does nothing.
    """

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._token = secrets.token_hex(6)
        self._count = 0
        self._roots: set[Path] = set()
        self._copy_warned: set[Path] = set()

    def stage(self, path: Path, *, link: bool) -> Path:
        """Give ``path`` a second name that no one else deletes or rewrites.

        Costs one system call per file in the common case (a hard link): on
        the training thread every call may wait for the worker to release
        the GIL.

        Args:
            path: an absolute path to a file or a directory.
            link: hard-link files (fall back to a copy) instead of copying.

        Returns:
            The staged path, in the staging folder next to ``path``; its name
            ends with ``path.name``.

        Raises:
            FileNotFoundError: if ``path`` does not exist (a writer that
                returns before the file is complete, other than Lightning's
                ``AsyncCheckpointIO``, is not supported).
        """
        if not self.enabled:
            return path
        return self.link(path, self.reserve(path), link=link)

    def stage_after(
        self, path: Path, writer: Executor | None, *, link: bool
    ) -> tuple[Path, Future[Path] | None]:
        """:meth:`stage` now, or on ``writer`` once it has written ``path``.

        Args:
            writer: the one thread a checkpoint IO writes files on in the
                background (Lightning's ``AsyncCheckpointIO``), or ``None``.

        Returns:
            The staged name, and a future that is done once the file is
            staged (``None`` if it is staged already).
        """
        if writer is None:
            return self.stage(path, link=link), None
        staged = self.reserve(path)
        return staged, writer.submit(self.link, path, staged, link=link)

    def reserve(self, path: Path) -> Path:
        """The staged name :meth:`stage` would give ``path``, not made yet.

        For a file that is still being written: call :meth:`link` with the
        name once it is complete.
        """
        root = path.parent / STAGING_DIRNAME
        if root not in self._roots:
            root.mkdir(parents=True, exist_ok=True)  # a late writer: no folder yet
            self._roots.add(root)
        self._count += 1
        return root / f"{self._token}-{self._count}-{path.name}"

    def link(self, path: Path, target: Path, *, link: bool) -> Path:
        """Give ``path`` the reserved name ``target``; see :meth:`stage`."""
        try:
            if link:
                os.link(path, target)
            else:
                shutil.copy2(path, target)
        except FileNotFoundError as error:
            raise FileNotFoundError(
                f"Cannot stage {path} for persisting: it does not exist after "
                "Lightning saved it. A checkpoint IO plugin that writes in the "
                "background must finish the file before its save returns, or "
                "be Lightning's AsyncCheckpointIO, which the callback waits for."
            ) from error
        except OSError as error:
            if path.is_dir():  # a sharded checkpoint: stage its tree
                copy = self._link_or_copy if link else shutil.copy2
                shutil.copytree(path, target, symlinks=True, copy_function=copy)
            elif link:
                self._copy_instead(path, target, error)
            else:
                raise
        return target

    def detach(self, path: Path) -> None:
        """Drop the name ``path`` before it is rewritten, if it has others.

        A file with more than one name shares its bytes with a staged link
        or with a persisted artifact (a persister may link it into its
        storage). A writer that truncates the file in place
        (``open(path, "wb")``) would change those bytes too; removing this
        name first makes any writer create a new file. One ``stat`` per
        save; works with staging disabled too. Training thread only.
        """
        try:
            info = os.stat(path)
        except FileNotFoundError:
            return
        if stat.S_ISREG(info.st_mode) and info.st_nlink > 1:
            path.unlink()

    def release(self, staged: Path, original: Path) -> None:
        """Remove a staged file or tree once it is persisted."""
        release(staged, original)

    def cleanup(self) -> None:
        """Remove staging folders left empty; training thread, worker idle."""
        for root in self._roots:
            try:
                root.rmdir()
            except OSError:
                # Not empty: a failed save kept its staged file (the error
                # said where), or another callback stages in the same folder.
                log.debug("Staging folder %s is not empty; kept", root)
        self._roots.clear()

    def _link_or_copy(self, source: str | Path, target: str | Path) -> None:
        try:
            os.link(source, target)
        except FileNotFoundError:
            raise
        except OSError as error:
            self._copy_instead(Path(source), Path(target), error)

    def _copy_instead(self, source: Path, target: Path, error: OSError) -> None:
        # No hard links here (FAT, some network filesystems): a copy still
        # protects the bytes, at the cost of reading them once more.
        if source.parent not in self._copy_warned:
            self._copy_warned.add(source.parent)
            log.warning(
                "Cannot hard-link checkpoints in %s (%s); staging copies them "
                "instead, which blocks training for the time of a copy.",
                source.parent,
                error,
            )
        shutil.copy2(source, target)


def release(staged: Path, original: Path, *, prune: bool = False) -> None:
    """Remove a staged file or tree; with ``prune``, its folder if now empty.

    Nothing happens if ``staged`` is Lightning's own file (staging off).
    """
    if staged == original:
        return
    if staged.is_dir():
        shutil.rmtree(staged, ignore_errors=True)
    else:
        staged.unlink(missing_ok=True)
    if prune:
        with contextlib.suppress(OSError):  # not empty: other files still wait
            staged.parent.rmdir()
