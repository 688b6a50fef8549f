"""Lifecycle hooks (pluggy): every registered plugin is called at each event.

A plugin is any object (a module, or an instance) with ``@hookimpl`` functions named like the
specifications below, declared under the entry-point group ``mtp_plugins.hooks``. The built-in
metrics file and progress display are registered that way too. Hook arguments are plain data
(dicts, ints, strings), so plugins need nothing of torch.
"""

from __future__ import annotations

from typing import Any

import pluggy

PROJECT = "mtp_plugins"
GROUP = "mtp_plugins.hooks"

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
        """A validation pass ended (loss, per-offset agreement, Eff. k at tau 0.9)."""

    @hookspec
    def mtp_checkpoint_saved(self, path: str, step: int) -> None:
        """A complete checkpoint directory now exists at ``path``."""

    @hookspec
    def mtp_train_end(self, summary: dict[str, Any]) -> None:
        """Training ended; ``summary`` names the exported directory and the last metrics."""

    @hookspec
    def mtp_generation_finished(self, summary: dict[str, Any], samples_path: str | None) -> None:
        """An lm-eval run's generation requests are done; ``summary`` is the MTP decode statistics."""


def plugin_manager(*extra: object) -> pluggy.PluginManager:
    """A manager with the specs, every installed ``mtp_plugins.hooks`` plugin, and ``extra`` ones."""
    manager = pluggy.PluginManager(PROJECT)
    manager.add_hookspecs(Specs)
    manager.load_setuptools_entrypoints(GROUP)
    for plugin in extra:
        manager.register(plugin)
    return manager
