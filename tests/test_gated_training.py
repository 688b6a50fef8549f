"""The three-pass step of ``--trainable gated-lora`` equals its definitions (float32)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import CORPUS, build_model

from mtp_plugins import add_mask_tokens
from mtp_plugins.adapters import AdapterSettings, attach_gated_lora, train_mask_rows
from mtp_plugins.layout import LayoutGeometry, build_layout
from mtp_plugins.modeling import attention_for, logits_at
from train_cli.gated import NEVER, gated_logits, teacher_full_row

TOLERANCE = 1e-4  # float32: the passes add the same terms in another order


def _setup(tokenizer, arch="llama", k=4, per_slot=False, context=0):
    original = build_model(arch, len(tokenizer), seed=2)
    model = copy.deepcopy(original)
    spec = add_mask_tokens(model, tokenizer, num_tokens=k - 1 if per_slot else 1)
    adapters = attach_gated_lora(model, spec.mask_token_ids, AdapterSettings(rank=4))
    with torch.no_grad():
        for p in adapters.parameters():
            p.normal_(0.0, 0.3)
    rows = train_mask_rows(model, spec.mask_token_ids)
    with torch.no_grad():
        rows.add_(torch.randn_like(rows))  # trained mask rows differ from the matrix's
    geometry = LayoutGeometry(seq_len=40, regions=4, k=k, offset=1, context=context)
    docs = [tokenizer(t).input_ids for t in CORPUS[:3]]
    docs[1] = docs[1][:17]  # a short document: padding and unsupervised regions
    shared = tokenizer(CORPUS[3]).input_ids[:context]  # one context before every row (the trainer's)
    docs = [shared + d for d in docs]
    layout = build_layout(docs, geometry, spec.mask_ids(k - 1), tokenizer.pad_token_id)
    return original, model, spec, layout


@pytest.mark.parametrize(("arch", "per_slot", "context"), [
    ("llama", False, 0), ("llama", True, 0), ("gpt2", False, 0), ("gpt2", True, 0),
    ("llama", False, 9), ("gpt2", True, 9),  # a shared context: its keys/values computed once for all rows
])
def test_the_slot_passes_equal_the_whole_row(tokenizer, arch, per_slot, context):
    original, model, spec, layout = _setup(tokenizer, arch, per_slot=per_slot, context=context)
    mask_ids = list(spec.mask_token_ids)
    student, teacher = gated_logits(model, layout, spec.mask_ids(3), list(spec.mask_token_ids), dtype=torch.float32, autocast=False, teacher=True)
    B, R, k, V = student.shape
    # The student by definition: the whole layout row through the gated model (gated where it holds masks).
    whole = logits_at(model, layout.supervised_columns.flatten(), input_ids=layout.input_ids,
                      attention_mask=attention_for(model, layout.attention, torch.float32),
                      position_ids=layout.position_ids).reshape(B, R, k, V)
    keep = [i for i in range(V) if i not in mask_ids]
    ok = layout.supervised
    assert torch.allclose(student[..., keep][ok], whole[..., keep][ok], atol=TOLERANCE)
    assert (student[..., mask_ids] == NEVER).all() and (teacher[..., mask_ids] == NEVER).all()
    # The teacher by definition, on the student's own drafts: the forced row through the base model ...
    drafts = student[:, :, : k - 1].argmax(dim=-1)
    assert not set(drafts.flatten().tolist()) & set(mask_ids)
    full = teacher_full_row(model, layout, drafts, torch.float32)
    assert torch.allclose(teacher[..., keep][ok], full[..., keep][ok], atol=TOLERANCE)
    # ... which is what a separately loaded original model computes on that input.
    forced = layout.input_ids.clone()
    forced[:, layout.mask_columns.flatten()] = drafts.reshape(B, -1)
    with torch.no_grad():
        reference = logits_at(original, layout.supervised_columns.flatten(), input_ids=forced,
                              attention_mask=attention_for(original, layout.attention, torch.float32),
                              position_ids=layout.position_ids).reshape(B, R, k, -1)
    assert torch.allclose(teacher[..., : reference.shape[-1]][ok], reference[ok], atol=TOLERANCE)


def test_a_context_that_rows_do_not_share_is_not_shared(tokenizer):
    # Rows whose leading tokens differ take the plain path (the context's keys/values per row).
    _, model, spec, layout = _setup(tokenizer, context=9)
    varied = layout.input_ids.clone()
    varied[1, 0] = (varied[1, 0] + 1) % 50
    from dataclasses import replace
    layout = replace(layout, input_ids=varied)
    student, _ = gated_logits(model, layout, spec.mask_ids(3), list(spec.mask_token_ids), dtype=torch.float32, autocast=False, teacher=False)
    whole = logits_at(model, layout.supervised_columns.flatten(), input_ids=layout.input_ids,
                      attention_mask=attention_for(model, layout.attention, torch.float32),
                      position_ids=layout.position_ids).reshape(student.shape)
    ok, keep = layout.supervised, [i for i in range(student.shape[-1]) if i not in spec.mask_token_ids]
    assert torch.allclose(student[..., keep][ok], whole[..., keep][ok], atol=TOLERANCE)


def test_gradients_reach_only_the_adapters_and_mask_rows(tokenizer):
    _, model, spec, layout = _setup(tokenizer)
    for name, p in model.named_parameters():
        p.requires_grad_("mtp_" in name)
    student, teacher = gated_logits(model, layout, spec.mask_ids(3), list(spec.mask_token_ids), dtype=torch.float32, autocast=False, teacher=True)
    loss = torch.nn.functional.cross_entropy(student[layout.supervised].flatten(0, 1),
                                             teacher[layout.supervised].flatten(0, 1).argmax(-1))
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert any(g.abs().sum() > 0 for n, g in grads.items() if "mtp_lora_B" in n)
    assert grads["model.embed_tokens.mtp_mask_embeddings"].abs().sum() > 0
