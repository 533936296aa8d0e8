from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

import lamin_lightning_core as ll
from lamin_lightning_core._bus import create_bus

from .test_events import saved


class Recorder:
    def __init__(self) -> None:
        self.events: list[object] = []

    @ll.hookimpl
    def lamin_lightning_artifact_saved(self, event: ll.ArtifactSavedEvent) -> None:
        self.events.append(event)


class Exploding:
    @ll.hookimpl
    def lamin_lightning_artifact_saved(self, event: ll.ArtifactSavedEvent) -> None:
        raise ConnectionError("backend down")


def test_failing_registrar_does_not_stop_the_others() -> None:
    first, last = Recorder(), Recorder()
    bus = create_bus(
        plugins=[first, Exploding(), last], autoload=False, retry=ll.Retry(1)
    )
    event = saved()
    with pytest.warns(ll.PluginDeliveryWarning, match="backend down"):
        bus.broadcast("lamin_lightning_artifact_saved", event)
    assert first.events == [event]
    assert last.events == [event]
    [failure] = bus.failures
    assert failure.hook == "lamin_lightning_artifact_saved"
    assert failure.event is event
    assert isinstance(failure.error, ConnectionError)


def test_failing_plugin_is_warned_about_once() -> None:
    bus = create_bus(plugins=[Exploding()], autoload=False, retry=ll.Retry(1))
    with pytest.warns(ll.PluginDeliveryWarning) as record:
        for _ in range(3):
            bus.broadcast("lamin_lightning_artifact_saved", saved())
    assert len(record) == 1
    assert len(bus.failures) == 3


def test_a_transient_error_is_retried_with_growing_backoff(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class Flaky:
        calls = 0

        @ll.hookimpl
        def lamin_lightning_artifact_saved(self, event: ll.ArtifactSavedEvent) -> None:
            Flaky.calls += 1
            if Flaky.calls < 3:
                raise TimeoutError("registry timed out")

    sleeps: list[float] = []
    monkeypatch.setattr("lamin_lightning_core._bus.time.sleep", sleeps.append)
    bus = create_bus(plugins=[Flaky()], autoload=False, retry=ll.Retry(3, 0.25))
    outcome = bus.deliver("lamin_lightning_artifact_saved", saved())

    assert Flaky.calls == 3
    assert sleeps == [0.25, 0.5]
    assert outcome.failed == {} and bus.failures == []
    assert [name.rsplit(".", 1)[1] for name in outcome.delivered] == ["Flaky"]


def test_a_bug_is_not_retried() -> None:
    class Buggy:
        @ll.hookimpl
        def lamin_lightning_artifact_saved(self, event: ll.ArtifactSavedEvent) -> None:
            raise KeyError("a bug, not an outage")

    bus = create_bus(plugins=[Buggy()], autoload=False, retry=ll.Retry(3, 10.0))
    with pytest.warns(ll.PluginDeliveryWarning):
        bus.broadcast("lamin_lightning_artifact_saved", saved())
    assert len(bus.failures) == 1


@pytest.mark.parametrize("attempts, backoff", [(0, 0.5), (2, -1.0), (True, 0.5)])
def test_retry_rejects_nonsense(attempts: int, backoff: float) -> None:
    with pytest.raises(ValueError, match="Retry"):
        ll.Retry(attempts, backoff)


def test_failing_persister_is_loud_and_names_plugin_and_file(tmp_path: Path) -> None:
    class BrokenPersister:
        @ll.hookimpl
        def lamin_lightning_persist_artifact(self, request: ll.PersistRequest) -> None:
            raise PermissionError("storage is read-only")

    bus = create_bus(autoload=False, retry=ll.Retry(1))
    bus.register(BrokenPersister(), name="broken-store")
    request = ll.PersistRequest(
        kind="checkpoint", key="c/x.ckpt", local_path=tmp_path / "x.ckpt"
    )
    with pytest.raises(ll.PersistError, match=r"'broken-store'.*x\.ckpt.*read-only"):
        bus.persist(request)


def test_without_persister_the_local_one_reports_a_file_uri(tmp_path: Path) -> None:
    bus = create_bus(autoload=False)
    path = tmp_path / "x.ckpt"
    result = bus.persist(
        ll.PersistRequest(kind="checkpoint", key="c/x", local_path=path)
    )
    assert result.storage_uri == path.resolve().as_uri()
    assert result.artifact is None


def test_a_misspelled_hook_is_rejected_with_a_suggestion() -> None:
    class Typo:
        @ll.hookimpl
        def lamin_lightning_artifact_savd(self, event: object) -> None: ...

    with pytest.raises(
        ll.PluginLoadError, match=r"Typo.*Did you mean 'lamin_lightning_artifact_saved'"
    ):
        create_bus(plugins=[Typo()], autoload=False)


def test_a_wrong_hook_signature_is_rejected() -> None:
    class WrongArgs:
        @ll.hookimpl
        def lamin_lightning_artifact_saved(self, evt: object) -> None: ...

    with pytest.raises(ll.PluginLoadError, match="evt"):
        create_bus(plugins=[WrongArgs()], autoload=False)


# -- entry points: real distribution metadata on sys.path ---------------------


def _install_fake_distribution(root: Path, name: str, module: str, body: str) -> None:
    # Like pip, name the folder with underscores: importlib.metadata takes the
    # distribution name from the folder up to the first dash.
    dist = root / f"{name.replace('-', '_')}-1.2.3.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.2.3\n"
    )
    (dist / "entry_points.txt").write_text(f"[lamin_lightning]\n{name} = {module}\n")
    (root / f"{module}.py").write_text(body)


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    importlib.invalidate_caches()
    for module in ("ll_good_plugin", "ll_broken_plugin", "ll_typo_plugin"):
        sys.modules.pop(module, None)


GOOD = """
import lamin_lightning_core as ll
seen = []

@ll.hookimpl
def lamin_lightning_artifact_saved(event):
    seen.append(event)
"""


def test_installed_plugins_load_and_a_broken_one_is_named_with_its_distribution(
    site: Path,
) -> None:
    _install_fake_distribution(site, "ll-good", "ll_good_plugin", GOOD)
    _install_fake_distribution(
        site, "ll-broken", "ll_broken_plugin", "raise RuntimeError('bad import')\n"
    )
    importlib.invalidate_caches()
    with pytest.raises(ll.PluginLoadError) as error:
        create_bus(disable=["wandb", "mlflow", "clearml"])
    message = str(error.value)
    assert "'ll-broken' (from ll-broken 1.2.3)" in message
    assert "RuntimeError: bad import" in message
    assert "LAMIN_LIGHTNING_DISABLE_PLUGINS" in message
    assert "ll-good" not in message

    bus = create_bus(disable=["ll-broken", "wandb", "mlflow", "clearml"])
    assert bus.manager.has_plugin("ll-good")
    bus.broadcast("lamin_lightning_artifact_saved", saved())
    assert len(sys.modules["ll_good_plugin"].seen) == 1


def test_misspelled_hook_in_an_installed_plugin_fails_at_start_up(site: Path) -> None:
    body = GOOD.replace("artifact_saved(", "artifact_save(")
    _install_fake_distribution(site, "ll-typo", "ll_typo_plugin", body)
    importlib.invalidate_caches()
    with pytest.raises(ll.PluginLoadError, match=r"'ll-typo' \(from ll-typo 1.2.3\)"):
        create_bus(disable=["wandb", "mlflow", "clearml"])


def test_environment_switches(site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _install_fake_distribution(site, "ll-good", "ll_good_plugin", GOOD)
    importlib.invalidate_caches()
    monkeypatch.setenv(
        "LAMIN_LIGHTNING_DISABLE_PLUGINS", "ll-good,wandb,mlflow,clearml"
    )
    bus = create_bus()
    assert not bus.manager.has_plugin("ll-good")
    assert "ll_good_plugin" not in sys.modules  # blocked before import
    monkeypatch.delenv("LAMIN_LIGHTNING_DISABLE_PLUGINS")
    monkeypatch.setenv("LAMIN_LIGHTNING_DISABLE_AUTOLOAD", "1")
    assert [name for name, _ in create_bus().manager.list_name_plugin()] == ["local"]


def test_a_failing_plugin_logs_one_traceback_then_one_line_each(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Found by a new user: six failed events printed six full tracebacks.
    bus = create_bus(plugins=[Exploding()], autoload=False, retry=ll.Retry(1))
    with pytest.warns(ll.PluginDeliveryWarning):
        for _ in range(3):
            bus.broadcast("lamin_lightning_artifact_saved", saved())
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 3
    assert [r.exc_info is not None for r in errors] == [True, False, False]
    assert all("backend down" in r.getMessage() for r in errors)
