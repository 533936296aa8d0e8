"""The built-in persister: keep the file where Lightning wrote it.

It answers last, so any installed persister (LaminDB) takes precedence. With
it alone, registrars still receive ``file://`` URIs and work without LaminDB.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lamin_lightning_core._events import PersistedArtifact
from lamin_lightning_core.hookspecs import hookimpl

if TYPE_CHECKING:
    from lamin_lightning_core._events import ArtifactRemovedEvent, PersistRequest


@hookimpl(trylast=True)
def lamin_lightning_persist_artifact(request: PersistRequest) -> PersistedArtifact:
    return PersistedArtifact(storage_uri=request.local_path.resolve().as_uri())


@hookimpl(trylast=True)
def lamin_lightning_delete_artifact(event: ArtifactRemovedEvent) -> bool:
    # Lightning already deleted the local file; nothing else holds the bytes.
    return True
