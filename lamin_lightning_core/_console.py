"""The ``lamin-lightning`` console command."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

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


def main() -> None:
    """Entry point of the console script."""
    app()
