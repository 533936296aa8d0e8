"""Append each lamin-lightning event as a JSON line to ``$LL_RECORDER_FILE``.

Silent when the variable is unset, so installing it changes nothing else.
"""

from __future__ import annotations

import os

from lamin_lightning_core import hookimpl


def _record(event: object) -> None:
    path = os.environ.get("LL_RECORDER_FILE")
    if path:
        with open(path, "a", encoding="utf-8") as stream:
            stream.write(event.model_dump_json() + "\n")  # type: ignore[attr-defined]


@hookimpl
def lamin_lightning_fit_started(event: object) -> None:
    _record(event)


@hookimpl
def lamin_lightning_artifact_saved(event: object) -> None:
    _record(event)


@hookimpl
def lamin_lightning_artifact_removed(event: object) -> None:
    _record(event)


@hookimpl
def lamin_lightning_fit_ended(event: object) -> None:
    _record(event)
