"""Small adapters over HF causal LMs shared by the engine and the trainer."""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch


@functools.lru_cache(maxsize=None)
def _forward_parameters(cls: type) -> frozenset[str]:
    return frozenset(inspect.signature(cls.forward).parameters)


def forward_kwargs(model: Any) -> tuple[str, str | None]:
    """Keyword names this model's forward uses for the KV cache and for computing only some logits."""
    params = _forward_parameters(type(model))
    cache = "cache" if "cache" in params else "past_key_values"
    keep = next((n for n in ("logits_to_keep", "num_logits_to_keep") if n in params), None)
    return cache, keep


def logits_at(model: Any, columns: torch.Tensor, **inputs: Any) -> torch.Tensor:
    """[B, len(columns), V]: the logits at ``columns`` of every row, projecting only those positions
    where the model supports it (``logits_to_keep`` with an index tensor)."""
    _, keep = forward_kwargs(model)
    if keep == "logits_to_keep":
        return model(**inputs, logits_to_keep=columns).logits
    return model(**inputs).logits[:, columns]


def attention_for(model: Any, attention: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A 4D boolean mask in the form the model's attention implementation reads it."""
    implementation = getattr(model.config, "_attn_implementation", "eager")
    if implementation == "eager":
        return torch.zeros(attention.shape, dtype=dtype, device=attention.device).masked_fill(
            ~attention, torch.finfo(dtype).min
        )
    if implementation is None or implementation in ("sdpa", "flex_attention") or implementation.startswith("mtp_"):
        return attention
    raise ValueError(
        f"training and verify's recovery slots need a model on 'sdpa' or 'eager' attention (a custom 4D mask), "
        f"got {implementation!r}; load it with attn_implementation='sdpa' (or decode verify with recovery=0)"
    )
