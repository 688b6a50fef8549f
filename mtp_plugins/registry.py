"""The plugin registry: named strategies through stevedore, and a listing of every plugin.

Built-ins are entry points of this distribution, declared exactly like a third party's, so a plugin
package adds a decoder by declaring ``[project.entry-points."mtp_plugins.decoders"]`` (see
``docs/plugins.md``). Three entry-point groups:

- ``mtp_plugins.losses``: loss classes (``mtp_plugins.losses.Loss``), chosen by ``mtp-train --loss``;
- ``mtp_plugins.decoders``: decoder classes (``mtp_plugins.decoding.Decoder``), chosen by
  ``strategy=`` in ``generate`` and lm-eval's model_args;
- ``mtp_plugins.hooks``: lifecycle hook plugins (pluggy; ``mtp_plugins.hooks``).

Isolation: a plugin is imported only when it is asked for (losses, decoders) or, for hooks, one by
one with its failure caught; a broken plugin is reported with its distribution and entry point and
never stops the built-ins or other plugins. Two distributions registering one name is an error
naming both, raised when that name is used.
"""

from __future__ import annotations

import difflib
import functools
import importlib.metadata
import logging
from dataclasses import dataclass
from typing import Any

from stevedore import DriverManager, ExtensionManager
from stevedore import _cache as _stevedore_cache
from stevedore.exception import NoMatches

DECODERS = "mtp_plugins.decoders"
LOSSES = "mtp_plugins.losses"
HOOKS = "mtp_plugins.hooks"
GROUPS = (LOSSES, DECODERS, HOOKS)

_KIND = {DECODERS: "decoder", LOSSES: "loss", HOOKS: "hook plugin"}
log = logging.getLogger("mtp_plugins")

# stevedore would also keep its entry-point scan in ~/.cache/python-entrypoints; we scan the metadata
# ourselves (``entries``) anyway, and write nothing outside the output directory and the HF cache.
if hasattr(getattr(_stevedore_cache, "_c", None), "_disable_caching"):
    _stevedore_cache._c._disable_caching = True


class PluginError(Exception):
    """Base of the registry's errors; the CLIs print its message as one line."""


class UnknownPluginError(PluginError, ValueError):
    """A plugin name that no installed distribution provides."""


class PluginLoadError(PluginError, ImportError):
    """A registered plugin that cannot be imported, or whose object is not a valid plugin."""


class PluginConflictError(PluginError, ValueError):
    """Two installed distributions register the same name in one group."""


@dataclass(frozen=True)
class Entry:
    """One registered plugin, as read from installed metadata (nothing imported)."""

    group: str
    name: str
    value: str  # "module:attribute"
    distribution: str
    version: str

    @property
    def kind(self) -> str:
        return _KIND.get(self.group, "plugin")

    @property
    def origin(self) -> str:
        return f"{self.name} = {self.value}, from {self.distribution} {self.version}"


@functools.lru_cache(maxsize=None)
def entries(group: str) -> tuple[Entry, ...]:
    """Every entry point of ``group``, one per (name, distribution), sorted by name."""
    found: dict[tuple[str, str], Entry] = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"] or "an unnamed distribution"
        for ep in dist.entry_points.select(group=group):
            found.setdefault((ep.name, name), Entry(group, ep.name, ep.value, name, dist.version or "?"))
    return tuple(sorted(found.values(), key=lambda e: (e.name, e.distribution)))


def plugin_names(namespace: str) -> list[str]:
    """Names registered under ``namespace``, read from installed metadata without importing them."""
    return sorted({e.name for e in entries(namespace)})


def unknown_name_message(namespace: str, name: str) -> str:
    kind = _KIND.get(namespace, "plugin")
    names = plugin_names(namespace)
    close = difflib.get_close_matches(name, names, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown {kind} {name!r}{hint} available: {', '.join(names) or '(none installed)'}"


def conflict_message(found: list[Entry]) -> str:
    first = found[0]
    where = " and ".join(f"{e.distribution} {e.version} ({e.value})" for e in found)
    return (
        f"{first.kind} name {first.name!r} is registered by more than one distribution: {where}; "
        "uninstall one of them"
    )


def _entry(namespace: str, name: str) -> Entry:
    found = [e for e in entries(namespace) if e.name == name]
    if not found:
        raise UnknownPluginError(unknown_name_message(namespace, name))
    if len(found) > 1:
        raise PluginConflictError(conflict_message(found))
    return found[0]


def _load_failure(entry: Entry, error: BaseException) -> PluginLoadError:
    return PluginLoadError(f"{entry.kind} {entry.origin}: failed to load: {type(error).__name__}: {error}")


def _raise(manager: Any, entry_point: Any, error: Exception) -> None:
    raise error


def _ignore_missing(names: object) -> None:
    """A missing name is reported by ``load_plugin``'s own error, with suggestions."""


def _import(entry: Entry) -> Any:
    """The object an entry refers to, loaded through stevedore; any failure becomes PluginLoadError."""
    try:
        manager = DriverManager(
            entry.group, entry.name, invoke_on_load=False,
            on_load_failure_callback=_raise, on_missing_entrypoints_callback=_ignore_missing,
        )
        return manager.driver
    except NoMatches:
        raise UnknownPluginError(unknown_name_message(entry.group, entry.name)) from None
    except Exception as error:  # an import error, or anything the plugin's module raises on import
        raise _load_failure(entry, error) from error


@functools.lru_cache(maxsize=None)
def load_plugin(namespace: str, name: str) -> Any:
    """The object registered as ``name`` under ``namespace`` (imported on first use, then cached)."""
    if not isinstance(name, str) or not name:
        raise UnknownPluginError(unknown_name_message(namespace, str(name)))
    return _import(_entry(namespace, name))


def refresh() -> None:
    """Forget cached entry points, e.g. after installing a plugin into the running interpreter."""
    load_plugin.cache_clear()
    entries.cache_clear()
    ExtensionManager.ENTRY_POINT_CACHE.clear()
    # stevedore also memoises the scan per sys.path (keyed by the path alone, so a package installed
    # into a directory already on sys.path would stay unseen); its on-disk cache checks mtimes.
    internal = getattr(getattr(_stevedore_cache, "_c", None), "_internal", None)
    if isinstance(internal, dict):
        internal.clear()
    importlib.invalidate_caches()


def load_decoder(name: str) -> type:
    """The decoder class registered as ``name`` (see ``mtp_plugins.decoding.base.Decoder``)."""
    from mtp_plugins.decoding.base import DECODER_API_VERSION, Decoder

    return _checked(DECODERS, name, load_plugin(DECODERS, name), Decoder, "mtp_plugins.decoding.Decoder", DECODER_API_VERSION)


def load_loss(name: str) -> type:
    """The loss class registered as ``name`` (see ``mtp_plugins.losses.Loss``)."""
    from mtp_plugins.losses import LOSS_API_VERSION, Loss

    return _checked(LOSSES, name, load_plugin(LOSSES, name), Loss, "mtp_plugins.losses.Loss", LOSS_API_VERSION)


def _checked(namespace: str, name: str, cls: Any, base: type, base_name: str, version: int) -> type:
    entry = _entry(namespace, name)
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise PluginLoadError(f"{entry.kind} {entry.origin}: {cls!r} is not a subclass of {base_name}")
    if getattr(cls, "api_version", None) != version:
        raise PluginLoadError(
            f"{entry.kind} {entry.origin}: implements {entry.kind} API {getattr(cls, 'api_version', None)}; "
            f"this mtp-plugins speaks API {version}"
        )
    return cls


# ---------------------------------------------------------------- listing and isolation

_reported: set[tuple[str, str, str]] = set()


def report_once(entry: Entry, message: str) -> None:
    """Log a broken plugin once per process (hooks are loaded on every run)."""
    key = (entry.group, entry.name, entry.distribution)
    if key not in _reported:
        _reported.add(key)
        log.warning("mtp-plugins: skipping broken %s", message)


@dataclass(frozen=True)
class PluginStatus:
    entry: Entry
    error: str | None  # None: it loads and is a valid plugin of its group

    @property
    def ok(self) -> bool:
        return self.error is None


def check(entry: Entry) -> PluginStatus:
    """Import one plugin and validate it for its group; never raises."""
    duplicates = [e for e in entries(entry.group) if e.name == entry.name]
    if len(duplicates) > 1:
        return PluginStatus(entry, conflict_message(duplicates))
    try:
        if entry.group == LOSSES:
            load_loss(entry.name)
        elif entry.group == DECODERS:
            load_decoder(entry.name)
        else:
            from mtp_plugins.hooks import validate_hook_plugin

            validate_hook_plugin(entry, load_plugin(entry.group, entry.name))
    except PluginError as error:
        return PluginStatus(entry, str(error))
    return PluginStatus(entry, None)


def list_plugins(groups: tuple[str, ...] = GROUPS) -> list[PluginStatus]:
    """Every installed loss, decoder and hook plugin, each imported and checked."""
    return [check(entry) for group in groups for entry in entries(group)]
