"""The training layout: real tokens compute the ordinary forward pass; each mask slot sees exactly
what METHOD.md section 3 says; regions x k supervised positions with the document's targets."""

from __future__ import annotations

import pytest
import torch
from conftest import build_model

from mtp_plugins.layout import IGNORE, LayoutGeometry, build_layout
from mtp_plugins.modeling import attention_for

MASK, PAD = 90, 91


def documents(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, 80, (n,), generator=g).tolist() for n in lengths]


def forward(model, ids, attention=None, positions=None):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=attention, position_ids=positions).logits


@pytest.mark.parametrize(("k", "offset", "context"), [(2, 0, 0), (4, 3, 0), (6, 1, 0), (4, 2, 9)])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_real_tokens_compute_the_ordinary_forward_pass(k, offset, context, attn):
    model = build_model("llama", 92, attn_implementation=attn)
    g = LayoutGeometry(seq_len=48, regions=4, k=k, offset=offset, context=context)
    docs = documents([g.tokens_needed + 3, g.real_tokens - 5])
    layout = build_layout(docs, g, [MASK] * (k - 1), PAD)
    mask = attention_for(model, layout.attention, torch.float32)
    logits = forward(model, layout.input_ids, mask, layout.position_ids)
    for b, doc in enumerate(docs):
        n = min(len(doc), g.real_tokens)
        plain = forward(model, torch.tensor([doc[:n]]))[0]
        cols = layout.real[b].nonzero().flatten()
        assert len(cols) == n
        torch.testing.assert_close(logits[b, cols], plain, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("context", [0, 7])
def test_mask_slots_see_their_prefix_and_earlier_slots_only(context):
    # Logits at mask slot j of region r == a plain forward over the document up to the region's
    # last real token (the context included), followed by j mask tokens at the positions they stand for.
    model = build_model("qwen2", 92)
    g = LayoutGeometry(seq_len=40, regions=4, k=4, offset=2, context=context)
    (doc,) = documents([g.tokens_needed])
    layout = build_layout([doc], g, [MASK, MASK, MASK], PAD)
    logits = forward(model, layout.input_ids, layout.attention, layout.position_ids)[0]
    for r in range(g.regions):
        last = int(layout.position_ids[0, layout.supervised_columns[r, 0]])
        for j in range(1, g.k):
            ids = torch.tensor([doc[: last + 1] + [MASK] * j])
            positions = torch.arange(last + 1 + j)[None]
            expected = forward(model, ids, positions=positions)[0, -1]
            torch.testing.assert_close(logits[layout.mask_columns[r, j - 1]], expected, rtol=1e-4, atol=1e-4)


def test_geometry_positions_targets_and_supervision():
    g = LayoutGeometry(seq_len=32, regions=4, k=3, offset=1)
    assert (g.width, g.real_per_region, g.real_counts) == (8, 6, [5, 6, 6, 6])
    long_doc, short_doc = list(range(100, 100 + g.tokens_needed)), list(range(200, 214))
    layout = build_layout([long_doc, short_doc], g, [7, 8], PAD)
    # Region 0: 5 real tokens then two mask slots (positions 5 and 6 stand for document tokens 5, 6).
    assert layout.input_ids[0, :7].tolist() == [100, 101, 102, 103, 104, 7, 8]
    assert layout.position_ids[0, :7].tolist() == [0, 1, 2, 3, 4, 5, 6]
    # Region 1 starts with the tokens region 0's masks stood for.
    assert layout.input_ids[0, 7:9].tolist() == [105, 106]
    assert layout.supervised_columns.shape == (4, 3)
    assert layout.supervised_columns[0].tolist() == [4, 5, 6]
    assert layout.targets[0].tolist() == [[105, 106, 107], [111, 112, 113], [117, 118, 119], [123, 124, 125]]
    assert layout.supervised[0].all()
    # The short document (14 tokens) supervises regions whose k targets lie inside it.
    assert layout.supervised[1].tolist() == [True, True, False, False]
    assert layout.targets[1, 1].tolist() == [211, 212, 213] and layout.targets[1, 2, 0].item() == IGNORE
    assert not layout.real[1, layout.input_ids[1] == PAD].any()
    assert layout.next_tokens[0, 0].item() == 101 and layout.next_tokens[1, 17].item() == IGNORE


@pytest.mark.parametrize("context", [0, 4])
def test_attention_matrix_matches_the_rules(context):
    g = LayoutGeometry(seq_len=15, regions=3, k=3, offset=0, context=context)
    (doc,) = documents([g.tokens_needed])
    layout = build_layout([doc], g, [MASK, MASK], PAD)
    a = layout.attention[0, 0]
    masks = layout.mask_columns
    region_of = {int(c): r for r in range(3) for c in masks[r]}
    for q in range(g.columns):
        for c in range(g.columns):
            if layout.real[0, q]:
                want = bool(layout.real[0, c]) and c <= q
            else:
                r = region_of[q]
                last = int(layout.supervised_columns[r, 0])
                want = (bool(layout.real[0, c]) and c <= last) or (c in region_of and region_of[c] == r and c <= q)
            assert bool(a[q, c]) == want, (q, c)


def test_a_context_comes_first_as_real_columns_without_slots_or_supervision():
    g = LayoutGeometry(seq_len=24, regions=3, k=3, offset=1, context=5)
    assert (g.columns, g.real_tokens, g.tokens_needed) == (29, 5 + 5 + 6 + 6, 5 + 17 + 3)
    doc = list(range(100, 100 + g.tokens_needed))
    layout = build_layout([doc], g, [7, 8], PAD)
    # The five context tokens, then region 0 (shortened by the offset) with its two mask slots.
    assert layout.input_ids[0, :12].tolist() == [100, 101, 102, 103, 104, 105, 106, 107, 108, 109, 7, 8]
    assert layout.position_ids[0, :12].tolist() == list(range(10)) + [10, 11]
    assert layout.real[0, :5].all() and layout.real_columns[:5].tolist() == [0, 1, 2, 3, 4]
    # Every prediction and every target lies after the context; the context has no next-token target.
    assert (layout.supervised_columns >= 5).all() and (layout.last_real >= 5).all()
    assert layout.targets[0, 0].tolist() == [110, 111, 112]
    assert (layout.next_tokens[0, :5] == IGNORE).all() and layout.next_tokens[0, 5].item() == 106
    # Every later column, mask slots included, attends to the whole context (the offset left one unused).
    used = layout.real[0] | (layout.input_ids[0] != PAD)
    assert int(used.sum()) == 28 and layout.attention[0, 0, 5:][used[5:]][:, :5].all()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"seq_len": 20, "regions": 5, "k": 5}, r"seq_len=20 is too short for regions=5 and k=5.*seq_len >= regions \* k = 25"),
        ({"seq_len": 160, "regions": 5, "k": 4, "context": -1}, r"context must be an int >= 0, got -1"),
        ({"seq_len": 160, "regions": 5, "k": 4, "offset": 29}, r"offset must be in \[0, 28\]"),
        ({"seq_len": 160, "regions": 0, "k": 4}, "regions must be a positive int"),
    ],
)
def test_impossible_geometries_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LayoutGeometry(**kwargs)
