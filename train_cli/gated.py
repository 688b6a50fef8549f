"""Training gated adapters (``--trainable gated-lora``): three passes over one KV cache.

With gated adapters every real token computes exactly the base model (the adapters act only at mask
tokens, and real tokens never attend to mask slots), and the teacher is the same weights with the
gate off. So a step needs the real tokens only once, without gradient:

1. the *real pass* (no grad, gate off): the row's real tokens as one ordinary causal sequence. It
   keeps their keys/values and the logits at each region's last real token: offset 1, which is the
   student's and the teacher's alike (both are the base model there, so it carries no gradient);
2. the *student pass* (grad, gate on): only the k-1 mask slots of every region, attending to the
   cached real keys/values up to their region's last real token and to the slots before them in
   their region (the layout's mask-slot rows): offsets 2..k;
3. the *teacher pass* (no grad, gate off): the student's greedy drafts in place of the mask tokens
   (student forcing), over the same cache: the teacher's logits at offsets 2..k.

The backward pass runs through the R*(k-1) slot tokens of the student pass alone, not the whole row,
and no second model is loaded. ``teacher_full_row`` is the plain definition (the forced row through
the base model), which the tests compare against.
"""

from __future__ import annotations

from typing import Any

import torch

from mtp_plugins.adapters import gate_all, gate_off
from mtp_plugins.decoding.kvcache import new_dynamic_cache
from mtp_plugins.layout import Layout
from mtp_plugins.modeling import attention_for, forward_kwargs, logits_at

NEVER = -1e4  # the logit of a mask token: never a prediction (finite, so that KL terms stay 0, not NaN)


def slot_attention(layout: Layout) -> tuple[torch.Tensor, torch.Tensor]:
    """Position ids ``[B, Q]`` and the boolean attention ``[B, 1, Q, N + Q]`` of the Q = R*(k-1)
    mask slots over the N cached real tokens and the slots themselves (True = may attend)."""
    g, dev = layout.geometry, layout.input_ids.device
    R, slots = g.regions, g.k - 1
    B, N = layout.input_ids.shape[0], layout.real_columns.numel()
    region = torch.arange(R * slots, device=dev) // slots  # [Q]
    slot = torch.arange(R * slots, device=dev) % slots + 1  # [Q] 1..k-1
    last = layout.last_real.to(dev)[region]  # [Q] document index of the region's last real token
    present = layout.real[:, layout.real_columns]  # [B, N] real tokens inside the document
    to_real = (torch.arange(N, device=dev)[None, :] <= last[:, None])[None] & present[:, None, :]  # [B, Q, N]
    to_slots = (region[None, :] == region[:, None]) & (slot[None, :] <= slot[:, None])  # [Q, Q]
    attention = torch.cat([to_real, to_slots[None].expand(B, -1, -1)], dim=2)[:, None]
    return (last + slot).expand(B, -1), attention


def _shared_context(real: torch.Tensor, present: torch.Tensor, context: int) -> bool:
    """Whether every row holds the same ``context`` leading real tokens (all of them present)."""
    head = real[:, :context]
    return bool(context) and bool(present[:, :context].all()) and bool((head == head[:1]).all())


def _pass(model: Any, ids: torch.Tensor, attention: torch.Tensor, positions: torch.Tensor, cache: Any,
          dtype: torch.dtype) -> torch.Tensor:
    """Logits at every column of a slot pass over ``cache`` (whose real part is kept afterwards)."""
    cache_kwarg, _ = forward_kwargs(model)
    logits = model(input_ids=ids, attention_mask=attention_for(model, attention, dtype), position_ids=positions,
                   use_cache=True, **{cache_kwarg: cache}).logits
    cache.crop(-ids.shape[1])
    return logits


def gated_logits(
    model: Any, layout: Layout, slot_ids: list[int], never_ids: list[int], *, dtype: torch.dtype, autocast: bool,
    teacher: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Student logits ``[B, R, k, V]`` (with grad where grad is enabled) and the teacher's on the
    student-forced drafts (or None), both with the logits of ``never_ids`` (the mask tokens) at
    ``NEVER``. ``slot_ids``: the k-1 mask ids of the slots."""
    g, dev = layout.geometry, layout.input_ids.device
    B, R, k = layout.input_ids.shape[0], g.regions, g.k
    never = torch.tensor(sorted(set(never_ids)), device=dev)
    cache = new_dynamic_cache(model)
    cache_kwarg, _ = forward_kwargs(model)
    positions, attention = slot_attention(layout)
    with torch.autocast(dev.type, dtype=dtype, enabled=autocast):
        with torch.no_grad(), gate_off(model):
            real = layout.input_ids[:, layout.real_columns]  # [B, N]
            present = layout.real[:, layout.real_columns]
            C = g.context if B > 1 and _shared_context(real, present, g.context) else 0
            if C:  # one context for every row (the trainer's): its keys/values once, repeated for the rows
                logits_at(model, torch.tensor([C - 1], device=dev), input_ids=real[:1, :C],
                          position_ids=torch.arange(C, device=dev)[None], use_cache=True, **{cache_kwarg: cache})
                cache.batch_repeat_interleave(B)
            first = logits_at(
                model, layout.last_real.to(dev) - C, input_ids=real[:, C:], attention_mask=present.long(),
                position_ids=torch.arange(C, real.shape[1], device=dev).expand(B, -1), use_cache=True,
                **{cache_kwarg: cache},
            ).float()  # [B, R, V] offset 1
        slots = torch.tensor(slot_ids, device=dev).repeat(R).expand(B, -1)  # [B, Q]
        with gate_all(model):
            rest = _pass(model, slots, attention, positions, cache, dtype).float()  # [B, Q, V] offsets 2..k
        student = torch.cat([first[:, :, None], rest.view(B, R, k - 1, -1)], dim=2).index_fill(-1, never, NEVER)
        if not teacher:
            return student, None
        drafts = student[:, :, : k - 1].detach().argmax(dim=-1).reshape(B, -1)  # [B, Q] offsets 1..k-1
        with torch.no_grad(), gate_off(model):
            forced = _pass(model, drafts, attention, positions, cache, dtype).float()
        target = torch.cat([first[:, :, None], forced.view(B, R, k - 1, -1)], dim=2).index_fill_(-1, never, NEVER)
    return student, target


@torch.no_grad()
def teacher_full_row(model: Any, layout: Layout, drafts: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The teacher by definition: the whole student-forced row (``drafts`` ``[B, R, k-1]`` in the
    mask slots) through the base model, logits at the supervised columns ``[B, R, k, V]``."""
    B, R, k = layout.input_ids.shape[0], layout.geometry.regions, layout.geometry.k
    forced = layout.input_ids.clone()
    forced[:, layout.mask_columns.flatten()] = drafts.reshape(B, -1)
    with gate_off(model):
        logits = logits_at(model, layout.supervised_columns.flatten(), input_ids=forced,
                           attention_mask=attention_for(model, layout.attention, dtype), position_ids=layout.position_ids)
    return logits.float().reshape(B, R, k, -1)
