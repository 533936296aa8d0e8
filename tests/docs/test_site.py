"""The documentation site builds strictly and keeps up with the code."""

from __future__ import annotations

import importlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from lamin_lightning_core import hookspecs
from tests.docs.examples import DOCS

ROOT = DOCS.parent
ADAPTER_PAGES = {
    "wandb": "integrations/wandb.md",
    "mlflow": "integrations/mlflow.md",
    "clearml": "integrations/clearml.md",
}


def _load_hooks() -> ModuleType:
    spec = importlib.util.spec_from_file_location("docs_hooks", DOCS / "hooks.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_mkdocs_build_is_strict_and_clean(tmp_path: Path) -> None:
    pytest.importorskip("material", reason="the docs extra is not installed")
    pytest.importorskip("mkdocstrings", reason="the docs extra is not installed")
    site = tmp_path / "site"
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert done.returncode == 0, done.stderr[-5000:]
    events = (site / "reference" / "events" / "index.html").read_text()
    assert "<!-- schema:" not in events, "a schema marker was left unrendered"
    assert 'class="mermaid"' in (site / "how-it-works" / "index.html").read_text()


@pytest.mark.parametrize("name", sorted(_load_hooks().MODELS))
def test_event_reference_lists_every_serialised_field(name: str) -> None:
    hooks = _load_hooks()
    model = hooks.MODELS[name]
    rendered = hooks.render_model(model)
    for field in model.model_json_schema(mode="serialization")["properties"]:
        assert f"| `{field}` |" in rendered, f"{name}.{field} is not in the table"


def test_extending_page_names_every_hook() -> None:
    page = (DOCS / "extending.md").read_text()
    hooks = [name for name in vars(hookspecs) if name.startswith("lamin_lightning_")]
    missing = [hook for hook in hooks if f"`{hook}`" not in page]
    assert not missing, f"add {missing} to the hook table of docs/extending.md"


@pytest.mark.parametrize("plugin", sorted(ADAPTER_PAGES), ids=sorted(ADAPTER_PAGES))
def test_integration_page_documents_every_environment_variable(plugin: str) -> None:
    if importlib.util.find_spec(plugin) is None:
        pytest.skip(f"the {plugin} extra is not installed")
    adapter = importlib.import_module(f"lamin_lightning_adapters.{plugin}")
    variables = [
        value
        for name, value in vars(adapter).items()
        if name.endswith("_ENV") and isinstance(value, str)
    ]
    assert variables, f"lamin_lightning_adapters.{plugin} defines no *_ENV"
    page = (DOCS / ADAPTER_PAGES[plugin]).read_text()
    missing = [variable for variable in variables if f"`{variable}`" not in page]
    assert not missing, f"document {missing} in docs/{ADAPTER_PAGES[plugin]}"


def test_the_console_page_documents_every_command() -> None:
    import typer.main

    from lamin_lightning_core._console import app

    page = (DOCS / "console.md").read_text()
    group = typer.main.get_command(app)
    commands = sorted(group.commands)  # type: ignore[attr-defined]
    assert commands, "the console app has no commands"
    for name in commands:
        assert f"## `lamin-lightning {name}`" in page, f"{name} is not documented"
        assert f"| `lamin-lightning {name}` |" in page, f"{name} is not in the table"
