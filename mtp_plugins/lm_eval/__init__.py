"""lm-evaluation-harness integration: the ``mtp`` model backend and its registration.

Importing this package imports nothing of lm-eval; ``mtp_plugins.lm_eval.model`` does.
"""

from mtp_plugins.lm_eval._startup import tasks_dir

__all__ = ["tasks_dir"]
