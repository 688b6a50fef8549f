"""A faster SDPA path for MTP passes on grouped-query-attention models.

For one query token, HF's ``sdpa`` integration folds the query heads that share a key/value head
into one attention call; for several query tokens with a mask it instead repeats the keys and values
for every query head, which copies the whole KV cache in every layer on every pass. MTP passes always
carry several query tokens (the accepted tokens and the mask slots), so this function folds the heads
for any query length (the small mask is repeated instead of the cache) and leaves everything else to
HF's ``sdpa``. ``generate`` switches a model from ``sdpa`` to it for the duration of the call.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "mtp_grouped_sdpa"


def grouped_sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,  # [B, H, q, D]
    key: torch.Tensor,  # [B, H_kv, L, D]
    value: torch.Tensor,  # [B, H_kv, L, D_v]
    attention_mask: torch.Tensor | None,  # [B, 1, q, L] bool
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    groups = getattr(module, "num_key_value_groups", 1)
    batch, heads, length, dim = query.shape
    plain = (
        groups == 1
        or length == 1
        or dropout
        or attention_mask is None
        or attention_mask.dtype != torch.bool
        or attention_mask.dim() != 4
        or attention_mask.shape[1] != 1
        or any(kwargs.get(k) is not None for k in ("position_bias", "softcap", "s_aux"))
        or kwargs.get("output_attentions")
    )
    if plain:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    folded = query.reshape(batch, heads // groups, groups * length, dim)  # rows: (group member, token)
    mask = _repeated(attention_mask, batch, length, key.shape[2], groups, query.dtype)
    out = torch.nn.functional.scaled_dot_product_attention(folded, key, value, attn_mask=mask, scale=scaling)
    out = out.reshape(batch, heads, length, value.shape[-1])
    return out.transpose(1, 2).contiguous(), None


#: The mask repeated for the folded heads, for the mask object it was made from: every layer of a
#: pass gets the same mask, so it is repeated once per pass, not once per layer. Cleared on leaving
#: ``grouped_attention``.
_REPEATED: dict[tuple[int, int, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}


def _repeat(mask: torch.Tensor, batch: int, length: int, keys: int, groups: int, dtype: torch.dtype) -> torch.Tensor:
    """``mask`` [B, 1, q, L] (True = attend) for the folded query rows: [B, 1, groups * q, L], as the
    additive mask (0 or -inf, in the query's dtype) that SDPA would otherwise convert a boolean one
    to in every layer (the same values, so the same attention)."""
    repeated = mask.expand(batch, 1, length, keys).repeat(1, 1, groups, 1)
    return torch.zeros(repeated.shape, dtype=dtype, device=mask.device).masked_fill_(~repeated, float("-inf"))


def _repeated(mask: torch.Tensor, batch: int, length: int, keys: int, groups: int, dtype: torch.dtype) -> torch.Tensor:
    if torch.compiler.is_compiling():
        return _repeat(mask, batch, length, keys, groups, dtype)
    held = _REPEATED.get((id(mask), groups, dtype))
    if held is not None and held[0] is mask and held[1].shape[-1] == keys:
        return held[1]
    repeated = _repeat(mask, batch, length, keys, groups, dtype)
    if len(_REPEATED) > 4:  # masks of finished passes (a model's layers take at most two kinds)
        _REPEATED.clear()
    _REPEATED[(id(mask), groups, dtype)] = (mask, repeated)
    return repeated


AttentionInterface.register(NAME, grouped_sdpa)
AttentionMaskInterface.register(NAME, sdpa_mask)


@contextmanager
def grouped_attention(model: Any) -> Iterator[None]:
    """Within the block, a model on ``sdpa`` uses ``grouped_sdpa``; any other model is left alone."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa" or not hasattr(model, "set_attn_implementation"):
        yield
        return
    model.set_attn_implementation(NAME)
    try:
        yield
    finally:
        _REPEATED.clear()
        model.set_attn_implementation("sdpa")
