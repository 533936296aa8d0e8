"""Observers: composition instead of inheritance, delivered through the bus."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

from lamin_lightning_core.hookspecs import hookimpl

if TYPE_CHECKING:
    from lamin_lightning_core._events import ArtifactRemovedEvent, ArtifactSavedEvent

_METHODS = ("on_artifact_saved", "on_artifact_removed")


@runtime_checkable
class ArtifactObserver(Protocol):
    """Anything with ``on_artifact_saved`` and/or ``on_artifact_removed``.

    An observer may define only one of the two methods. It receives the same
    event objects as subclasses and bus plugins, on global rank zero.
    """

    def on_artifact_saved(self, event: ArtifactSavedEvent) -> None: ...

    def on_artifact_removed(self, event: ArtifactRemovedEvent) -> None: ...


def check_observer(observer: object) -> None:
    """Raise ``TypeError`` if ``observer`` has neither observer method."""
    if not any(callable(getattr(observer, name, None)) for name in _METHODS):
        raise TypeError(
            f"artifact_observers got {observer!r}, which has neither "
            "on_artifact_saved(event) nor on_artifact_removed(event). Define at "
            "least one of them (see lamin_lightning_core.ArtifactObserver)."
        )


class ObserverPlugin:
    """Adapts an observer (or a ``Checkpoint`` subclass) to the bus hooks."""

    def __init__(self, observer: object) -> None:
        self.observer = observer

    @hookimpl
    def lamin_lightning_artifact_saved(self, event: ArtifactSavedEvent) -> None:
        method = getattr(self.observer, "on_artifact_saved", None)
        if method is not None:
            method(event)

    @hookimpl
    def lamin_lightning_artifact_removed(self, event: ArtifactRemovedEvent) -> None:
        method = getattr(self.observer, "on_artifact_removed", None)
        if method is not None:
            method(event)
