"""Find persisted checkpoints again, and turn one into a local ``ckpt_path``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lamin_lightning_core._bus import create_bus
from lamin_lightning_core._errors import LaminLightningError
from lamin_lightning_core._events import CheckpointQuery, CheckpointRecord

if TYPE_CHECKING:
    from lamin_lightning_core._events import FeatureValue


class CheckpointNotFoundError(LaminLightningError, LookupError):
    """No persisted checkpoint matched a query."""


def find_checkpoints(
    run: Any = None,
    *,
    key_prefix: str | None = None,
    features: dict[str, FeatureValue] | None = None,
    latest_run: bool = False,
) -> list[CheckpointRecord]:
    """Return the persisted checkpoints that match, oldest first.

    Args:
        run: a run UID, or a run record with a ``uid`` (``ln.Run``).
        key_prefix: only keys starting with this, e.g.
            ``checkpoint.checkpoint_key_prefix`` of an earlier fit.
        features: artifact feature values to match, e.g.
            ``{"dataset_version": "2026-03"}``.
        latest_run: without ``run``, look in the newest run that persisted
            checkpoints.

    Raises:
        LaminLightningError: if no installed persister can search (the
            built-in local one can't; install the ``lamindb`` extra).
    """
    query = CheckpointQuery(
        run_uid=getattr(run, "uid", run),
        key_prefix=key_prefix,
        features=features or {},
        latest_run=latest_run,
    )
    bus = create_bus()
    records = bus.manager.hook.lamin_lightning_find_checkpoints(query=query)
    if records is None:
        raise LaminLightningError(
            "No installed persister can search checkpoints: install one, e.g. "
            'pip install "lamin-lightning[lamindb]".'
        )
    return list(records)


def best_checkpoint(run: Any = None, **criteria: Any) -> CheckpointRecord:
    """The best checkpoint among those that match (see :func:`find_checkpoints`).

    Each callback flags its best checkpoint (``is_best_model``); across runs
    or callbacks the best score wins, by the checkpoints' ``mode``.

    Raises:
        CheckpointNotFoundError: naming what was searched, if nothing matched
            or no checkpoint carries a score and flag.
    """
    records = find_checkpoints(run, **criteria)
    flagged = [r for r in records if r.is_best_model]
    if not flagged:
        raise CheckpointNotFoundError(
            f"No best checkpoint in {_describe(run, criteria)}: "
            + (
                "nothing matched."
                if not records
                else f"{len(records)} checkpoint(s) matched but none is flagged "
                "is_best_model; create the auto-features once with "
                "ll.save_lightning_features() before training."
            )
        )
    return min(flagged, key=_goodness)


def last_checkpoint(run: Any = None, **criteria: Any) -> CheckpointRecord:
    """The newest checkpoint among those that match.

    Raises:
        CheckpointNotFoundError: naming what was searched, if nothing matched.
    """
    records = find_checkpoints(run, **criteria)
    if not records:
        raise CheckpointNotFoundError(
            f"No checkpoint in {_describe(run, criteria)}: nothing matched."
        )
    flagged = [r for r in records if r.is_last_model] or records
    return flagged[-1]


def checkpoint_path(record: CheckpointRecord) -> str:
    """A local path of ``record``'s bytes, for ``trainer.fit(ckpt_path=...)``.

    The persister fetches the file into its cache when it is not local, and
    records it as an input of the run being tracked.

    Raises:
        LaminLightningError: if no persister could fetch the checkpoint.
    """
    path = create_bus().manager.hook.lamin_lightning_fetch_checkpoint(record=record)
    if path is None:
        raise LaminLightningError(
            f"No installed persister could fetch {record.key!r} ({record.storage_uri})."
        )
    return str(path)


def _goodness(record: CheckpointRecord) -> tuple[bool, float]:
    if record.score is None:
        return (True, 0.0)
    return (False, -record.score if record.mode == "max" else record.score)


def _describe(run: Any, criteria: dict[str, Any]) -> str:
    query = CheckpointQuery(run_uid=getattr(run, "uid", run), **criteria)
    return query.describe()
