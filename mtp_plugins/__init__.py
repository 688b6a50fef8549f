"""Multi-token prediction by self-distillation.

A pretrained causal LM learns to predict k future tokens in one forward pass from k-1 appended mask
tokens; ConfAdapt decoding emits several tokens per pass when the model is confident.
"""

from mtp_plugins.checkpoint import MTPSpec, add_mask_tokens, load_checkpoint, read_mtp_spec
from mtp_plugins.decoding import Decoder, GenerateOutput, GenerationStats, Proposals, generate

__version__ = "0.1.0.dev0"

__all__ = [
    "Decoder",
    "GenerateOutput",
    "GenerationStats",
    "MTPSpec",
    "Proposals",
    "__version__",
    "add_mask_tokens",
    "generate",
    "load_checkpoint",
    "read_mtp_spec",
]
