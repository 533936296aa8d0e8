"""Every code example of the docs runs against the session's LaminDB instance.

Each page runs in a fresh working directory, with its own ``ln.track()`` run
finished afterwards. Registrars are switched off except on the page about
that registrar, which runs against the real backend, offline. The
conventions a page follows are described in ``tests/docs/examples.py``.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from tests.docs import standins
from tests.docs.examples import (
    RunUidChecker,
    blocks,
    check_no_delivery_failures,
    is_runnable,
    pages,
    run_page,
)

REGISTRARS = ("wandb", "mlflow", "clearml")
REGISTRAR_PAGES = {
    "integrations/wandb.md": "wandb",
    "integrations/mlflow.md": "mlflow",
    "integrations/clearml.md": "clearml",
}
RUNNABLE = [page for page in pages() if is_runnable(page)]


@pytest.fixture
def docs_cwd(
    ln: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Path]:
    """A clean working directory and home, and the stand-in user modules."""
    cwd = tmp_path / "work"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.syspath_prepend(str(cwd))  # as for a script run from cwd
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("LAMIN_LIGHTNING_DISABLE_AUTOLOAD", raising=False)
    monkeypatch.setitem(sys.modules, "my_project", standins)
    monkeypatch.setitem(sys.modules, "my_model_registry", standins)
    monkeypatch.setattr(standins.ModelRegistry, "registered", [])
    torch.manual_seed(0)
    yield cwd
    if ln.context.run is not None:
        ln.finish()
    for name, module in list(sys.modules.items()):  # modules a page wrote
        if str(getattr(module, "__file__", None) or "").startswith(str(cwd)):
            del sys.modules[name]


@pytest.fixture
def wandb_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """W&B with every directory under ``tmp_path`` and no login."""
    import wandb

    for name in ("WANDB_PROJECT", "WANDB_ENTITY", "WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(name, raising=False)
    for name in ("WANDB_DIR", "WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"):
        path = tmp_path / "wandb-home" / name.lower()
        path.mkdir(parents=True)
        monkeypatch.setenv(name, str(path))
    wandb.teardown()  # wandb reads its settings once per process
    yield
    if wandb.run is not None:
        wandb.run.finish()
    wandb.teardown()


@pytest.fixture
def mlflow_clean(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No MLflow configuration leaks into or out of the page."""
    import mlflow

    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    mlflow.set_tracking_uri(None)  # type: ignore[arg-type]
    yield
    while mlflow.active_run() is not None:
        mlflow.end_run()
    mlflow.set_tracking_uri(None)  # type: ignore[arg-type]
    os.environ.pop("MLFLOW_TRACKING_URI", None)  # MLFlowLogger sets it


@pytest.fixture
def clearml_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ClearML's cache under ``tmp_path``; no configuration, no server.

    A ``Task.init`` earlier in this process (tests/adapters) leaves variables
    such as ``CLEARML_PROC_MASTER_ID`` behind, which would make the page's
    process a child of that task.
    """
    for name in list(os.environ):
        if name.startswith(("CLEARML_", "TRAINS_", "LAMIN_LIGHTNING_CLEARML_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("CLEARML_CACHE_DIR", str(tmp_path / "clearml-cache"))


BACKEND_FIXTURES = {
    "wandb": "wandb_home",
    "mlflow": "mlflow_clean",
    "clearml": "clearml_home",
}
# ClearML reads its configuration once per process and starts threads and
# exit handlers with Task.init: its page runs in a process of its own.
SUBPROCESS_PAGES = {"integrations/clearml.md"}
ROOT = Path(__file__).resolve().parents[2]


def _registry_got_checkpoints(namespace: dict[str, Any]) -> None:
    registered = standins.ModelRegistry.registered
    assert registered, "the subclass example registered nothing"
    assert {entry["project"] for entry in registered} == {"my-project"}


PAGE_CHECKS: dict[str, list[Callable[[dict[str, Any]], None]]] = {
    "extending.md": [_registry_got_checkpoints],
    **{page: [check_no_delivery_failures] for page in REGISTRAR_PAGES},
}


@pytest.mark.parametrize("page", RUNNABLE, ids=RUNNABLE)
def test_page_examples_run(
    page: str,
    docs_cwd: Path,
    ln: ModuleType,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> None:
    registrar = REGISTRAR_PAGES.get(page)
    if registrar is not None:
        if importlib.util.find_spec(registrar) is None:
            pytest.skip(f"the {registrar} extra is not installed")
        if registrar in BACKEND_FIXTURES:
            request.getfixturevalue(BACKEND_FIXTURES[registrar])
    disabled = [name for name in REGISTRARS if name != registrar]
    monkeypatch.setenv("LAMIN_LIGHTNING_DISABLE_PLUGINS", ",".join(disabled))
    newest = ln.Run.filter().order_by("-id").first()
    since = newest.id if newest is not None else 0

    def run_uids() -> list[str]:
        runs = ln.Run.filter(id__gt=since).order_by("id")
        return [run.uid for run in runs]

    if page in SUBPROCESS_PAGES:
        command = [sys.executable, "-m", "tests.docs.examples", page, str(docs_cwd)]
        done = subprocess.run(
            command, cwd=ROOT, capture_output=True, text=True, check=False
        )
        assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-8000:]}"
        return
    namespace = run_page(page, docs_cwd, RunUidChecker(run_uids))

    for check in PAGE_CHECKS.get(page, []):
        check(namespace)


@pytest.mark.parametrize("page", pages(), ids=pages())
def test_code_blocks_have_a_known_language(page: str) -> None:
    known = {"python", "pycon", "bash", "yaml", "toml", "json", "mermaid", "text"}
    for block in blocks(page):
        assert block.lang in known, f"{block}: say which language this block is"
