"""Exceptions and warnings that a user or plugin author can act on."""

from __future__ import annotations


class LaminLightningError(Exception):
    """Base class of every error raised by lamin-lightning."""


class PluginLoadError(LaminLightningError):
    """One or more installed plugins could not be loaded or validated."""


class PersistError(LaminLightningError):
    """A persister failed to store a file; the file is still on local disk."""


class PluginUnavailable(ImportError):
    """Raised by an adapter module whose backend library is not installed.

    The plugin loader treats it as "extra not installed": the plugin stays
    inactive and nothing is reported beyond a DEBUG log line. Any other
    exception raised while importing a plugin is an error.

    Args:
        plugin: the entry-point name of the plugin.
        extra: the ``lamin-lightning`` extra that installs its backend.
    """

    def __init__(self, plugin: str, extra: str) -> None:
        super().__init__(
            f"The {plugin!r} plugin needs its backend: "
            f'pip install "lamin-lightning[{extra}]"'
        )
        self.plugin = plugin
        self.extra = extra


class LaminLightningWarning(UserWarning):
    """Misuse or a degraded backend that the user can fix."""


class PluginDeliveryWarning(LaminLightningWarning):
    """A registrar or observer failed; training went on, the event is kept."""
