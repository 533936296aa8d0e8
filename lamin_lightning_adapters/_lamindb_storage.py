"""Put a checkpoint into the instance's storage without copying its bytes.

Given a local file, lamindb hashes it and copies it into
``<storage root>/.lamindb/<uid>``: for a checkpoint of several GB the copy is
most of the time a save costs, and doubles the disk it takes. lamindb also
registers files that already lie inside a storage location in place (the
key stays the one we give; the real path is kept as the artifact's real key).
When the checkpoint folder and a local storage root share a filesystem, a
hard link puts the file there in one system call, whatever its size.

The link shares its bytes with the file Lightning wrote. Lightning replaces a
checkpoint by renaming a new file over the old name, which leaves the link
alone; the callback also unlinks a multiply-linked file before a save
rewrites it (``Stager.detach``), so a writer that truncates in place cannot
change a persisted artifact either.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

LINK_DIRNAME = "lamin_lightning"
"""Folder under the storage root that holds linked checkpoints."""

_NO_LINK_ERRNOS = {errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP}
_refused: set[str] = set()
"""Storage roots where linking failed once; they get copies from then on."""


def link_into_storage(ln: Any, path: Path) -> Path | None:
    """Hard-link ``path`` into the default storage, if local and on its device.

    Args:
        ln: the ``lamindb`` module.
        path: a checkpoint file (folders are copied by lamindb as usual).

    Returns:
        The linked path inside the storage root, or ``None`` if the storage
        is not local, ``path`` is not a file, or the filesystem refuses the
        link (then lamindb copies, as without this module).
    """
    storage = ln.settings.storage
    if storage.type != "local" or not path.is_file():
        return None
    root = Path(storage.root)
    if str(root) in _refused:
        return None
    folder = root / LINK_DIRNAME
    target = folder / f"{secrets.token_hex(10)}{''.join(path.suffixes[-1:])}"
    try:
        folder.mkdir(exist_ok=True)
        os.link(path, target)
    except OSError as error:
        if error.errno not in _NO_LINK_ERRNOS:
            raise
        _refused.add(str(root))
        log.info(
            "Cannot hard-link checkpoints into the storage %s (%s): lamindb "
            "copies them instead, which reads and writes each file once more.",
            root,
            error.strerror,
        )
        return None
    return target
