"""The hook bus: plugin discovery, validation and the failure policy.

Failure policy, in one place:

* persister hooks (``firstresult``) are loud: an exception is re-raised as
  :class:`PersistError` naming the plugin, its distribution and the file;
* broadcast hooks (registrars, observers) are isolated: an exception is logged
  with the plugin's name and distribution, warned about once per plugin, and
  kept as a :class:`DeliveryFailure` (and in the journal, for ``replay``); the
  remaining plugins are still called;
* transient errors (``OSError``: connections, time-outs, storage briefly
  read-only) of either kind are retried with exponential backoff first.
"""

from __future__ import annotations

import difflib
import logging
import os
import time
import warnings
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, entry_points, version
from typing import TYPE_CHECKING, Any

import pluggy

from lamin_lightning_core import _local, hookspecs
from lamin_lightning_core._errors import (
    PersistError,
    PluginDeliveryWarning,
    PluginLoadError,
    PluginUnavailable,
)

if TYPE_CHECKING:
    from collections.abc import Iterable

    from lamin_lightning_core._events import (
        FitStartedEvent,
        LifecycleEvent,
        PersistedArtifact,
        PersistRequest,
    )

log = logging.getLogger(__name__)

DISABLE_ENV = "LAMIN_LIGHTNING_DISABLE_PLUGINS"
"""Comma-separated plugin names to switch off before they are imported."""
AUTOLOAD_ENV = "LAMIN_LIGHTNING_DISABLE_AUTOLOAD"
"""Set to 1 to load no entry-point plugin at all."""
LOCAL_PERSISTER = "local"

_ARTIFACT_HOOKS = ("lamin_lightning_artifact_saved", "lamin_lightning_artifact_removed")
"""Broadcasts whose deliveries the journal tracks (and replay completes)."""


@dataclass(frozen=True)
class DeliveryFailure:
    """A broadcast that one plugin failed to handle."""

    plugin: str
    distribution: str | None
    hook: str
    event: LifecycleEvent
    error: BaseException


@dataclass(frozen=True)
class Retry:
    """How often a transient error is retried, and how long to wait first.

    Attributes:
        attempts: calls in all, the first one included (1: no retry).
        backoff: seconds before the second call; doubled before each next.
    """

    attempts: int = 3
    backoff: float = 0.5

    def __post_init__(self) -> None:
        if isinstance(self.attempts, bool) or not isinstance(self.attempts, int):
            raise ValueError(
                f"Retry attempts must be a whole number, not {self.attempts!r}."
            )
        if self.attempts < 1 or self.backoff < 0:
            raise ValueError(
                f"Retry(attempts={self.attempts}, backoff={self.backoff}) is not "
                "valid: attempts counts the first call (>= 1), backoff is "
                "seconds (>= 0)."
            )

    def call(self, function: Any, *args: Any, **kwargs: Any) -> Any:
        """Call ``function``, again after ``OSError`` while attempts remain."""
        delay = self.backoff
        for attempt in range(1, self.attempts + 1):
            try:
                return function(*args, **kwargs)
            except OSError as error:
                if attempt == self.attempts:
                    raise
                log.warning(
                    "%s failed (%r); retrying in %.2g s (attempt %d of %d)",
                    getattr(function, "__qualname__", function),
                    error,
                    delay,
                    attempt + 1,
                    self.attempts,
                )
                time.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")  # pragma: no cover


@dataclass(frozen=True)
class Outcome:
    """What one broadcast did: results, and which plugins handled it."""

    results: list[Any]
    delivered: list[str]
    failed: dict[str, BaseException]


@dataclass(frozen=True)
class PluginInfo:
    """What ``lamin-lightning plugins`` lists for one plugin."""

    name: str
    distribution: str | None
    version: str | None
    hooks: tuple[str, ...]
    status: str


class PluginBus:
    """A pluggy manager for one callback, plus the failure policy."""

    def __init__(
        self, manager: pluggy.PluginManager, retry: Retry | None = None
    ) -> None:
        self.manager = manager
        self.retry = retry or Retry()
        self.failures: list[DeliveryFailure] = []
        self.distributions: dict[str, tuple[str, str]] = {}
        self.inactive: dict[str, str] = {}
        self.tracked: set[str] = set()
        self._warned: set[str] = set()

    def register(
        self, plugin: object, name: str | None = None, *, tracked: bool = False
    ) -> str:
        """Register a plugin object and validate its hooks.

        Args:
            plugin: an object or module with ``hookimpl`` functions.
            name: its name; a tracked plugin without one is named after its
                module or class, which another process can name again.
            tracked: journal its deliveries, so ``replay`` can redo them.

        Raises:
            PluginLoadError: if a hook is unknown or has a wrong signature.
        """
        if tracked and name is None:
            name = _stable_name(plugin)
            base, n = name, 1
            while self.manager.has_plugin(name):
                n += 1
                name = f"{base}#{n}"
        try:
            registered = self.manager.register(plugin, name=name)
        except pluggy.PluginValidationError as error:
            raise PluginLoadError(_explain_invalid(error)) from error
        if registered is None:
            raise PluginLoadError(f"Plugin {name!r} is blocked or already present.")
        self.check_pending()
        if tracked:
            self.tracked.add(registered)
        return registered

    def tracked_for(self, hook_name: str) -> list[str]:
        """Tracked plugins that implement ``hook_name``, in call order."""
        hook = getattr(self.manager.hook, hook_name)
        impls = reversed(hook.get_hookimpls())
        return [i.plugin_name for i in impls if i.plugin_name in self.tracked]

    def check_pending(self) -> None:
        """Reject hook implementations that match no hook specification."""
        try:
            self.manager.check_pending()
        except pluggy.PluginValidationError as error:
            raise PluginLoadError(_explain_invalid(error)) from error

    def distribution_of(self, plugin: str) -> str | None:
        dist = self.distributions.get(plugin)
        return f"{dist[0]} {dist[1]}" if dist else None

    def run_uid(self) -> str | None:
        """Ask the persister for the tracked run's UID."""
        uid: str | None = self.manager.hook.lamin_lightning_run_uid()
        return uid

    def prepare_run(self, event: FitStartedEvent) -> None:
        """Let the persister check features and annotate the run (loud)."""
        self.manager.hook.lamin_lightning_prepare_run(event=event)

    def persist(self, request: PersistRequest) -> PersistedArtifact:
        """Persist a file through the first persister that answers.

        Raises:
            PersistError: naming the plugin and the file, if a persister failed.
        """
        hook = self.manager.hook.lamin_lightning_persist_artifact
        for impl in reversed(hook.get_hookimpls()):
            try:
                result = self.retry.call(_call, impl, request=request)
            except Exception as error:
                raise PersistError(
                    f"Persister {self._describe(impl.plugin_name)} failed to store "
                    f"{request.local_path} as {request.key!r}: {error}. The file is "
                    "still on local disk. Fix the cause (see the error above) or "
                    f"{self._switch_off_hint(impl.plugin_name)}."
                ) from error
            if result is not None:
                return result  # type: ignore[no-any-return]
        raise PersistError(f"No persister stored {request.local_path}.")

    def delete(self, event: LifecycleEvent) -> None:
        """Mirror a deletion in the persister; errors are loud as for ``persist``."""
        hook = self.manager.hook.lamin_lightning_delete_artifact
        for impl in reversed(hook.get_hookimpls()):
            try:
                if self.retry.call(_call, impl, event=event) is not None:
                    return
            except Exception as error:
                raise PersistError(
                    f"Persister {self._describe(impl.plugin_name)} failed to "
                    f"delete {getattr(event, 'key', '?')!r}: {error}"
                ) from error

    def broadcast(self, hook_name: str, event: LifecycleEvent) -> list[Any]:
        """Call every implementation of a broadcast hook, isolating failures.

        Returns:
            The non-None results, in call order.
        """
        return self.deliver(hook_name, event).results

    def deliver(
        self,
        hook_name: str,
        event: LifecycleEvent,
        only: Iterable[str] | None = None,
    ) -> Outcome:
        """Broadcast to every plugin, or to those named in ``only``.

        Each plugin's transient errors are retried; a plugin that still fails
        is recorded (see the module docstring) and the others are called.
        """
        hook = getattr(self.manager.hook, hook_name)
        wanted = None if only is None else set(only)
        outcome = Outcome([], [], {})
        for impl in reversed(hook.get_hookimpls()):
            if wanted is not None and impl.plugin_name not in wanted:
                continue
            try:
                result = self.retry.call(_call, impl, event=event)
            except Exception as error:
                self._record_failure(impl.plugin_name, hook_name, event, error)
                outcome.failed[impl.plugin_name] = error
            else:
                outcome.delivered.append(impl.plugin_name)
                if result is not None:
                    outcome.results.append(result)
        return outcome

    def link_backend_runs(self, run_uid: str | None, links: list[Any]) -> None:
        """Hand registrars' runs to the persister (loud, like ``persist``)."""
        self.manager.hook.lamin_lightning_link_backend_runs(
            run_uid=run_uid, links=links
        )

    def _record_failure(
        self, plugin: str, hook: str, event: LifecycleEvent, error: Exception
    ) -> None:
        failure = DeliveryFailure(
            plugin, self.distribution_of(plugin), hook, event, error
        )
        self.failures.append(failure)
        first = plugin not in self._warned
        journaled = hook in _ARTIFACT_HOOKS  # fit events are not
        log.error(
            "Plugin %s failed in %s for %s: %r; training goes on and the event "
            "is kept in Checkpoint.delivery_failures%s",
            self._describe(plugin),
            hook,
            getattr(event, "key", event.event_id),
            error,
            " and the journal" if journaled else "",
            exc_info=error if first else None,  # one traceback per plugin
        )
        if first:
            self._warned.add(plugin)
            warnings.warn(
                f"Plugin {self._describe(plugin)} failed in {hook}: {error!r}. "
                "Training goes on; later failures of this plugin are logged only.",
                PluginDeliveryWarning,
                stacklevel=2,
            )

    def _switch_off_hint(self, plugin: str) -> str:
        if plugin in self.distributions:  # installed through an entry point
            return f"switch the plugin off with {DISABLE_ENV}={plugin}"
        return "leave the plugin out of Checkpoint(plugins=...)"

    def _describe(self, plugin: str) -> str:
        dist = self.distribution_of(plugin)
        return f"{plugin!r} (from {dist})" if dist else repr(plugin)

    def plugin_infos(self) -> list[PluginInfo]:
        """Describe active and inactive plugins, sorted by name."""
        infos = []
        for name, plugin in self.manager.list_name_plugin():
            callers = self.manager.get_hookcallers(plugin) or []
            dist = self.distributions.get(name)
            infos.append(
                PluginInfo(
                    name=name,
                    distribution=dist[0] if dist else None,
                    version=dist[1] if dist else None,
                    hooks=tuple(sorted(caller.name for caller in callers)),
                    status="active",
                )
            )
        for name, reason in self.inactive.items():
            dist = self.distributions.get(name)
            infos.append(
                PluginInfo(
                    name,
                    dist[0] if dist else None,
                    dist[1] if dist else None,
                    (),
                    reason,
                )
            )
        return sorted(infos, key=lambda info: info.name)


def disabled_from_env() -> set[str]:
    raw = os.environ.get(DISABLE_ENV, "")
    return {name.strip() for name in raw.split(",") if name.strip()}


def create_bus(
    plugins: Iterable[object] = (),
    disable: Iterable[str] = (),
    autoload: bool | None = None,
    retry: Retry | None = None,
) -> PluginBus:
    """Build a bus: hook specs, the local persister, entry points, ``plugins``.

    Args:
        plugins: plugin objects to register in addition to entry points.
        disable: plugin names to block (added to ``LAMIN_LIGHTNING_DISABLE_PLUGINS``).
        autoload: load entry-point plugins; defaults to true unless
            ``LAMIN_LIGHTNING_DISABLE_AUTOLOAD=1``.
        retry: how transient plugin errors are retried.

    Raises:
        PluginLoadError: if any plugin fails to import or validate; every
            plugin is tried first and all failures are listed.
    """
    manager = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    manager.add_hookspecs(hookspecs)
    bus = PluginBus(manager, retry)
    for name in {*disable, *disabled_from_env()}:
        manager.set_blocked(name)
    bus.register(_local, name=LOCAL_PERSISTER)
    bus.distributions[LOCAL_PERSISTER] = _own_distribution()
    if autoload is None:
        autoload = os.environ.get(AUTOLOAD_ENV, "") not in ("1", "true", "yes")
    if autoload:
        _load_entry_points(bus)
    for plugin in plugins:
        bus.register(plugin, tracked=True)
    return bus


def _own_distribution() -> tuple[str, str]:
    try:
        return ("lamin-lightning", version("lamin-lightning"))
    except PackageNotFoundError:  # running from a source tree, not installed
        return ("lamin-lightning", "unknown")


def _load_entry_points(bus: PluginBus) -> None:
    # pluggy's load_setuptools_entrypoints stops at the first broken plugin and
    # does not say which distribution it came from; we try them all and report
    # every failure at once, before training starts.
    problems = []
    for ep in entry_points(group=hookspecs.PROJECT_NAME):
        dist = getattr(ep, "dist", None)
        if dist is not None:
            bus.distributions[ep.name] = (dist.metadata["Name"], dist.version)
        if bus.manager.is_blocked(ep.name):
            bus.inactive[ep.name] = "disabled"
            log.debug("Plugin %r is disabled", ep.name)
            continue
        if bus.manager.has_plugin(ep.name):
            continue
        try:
            plugin = ep.load()
        except PluginUnavailable as unavailable:
            bus.inactive[ep.name] = f"inactive: {unavailable}"
            log.debug("Plugin %r inactive: %s", ep.name, unavailable)
            continue
        except Exception as error:
            problems.append(
                f"- {bus._describe(ep.name)} failed to import from {ep.value!r}: "
                f"{type(error).__name__}: {error}"
            )
            continue
        try:
            bus.register(plugin, name=ep.name, tracked=True)
        except PluginLoadError as error:
            problems.append(f"- {bus._describe(ep.name)}: {error}")
    if problems:
        raise PluginLoadError(
            "Some lamin-lightning plugins could not be loaded:\n"
            + "\n".join(problems)
            + f"\nFix or uninstall them, or switch them off by name with "
            f"{DISABLE_ENV}=<name>[,<name>...] or Checkpoint(disable_plugins=[...])."
        )


def _explain_invalid(error: pluggy.PluginValidationError) -> str:
    known = [name for name in dir(hookspecs) if name.startswith("lamin_lightning_")]
    text = str(error)
    hint = ""
    for word in text.replace("'", " ").split():
        if word.startswith("lamin_lightning_") and word not in known:
            close = difflib.get_close_matches(word, known, n=1)
            if close:
                hint = f" Did you mean {close[0]!r}?"
    return (
        f"Invalid hook implementation in plugin {error.plugin!r}: {text}.{hint} "
        f"Known hooks: {', '.join(known)} (see lamin_lightning_core.hookspecs)."
    )


def _stable_name(plugin: object) -> str:
    # A name another process derives again for the same plugin, so that the
    # journal can tell replay which plugins still owe an event.
    module_name = getattr(plugin, "__name__", None)
    if isinstance(module_name, str) and not isinstance(plugin, type):
        return module_name
    cls = plugin if isinstance(plugin, type) else type(plugin)
    return f"{cls.__module__}.{cls.__qualname__}"


def _call(impl: pluggy.HookImpl, **kwargs: Any) -> Any:
    # An implementation may accept any subset of the hook's arguments.
    return impl.function(*(kwargs[name] for name in impl.argnames))
