"""Installed by the wheel as the top-level module ``_mtp_plugins_startup``, which the root-level
``mtp_plugins.pth`` imports at interpreter start.

It runs ``mtp_plugins/lm_eval/_startup.py`` by file path, without importing the ``mtp_plugins``
package (whose imports would pull torch into every Python process). Standard library only, and only
its cheapest parts (``importlib.machinery``, not ``importlib.util``); never raises. See
``_startup.py`` for what the shim does.
"""


def _run_startup_shim():
    import os
    import sys
    from importlib.machinery import PathFinder, SourceFileLoader

    package = PathFinder.find_spec("mtp_plugins")  # locates the package without importing it
    for location in (package.submodule_search_locations or []) if package else []:
        path = os.path.join(location, "lm_eval", "_startup.py")
        if os.path.isfile(path):
            name = "_mtp_plugins_lm_eval_startup"
            module = type(sys)(name)
            module.__file__ = path
            module.__loader__ = SourceFileLoader(name, path)
            module.__loader__.exec_module(module)
            return


try:
    _run_startup_shim()
except Exception:
    pass
