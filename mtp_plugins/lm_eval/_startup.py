"""Startup shim: makes ``lm_eval --model mtp`` and our tasks work with lm-eval 0.4.x.

lm-eval 0.4.13 has no plugin discovery, so an installed package cannot add a model backend or tasks
by metadata alone. The wheel installs a root-level ``mtp_plugins.pth`` line whose bootstrap module
(``_bootstrap.py``) runs this file at interpreter start. It only puts a watcher on ``sys.meta_path``;
nothing happens unless a process imports lm-eval. Then:

- right after ``lm_eval.api.registry`` is imported: lm-eval's built-in models are registered first
  (registering into an empty registry would hide them), then ``mtp`` as a lazy
  ``"module:Class"`` target, so the backend's own imports (torch, transformers) wait for its use;
- right after ``lm_eval.tasks.manager`` is imported: ``TaskManager`` also indexes our tasks
  directory, before any ``--include_path`` (whose tasks keep precedence);
- in the ``lm_eval`` command line itself (not in a program that imports lm-eval), a bad input of
  ours that nobody catches (a bad ``--model_args`` value of ``mtp``: ``MTPArgumentError``, a model
  that cannot load: ``CheckpointError``) is printed as one line ``lm_eval: error: ...`` instead of a
  traceback (``sys.excepthook``; Python's exit status for an uncaught error, 1, stays; any other
  error keeps its traceback, and ``MTP_PLUGINS_DEBUG=1`` shows ours too).

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
# Errors that name a bad input; looked up only in modules already imported (an error of a class
# whose module was never imported cannot have been raised).
USER_ERRORS = (("mtp_plugins.lm_eval.model", "MTPArgumentError"), ("mtp_plugins.checkpoint", "CheckpointError"))
CLI_NAMES = ("lm_eval", "lm-eval")


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
    if is_lm_eval_cli(sys.argv):
        name = os.path.basename(sys.argv[0])
        install_excepthook(name if name in CLI_NAMES else "lm_eval")  # ``python -m lm_eval``: lm_eval


def is_user_error(error):
    """Whether ``error`` is one of our one-line bad-input errors (see ``USER_ERRORS``)."""
    classes = [getattr(sys.modules.get(module), name, None) for module, name in USER_ERRORS]
    return any(isinstance(error, cls) for cls in classes if isinstance(cls, type))


def is_lm_eval_cli(argv):
    """Whether this process is lm-eval's command line (``lm_eval``, ``lm-eval``, ``python -m lm_eval``)."""
    program = argv[0] if argv else ""
    return os.path.basename(program) in CLI_NAMES or program.endswith(os.path.join("lm_eval", "__main__.py"))


def install_excepthook(program):
    """Print an uncaught bad-input error of ours as one line ``PROGRAM: error: ...`` (idempotent)."""
    previous = sys.excepthook
    if getattr(previous, "_mtp_plugins", False):
        return

    def excepthook(kind, error, traceback):
        try:
            if is_user_error(error) and not os.environ.get("MTP_PLUGINS_DEBUG"):
                print(f"{program}: error: {error}", file=sys.stderr, flush=True)
                return
        except Exception:
            pass
        previous(kind, error, traceback)

    excepthook._mtp_plugins = True
    sys.excepthook = excepthook


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
