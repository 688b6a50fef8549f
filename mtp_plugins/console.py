"""The shared console-script wrapper of our Typer commands (``mtp-train``, ``mtp-sweep``, ``mtp-demo``)."""

from __future__ import annotations

import sys
from typing import Any


def run_app(app: Any, program: str, user_errors: tuple[type[BaseException], ...], interrupted: str = "interrupted",
            workload: str = "decode") -> None:
    """Run ``app``; a user error becomes one line ``PROGRAM: error: ...`` and exit status 2 (no
    traceback), click's usage errors keep their own message and status, Ctrl-C exits 130. The
    process's allocator is tuned first, for ``workload`` (``allocator.py``; ``MTP_PLUGINS_MALLOC=0`` to
    keep glibc's)."""
    import click
    import typer

    from mtp_plugins.allocator import tune_malloc

    tune_malloc(workload)

    # Typer >= 0.24 vendors click: its usage errors derive from its own copy of ClickException.
    usage_errors = tuple({click.ClickException, *(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")})
    try:
        # Without standalone mode, Typer returns the status of a ``typer.Exit`` (Ctrl-C becomes 130).
        status = app(standalone_mode=False)
    except user_errors as error:
        print(f"{program}: error: {error}", file=sys.stderr)
        sys.exit(2)
    except typer.Exit as done:
        sys.exit(done.exit_code)
    except KeyboardInterrupt:
        print(f"{program}: {interrupted}", file=sys.stderr)
        sys.exit(130)
    except usage_errors as error:
        error.show()
        sys.exit(error.exit_code)
    if status == 130:
        print(f"{program}: {interrupted}", file=sys.stderr)
    if isinstance(status, int) and status:
        sys.exit(status)
