"""Lifecycle hooks (pluggy): every registered plugin is called at each event.

A plugin is any object (a module, or an instance) with ``@hookimpl`` functions named like the
specifications below, declared under the entry-point group ``mtp_plugins.hooks``. The built-in
metrics file and progress display are registered that way too. Hook arguments are plain data
(dicts, ints, strings), so plugins need nothing of torch.
"""

from __future__ import annotations

from typing import Any

import pluggy

from mtp_plugins.registry import (
    HOOKS,
    Entry,
    PluginConflictError,
    PluginError,
    PluginLoadError,
    UnknownPluginError,
    conflict_message,
    entries,
    load_plugin,
    report_once,
)

PROJECT = "mtp_plugins"
GROUP = HOOKS

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


class Specs:
    """The hook specifications (API version 1)."""

    @hookspec
    def mtp_train_start(self, config: dict[str, Any], output_dir: str, start_step: int, total_steps: int | None) -> None:
        """Training starts (or resumes at ``start_step``); ``config`` is the TrainConfig as a dict."""

    @hookspec
    def mtp_step_end(self, step: int, metrics: dict[str, Any]) -> None:
        """An optimizer step ended; ``metrics`` holds at least step, k, loss, lr, tokens_per_s."""

    @hookspec
    def mtp_validation_end(self, step: int, metrics: dict[str, Any]) -> None:
        """A validation pass ended (loss, per-offset agreement, a one-pass estimate of Eff. k at tau 0.9)."""

    @hookspec
    def mtp_checkpoint_saved(self, path: str, step: int) -> None:
        """A complete checkpoint directory now exists at ``path``."""

    @hookspec
    def mtp_train_end(self, summary: dict[str, Any]) -> None:
        """Training ended; ``summary`` names the exported directory and the last metrics."""

    @hookspec
    def mtp_generation_finished(self, summary: dict[str, Any], samples_path: str | None) -> None:
        """An lm-eval run's generation requests are done; ``summary`` is the MTP decode statistics."""


HOOKS_API_VERSION = 1


class HookPluginError(PluginError):
    """A hook plugin asked for (``--report-to``) that cannot run, e.g. its package is not installed."""


def _hook_names() -> set[str]:
    return {name for name in dir(Specs) if name.startswith("mtp_")}


def validate_hook_plugin(entry: Entry, plugin: Any) -> None:
    """Raise PluginLoadError unless ``plugin`` implements at least one hook, each one a known hook."""
    implemented = {name for name in dir(plugin) if name.startswith("mtp_") and callable(getattr(plugin, name, None))}
    unknown = sorted(implemented - _hook_names())
    if unknown:
        raise PluginLoadError(f"{entry.kind} {entry.origin}: unknown hook(s) {', '.join(unknown)}; known: {', '.join(sorted(_hook_names()))}")
    if not implemented:
        raise PluginLoadError(f"{entry.kind} {entry.origin}: implements none of the hooks {', '.join(sorted(_hook_names()))}")
    unmarked = sorted(name for name in implemented if not hasattr(getattr(plugin, name), f"{PROJECT}_impl"))
    if unmarked:
        raise PluginLoadError(
            f"{entry.kind} {entry.origin}: {', '.join(unmarked)} not marked with @mtp_plugins.hooks.hookimpl"
        )


def opt_in_names() -> list[str]:
    """Hook plugins that run only when named by ``--report-to`` (their object has ``opt_in = True``)."""
    names = []
    for entry in entries(HOOKS):
        try:
            if getattr(load_plugin(HOOKS, entry.name), "opt_in", False):
                names.append(entry.name)
        except PluginError:
            continue
    return sorted(set(names))


def parse_report_to(value: str | list[str] | tuple[str, ...] | None) -> list[str]:
    """``"wandb,tensorboard"`` (or a list) -> names; empty entries dropped."""
    if value is None:
        return []
    parts = value.split(",") if isinstance(value, str) else list(value)
    return [p.strip() for p in parts if p and p.strip()]


def plugin_manager(*extra: object, report_to: str | list[str] | tuple[str, ...] | None = None) -> pluggy.PluginManager:
    """A manager with the specs, the installed ``mtp_plugins.hooks`` plugins, and ``extra`` ones.

    Every installed hook plugin is registered, except opt-in ones (``opt_in = True``) not named in
    ``report_to``. A plugin that fails to import, is not a valid hook plugin, or shares its name with
    another distribution's is reported once (logged with its distribution) and skipped; the others
    still run. A name in ``report_to`` that is not an installed, working hook plugin is an error.
    """
    selected = parse_report_to(report_to)
    manager = pluggy.PluginManager(PROJECT)
    manager.add_hookspecs(Specs)
    by_name: dict[str, list[Entry]] = {}
    for entry in entries(HOOKS):
        by_name.setdefault(entry.name, []).append(entry)
    for name in selected:
        if name not in by_name:
            raise UnknownPluginError(
                f"--report-to {name!r}: no hook plugin of that name; opt-in hook plugins installed: "
                f"{', '.join(opt_in_names()) or '(none)'}"
            )
        if len(by_name[name]) > 1:
            raise PluginConflictError(conflict_message(by_name[name]))
    for name, found in by_name.items():
        if len(found) > 1:
            report_once(found[0], conflict_message(found))
            continue
        entry = found[0]
        try:
            plugin = load_plugin(HOOKS, name)
            validate_hook_plugin(entry, plugin)
        except PluginError as error:
            if name in selected:
                raise
            report_once(entry, str(error))
            continue
        if getattr(plugin, "opt_in", False) and name not in selected:
            continue
        if name in selected and callable(getattr(plugin, "require", None)):
            plugin.require()  # e.g. its package is not installed: HookPluginError, before any work
        try:
            manager.register(plugin, name=name)
        except (pluggy.PluginValidationError, ValueError) as error:
            problem = PluginLoadError(f"{entry.kind} {entry.origin}: {error}")
            if name in selected:
                raise problem from error
            report_once(entry, str(problem))
    for plugin in extra:
        manager.register(plugin)
    return manager
