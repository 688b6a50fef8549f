"""Startup shim: makes ``lm_eval --model mtp`` and our tasks work with lm-eval 0.4.x.

lm-eval 0.4.13 has no plugin discovery, so an installed package cannot add a model backend or tasks
by metadata alone. The wheel installs a root-level ``mtp_plugins.pth`` line whose bootstrap module
(``_bootstrap.py``) runs this file at interpreter start. It only puts a watcher on ``sys.meta_path``;
nothing happens unless a process imports lm-eval. Then:

- right after ``lm_eval.api.registry`` is imported: lm-eval's built-in models are registered first
  (registering into an empty registry would hide them), then ``mtp`` as a lazy
  ``"module:Class"`` target, so the backend's own imports (torch, transformers) wait for its use;
- right after ``lm_eval.tasks.manager`` is imported: ``TaskManager`` also indexes our tasks
  directory, before any ``--include_path`` (whose tasks keep precedence).

Rules: standard library only, cheap, idempotent, never raises (a failure here must not break an
unrelated Python program), retires wherever the installed lm-eval discovers plugins itself (its
module calls ``entry_points(``), and is switched off by ``MTP_PLUGINS_LM_EVAL_SHIM=0``.
"""

import os
import sys

ENV_SWITCH = "MTP_PLUGINS_LM_EVAL_SHIM"
MODEL_NAME = "mtp"
MODEL_TARGET = "mtp_plugins.lm_eval.model:MTPLM"
_REGISTRY = "lm_eval.api.registry"
_TASKS = "lm_eval.tasks.manager"


def enabled():
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


def has_native_discovery(module):
    """Whether this lm-eval module discovers plugins through entry points on its own."""
    try:
        with open(module.__file__, encoding="utf-8") as f:
            return "entry_points(" in f.read()
    except Exception:
        return False


def tasks_dir():
    """Our task YAMLs: ``mtp_plugins/tasks`` in a wheel, ``tasks/`` beside the package in a checkout."""
    import importlib.util

    spec = importlib.util.find_spec("mtp_plugins")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    package = list(spec.submodule_search_locations)[0]
    for candidate in (os.path.join(package, "tasks"), os.path.join(os.path.dirname(package), "tasks")):
        if os.path.isdir(candidate):
            return candidate
    return None


def register_model(registry):
    """Register ``mtp`` after lm-eval's built-in models (idempotent)."""
    if has_native_discovery(registry):
        return
    import lm_eval.models  # noqa: F401  (registers the built-ins; may be mid-import, which is fine)

    models = registry.model_registry
    if MODEL_NAME not in models:
        models.register(MODEL_NAME, target=MODEL_TARGET)


def add_tasks(manager_module):
    """Make every ``TaskManager`` index our tasks too (idempotent)."""
    if has_native_discovery(manager_module):
        return
    cls = manager_module.TaskManager
    if getattr(cls.__init__, "_mtp_plugins", False):
        return
    ours = tasks_dir()
    if ours is None:
        return
    import inspect

    original = cls.__init__
    signature = inspect.signature(original)
    if "include_path" not in signature.parameters:
        return

    def __init__(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        bound.arguments["include_path"] = _with_ours(bound.arguments.get("include_path"), ours)
        original(*bound.args, **bound.kwargs)

    __init__._mtp_plugins = True
    __init__.__doc__ = original.__doc__
    cls.__init__ = __init__


def _with_ours(include_path, ours):
    if include_path is None:
        paths = []
    elif isinstance(include_path, (list, tuple)):
        paths = list(include_path)
    else:
        paths = [include_path]
    if not any(os.path.abspath(str(p)) == os.path.abspath(ours) for p in paths):
        paths.insert(0, ours)  # later paths override earlier ones, so the user's keep precedence
    return paths


_AFTER_IMPORT = {_REGISTRY: register_model, _TASKS: add_tasks}


class _Loader:
    """Runs the real loader, then our step for that module, swallowing any failure of ours."""

    def __init__(self, loader, step):
        self._loader = loader
        self._step = step

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        try:
            self._step(module)
        except Exception:
            if os.environ.get("MTP_PLUGINS_DEBUG"):
                import traceback

                traceback.print_exc()

    def __getattr__(self, name):
        return getattr(self._loader, name)


class _Watcher:
    """A meta-path finder that only watches for the two lm-eval modules above."""

    mtp_plugins_watcher = True  # an attribute, not the class, marks it: this file may load twice

    def find_spec(self, name, path=None, target=None):
        step = _AFTER_IMPORT.get(name)
        if step is None:
            return None
        try:
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(name, path, target)
                if spec is not None:
                    if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                        spec.loader = _Loader(spec.loader, step)
                    return spec
        except Exception:
            return None
        return None


def install():
    """Put the watcher on sys.meta_path once, and catch up with lm-eval modules already imported."""
    try:
        if not enabled() or any(getattr(f, "mtp_plugins_watcher", False) for f in sys.meta_path):
            return
        sys.meta_path.insert(0, _Watcher())
        for name, step in _AFTER_IMPORT.items():
            module = sys.modules.get(name)
            if module is not None:
                step(module)
    except Exception:
        pass


install()
