"""``mtp-lm-eval``: lm-eval's own command line with ``--model mtp`` and our tasks registered.

The fallback for environments where the ``.pth`` startup shim does not run (site-packages ``.pth``
files disabled, ``python -S``, ``MTP_PLUGINS_LM_EVAL_SHIM=0``): same flags as ``lm_eval``. A bad
``--model_args`` value of ``mtp`` is one line ``mtp-lm-eval: error: ...`` and exit status 2. Like
our other commands it tunes glibc malloc at start (``mtp_plugins/allocator.py``); plain ``lm_eval``
gets the same with ``MALLOC_MMAP_THRESHOLD_=67108864 MALLOC_TRIM_THRESHOLD_=268435456`` set.
"""

from __future__ import annotations

import sys


def main() -> None:
    import lm_eval.api.registry
    import lm_eval.tasks.manager
    from lm_eval.__main__ import cli_evaluate

    from mtp_plugins.allocator import tune_malloc
    from mtp_plugins.lm_eval import _startup

    tune_malloc()
    _startup.register_model(lm_eval.api.registry)
    _startup.add_tasks(lm_eval.tasks.manager)
    try:
        cli_evaluate()
    except Exception as error:
        if not _startup.is_user_error(error):
            raise
        print(f"mtp-lm-eval: error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
