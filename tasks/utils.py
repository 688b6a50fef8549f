"""Helpers for the task YAMLs in this directory (loaded by lm-eval through ``!function``)."""

from __future__ import annotations

from pathlib import Path


def gsm8k_cot_exemplars() -> list[dict]:
    """The 8 chain-of-thought exemplars of the installed lm-eval's ``gsm8k_cot`` task, read from its
    own YAML, so that our tasks always prompt exactly as that task does."""
    import lm_eval.tasks
    from lm_eval.tasks._yaml_loader import load_yaml

    config = load_yaml(Path(lm_eval.tasks.__file__).parent / "gsm8k" / "gsm8k-cot.yaml", resolve_func=False)
    return list(config["fewshot_config"]["samples"])


def synthetic_gsm(**kwargs):
    """The offline GSM8K-style problems of ``mtp_plugins.synthetic`` as a DatasetDict (train, test)."""
    from mtp_plugins import synthetic

    return synthetic.dataset(**kwargs)  # it takes train_size, test_size, seed and ignores lm-eval's other metadata
