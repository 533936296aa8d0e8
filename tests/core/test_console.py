from __future__ import annotations

from typer.testing import CliRunner

from lamin_lightning_core._console import app


def test_plugins_lists_distributions_status_and_hooks() -> None:
    result = CliRunner().invoke(
        app, ["plugins", "--disable", "wandb"], env={"COLUMNS": "200"}
    )
    assert result.exit_code == 0, result.output
    rows: dict[str, str] = {}
    plugin = ""
    for line in result.output.splitlines():
        cells = line.split("│")
        if len(cells) < 5:
            continue
        plugin = cells[1].strip() or plugin
        rows[plugin] = rows.get(plugin, "") + line
    assert "lamin-lightning 0.1.0" in rows["lamindb"]
    assert "active" in rows["lamindb"] and "persist_artifact" in rows["lamindb"]
    assert "disabled" in rows["wandb"]
    assert "lamin-lightning-recorder 0.1.0" in rows["recorder"]
    assert "local" in rows


def test_no_arguments_shows_help() -> None:
    result = CliRunner().invoke(app, [])
    assert "plugins" in result.output
