"""A readable table of persisted checkpoints, for the console and the fit log."""

from __future__ import annotations

import io
import logging
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    import pluggy

    from lamin_lightning_core._events import CheckpointQuery, CheckpointRecord

log = logging.getLogger(__name__)


def checkpoint_table(records: list[CheckpointRecord]) -> Table:
    """A readable table of checkpoint records."""
    table = Table(title=f"{len(records)} checkpoint(s)")
    for column in ("key", "epoch/step", "score", "rank", "flags", "size", "URI"):
        table.add_column(column, overflow="fold")
    for r in records:
        flags = " ".join(
            name
            for name, on in (("best", r.is_best_model), ("last", r.is_last_model))
            if on
        )
        table.add_row(
            r.key,
            f"{_dash(r.epoch)}/{_dash(r.global_step)}",
            "-" if r.score is None else f"{r.score:.4g}",
            _dash(r.model_rank),
            flags,
            "-" if r.size is None else f"{r.size / 1e6:.2f} MB",
            r.storage_uri,
        )
    return table


def _dash(value: object) -> str:
    return "-" if value is None else str(value)


def render_text(records: list[CheckpointRecord], width: int = 1000) -> str:
    """The table of ``records`` as plain text, for a log line.

    The table is as wide as its content (up to ``width``), so keys and URIs
    stay on one line each and can be copied from the log.
    """
    buffer = io.StringIO()
    Console(file=buffer, width=width, no_color=True, highlight=False).print(
        checkpoint_table(records)
    )
    return buffer.getvalue().rstrip()


def log_summary(manager: pluggy.PluginManager, query: CheckpointQuery) -> None:
    """Log, once per fit, what ``lamin-lightning ls`` would print for ``query``."""
    if not log.isEnabledFor(logging.INFO):
        return
    try:
        records = manager.hook.lamin_lightning_find_checkpoints(query=query)
    except Exception as error:
        # A summary is a courtesy: the checkpoints are persisted already.
        log.warning("Cannot list the persisted checkpoints: %r", error)
        return
    if records:
        log.info("Persisted checkpoints:\n%s", render_text(records))
