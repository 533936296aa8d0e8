"""The ``lamin-lightning`` console command."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from lamin_lightning_core._events import CheckpointQuery
from lamin_lightning_core._table import checkpoint_table

app = typer.Typer(
    help="Keep PyTorch Lightning checkpoints traceable.", no_args_is_help=True
)


@app.callback()
def _root() -> None:
    """Keep PyTorch Lightning checkpoints traceable."""


@app.command()
def plugins(
    disable: Annotated[
        list[str] | None,
        typer.Option("--disable", help="Plugin names to switch off, as in a fit."),
    ] = None,
) -> None:
    """List installed plugins: distribution, version, status and hooks."""
    from lamin_lightning_core._bus import create_bus

    bus = create_bus(disable=disable or ())
    table = Table(title="lamin-lightning plugins")
    for column in ("plugin", "distribution", "status", "hooks"):
        table.add_column(column, overflow="fold")
    for info in bus.plugin_infos():
        dist = f"{info.distribution} {info.version}" if info.distribution else "-"
        hooks = "\n".join(h.removeprefix("lamin_lightning_") for h in info.hooks)
        table.add_row(info.name, dist, info.status, hooks or "-")
    Console().print(table)


@app.command("ls")
def list_checkpoints(
    run: Annotated[
        str | None, typer.Option("--run", help="UID of the run to list.")
    ] = None,
    prefix: Annotated[
        str | None, typer.Option("--prefix", help="Key prefix to list.")
    ] = None,
    plot: Annotated[
        Path | None,
        typer.Option("--plot", help="Write a PNG of score by step to this path."),
    ] = None,
) -> None:
    """List persisted checkpoints of a run, a key prefix, or the latest run."""
    from lamin_lightning_core._errors import LaminLightningError
    from lamin_lightning_core._query import find_checkpoints

    try:
        records = find_checkpoints(
            run, key_prefix=prefix, latest_run=run is None and prefix is None
        )
    except LaminLightningError as error:
        raise typer.BadParameter(str(error)) from error
    if not records:
        query = CheckpointQuery(
            run_uid=run, key_prefix=prefix, latest_run=run is None and prefix is None
        )
        Console(stderr=True).print(f"No checkpoints in {query.describe()}.")
        raise typer.Exit(1)
    Console().print(checkpoint_table(records))
    if plot is not None:
        from lamin_lightning_core._plot import plot_scores

        try:
            plot_scores(records, plot)
        except ValueError as error:  # nothing to plot: said, not a traceback
            Console(stderr=True).print(f"No plot written: {error}")
            raise typer.Exit(1) from error
        Console().print(f"Wrote {plot}")


@app.command()
def replay(
    path: Annotated[
        Path,
        typer.Argument(
            help="A checkpoint folder, a folder above it, or a journal file."
        ),
    ],
    disable: Annotated[
        list[str] | None,
        typer.Option("--disable", help="Plugin names to switch off, as in a fit."),
    ] = None,
) -> None:
    """Deliver what the journals below PATH still miss: persist, then announce.

    Exits with 1 if anything is still pending afterwards.
    """
    from lamin_lightning_core._journal import find_journals
    from lamin_lightning_core._replay import replay as replay_journals

    if not path.exists():
        raise typer.BadParameter(f"{path} does not exist.", param_hint="PATH")
    if not find_journals(path):
        Console(stderr=True).print(
            f"No lamin-lightning journal below {path}: a fit writes one into "
            ".lamin-lightning-journal/ beside the checkpoint folder."
        )
        raise typer.Exit(1)
    reports = replay_journals(path, disable=disable or ())
    if not reports:
        Console().print(f"Nothing to replay below {path}: every event is delivered.")
        return
    table = Table(title="lamin-lightning replay")
    for column in ("journal", "persisted", "deleted", "delivered", "still pending"):
        table.add_column(column, overflow="fold")
    for report in reports:
        pending = [*report.failed, *report.lost]
        pending += [
            f"{plugin}: not installed here ({count})"
            for plugin, count in report.unreachable.items()
        ]
        table.add_row(
            str(report.journal),
            str(report.persisted),
            str(report.deleted),
            str(report.delivered),
            "\n".join(pending) or "-",
        )
    Console().print(table)
    if not all(report.ok for report in reports):
        raise typer.Exit(1)


def main() -> None:
    """Entry point of the console script."""
    app()
