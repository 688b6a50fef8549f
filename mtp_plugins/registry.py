"""Named strategies through stevedore: one plugin chosen by a short name.

Built-ins are entry points of this distribution, declared exactly like a third party's, so a plugin
package adds a decoder by declaring ``[project.entry-points."mtp_plugins.decoders"]``.
"""

from __future__ import annotations

import difflib
import functools
import importlib.metadata
from typing import Any

from stevedore import DriverManager, ExtensionManager
from stevedore.exception import NoMatches

DECODERS = "mtp_plugins.decoders"
LOSSES = "mtp_plugins.losses"

_KIND = {DECODERS: "decoder", LOSSES: "loss"}


class UnknownPluginError(ValueError):
    """A plugin name that no installed distribution provides."""


class PluginLoadError(ImportError):
    """A registered plugin whose entry point cannot be imported."""


def plugin_names(namespace: str) -> list[str]:
    """Names registered under ``namespace``, read from installed metadata without importing them."""
    manager = ExtensionManager.make_test_instance([], namespace=namespace)
    return sorted(set(manager.entry_points_names()))


def unknown_name_message(namespace: str, name: str) -> str:
    kind = _KIND.get(namespace, "plugin")
    names = plugin_names(namespace)
    close = difflib.get_close_matches(name, names, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown {kind} {name!r}{hint} available: {', '.join(names) or '(none installed)'}"


def _raise_load_failure(manager: Any, entry_point: Any, error: Exception) -> None:
    kind = _KIND.get(manager.namespace, "plugin")
    dist = _distribution_of(manager.namespace, entry_point)
    raise PluginLoadError(
        f"{kind} {entry_point.name!r} ({entry_point.value}, from {dist}) failed to load: "
        f"{type(error).__name__}: {error}"
    ) from error


def _distribution_of(namespace: str, entry_point: Any) -> str:
    """The installed distribution that declares ``entry_point`` (stevedore's cache drops it)."""
    for dist in importlib.metadata.distributions():
        for ep in dist.entry_points.select(group=namespace, name=entry_point.name):
            if ep.value == entry_point.value:
                return f"{dist.metadata['Name']} {dist.version}"
    return "an unknown distribution"


def _ignore_missing(names: object) -> None:
    """A missing name is reported by ``load_plugin``'s own error, with suggestions."""


@functools.lru_cache(maxsize=None)
def load_plugin(namespace: str, name: str) -> Any:
    """The object an entry point named ``name`` under ``namespace`` refers to (loaded lazily, cached)."""
    if not isinstance(name, str) or not name:
        raise UnknownPluginError(unknown_name_message(namespace, str(name)))
    try:
        manager = DriverManager(
            namespace,
            name,
            invoke_on_load=False,
            on_load_failure_callback=_raise_load_failure,
            on_missing_entrypoints_callback=_ignore_missing,
        )
    except NoMatches:
        raise UnknownPluginError(unknown_name_message(namespace, name)) from None
    return manager.driver


def refresh() -> None:
    """Forget cached entry points, e.g. after installing a plugin into the running interpreter."""
    load_plugin.cache_clear()
    ExtensionManager.ENTRY_POINT_CACHE.clear()


def load_decoder(name: str) -> type:
    """The decoder class registered as ``name`` (see ``mtp_plugins.decoding.base.Decoder``)."""
    from mtp_plugins.decoding.base import DECODER_API_VERSION, Decoder

    return _load_subclass(DECODERS, name, Decoder, "mtp_plugins.decoding.Decoder", DECODER_API_VERSION)


def load_loss(name: str) -> type:
    """The loss class registered as ``name`` (see ``mtp_plugins.losses.Loss``)."""
    from mtp_plugins.losses import LOSS_API_VERSION, Loss

    return _load_subclass(LOSSES, name, Loss, "mtp_plugins.losses.Loss", LOSS_API_VERSION)


def _load_subclass(namespace: str, name: str, base: type, base_name: str, version: int) -> type:
    kind = _KIND[namespace]
    cls = load_plugin(namespace, name)
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise TypeError(f"{kind} {name!r} ({cls!r}) is not a subclass of {base_name}")
    if cls.api_version != version:
        raise TypeError(
            f"{kind} {name!r} implements {kind} API {cls.api_version}; this mtp-plugins speaks API {version}"
        )
    return cls
