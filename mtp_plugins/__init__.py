"""Multi-token prediction by self-distillation.

A pretrained causal LM learns to predict k future tokens in one forward pass from k-1 appended mask
tokens; ConfAdapt decoding emits several tokens per pass when the model is confident.

The names below load on first use, so that importing a light submodule (``mtp_plugins.adapter_settings``,
``mtp_plugins.registry``) does not import torch and transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0.dev0"

_EXPORTS = {
    "MTPSpec": "mtp_plugins.checkpoint",
    "add_mask_tokens": "mtp_plugins.checkpoint",
    "load_checkpoint": "mtp_plugins.checkpoint",
    "read_mtp_spec": "mtp_plugins.checkpoint",
    "Decoder": "mtp_plugins.decoding",
    "GenerateOutput": "mtp_plugins.decoding",
    "GenerationStats": "mtp_plugins.decoding",
    "Proposals": "mtp_plugins.decoding",
    "generate": "mtp_plugins.decoding",
}

__all__ = sorted([*_EXPORTS, "__version__"])

if TYPE_CHECKING:
    from mtp_plugins.checkpoint import MTPSpec, add_mask_tokens, load_checkpoint, read_mtp_spec
    from mtp_plugins.decoding import Decoder, GenerateOutput, GenerationStats, Proposals, generate


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mtp_plugins' has no attribute {name!r}")
