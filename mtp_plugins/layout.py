"""The MTP training layout (METHOD.md section 3): one row of ``seq_len`` columns cut into regions.

For a step's horizon k, region r holds ``n_r`` real tokens of the document followed by k-1 mask
slots; the tokens the masks stand for are the first real tokens of region r+1, so the real tokens
of all regions form one contiguous piece of the document. ``offset`` shortens the first region, which
shifts the region grid over the document. Every row of a batch shares this geometry; documents
differ only in length (columns past a document's end are padding, attended by nobody). ``context``
real tokens may come first (few-shot examples, say): ordinary causal columns without mask slots,
attended by every later column and never supervised; the regions start after them.

- Position ids: a real token keeps its document position; mask slot j of a region gets the position
  of the token it stands for (the region's last real position + j).
- Attention: a real token attends causally to real tokens only, so it computes exactly the ordinary
  forward pass; mask slot j attends to every real token up to its region's last one and to the mask
  slots 1..j of its own region.
- Supervision: in each region, the last real token and its k-1 mask slots predict offsets 1..k. A
  region is supervised only if all k target tokens lie inside the document.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

IGNORE = -100


@dataclass(frozen=True)
class LayoutGeometry:
    """Where real tokens and mask slots sit in a row; independent of the documents."""

    seq_len: int  # columns of the regions (the context's come on top)
    regions: int
    k: int
    offset: int = 0
    context: int = 0  # real tokens before the first region: no mask slots, never supervised

    def __post_init__(self) -> None:
        for name in ("seq_len", "regions", "k"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(self.context, int) or self.context < 0:
            raise ValueError(f"context must be an int >= 0, got {self.context!r}")
        if self.real_per_region < 1:
            raise ValueError(
                f"seq_len={self.seq_len} is too short for regions={self.regions} and k={self.k}: each region is "
                f"{self.width} columns and needs k-1={self.k - 1} mask slots plus at least one real token "
                f"(seq_len >= regions * k = {self.regions * self.k})"
            )
        if not 0 <= self.offset < self.real_per_region:
            raise ValueError(f"offset must be in [0, {self.real_per_region - 1}], got {self.offset}")

    @property
    def width(self) -> int:
        """Columns per region."""
        return self.seq_len // self.regions

    @property
    def real_per_region(self) -> int:
        return self.width - (self.k - 1)

    @property
    def real_counts(self) -> list[int]:
        """Real tokens in each region (the first is shortened by the offset)."""
        return [self.real_per_region - (self.offset if r == 0 else 0) for r in range(self.regions)]

    @property
    def columns(self) -> int:
        """Columns of a row: the context's and the regions'."""
        return self.context + self.seq_len

    @property
    def real_tokens(self) -> int:
        """Document tokens a row shows (the context included)."""
        return self.context + sum(self.real_counts)

    @property
    def tokens_needed(self) -> int:
        """Document tokens needed to supervise every region (the last one's k targets included)."""
        return self.real_tokens + self.k


@dataclass
class Layout:
    """A batch laid out for one step. Columns index the row; shapes note B, S, R, k."""

    geometry: LayoutGeometry
    input_ids: torch.Tensor  # [B, S] real tokens, mask ids, pad
    position_ids: torch.Tensor  # [B, S]
    attention: torch.Tensor  # [B, 1, S, S] bool, True = may attend
    supervised_columns: torch.Tensor  # [R, k] column whose logits predict offset j+1 of region r
    mask_columns: torch.Tensor  # [R, k-1] the mask slot columns
    targets: torch.Tensor  # [B, R, k] the document's tokens at offsets 1..k (IGNORE where absent)
    supervised: torch.Tensor  # [B, R] bool: all k targets inside the document
    real: torch.Tensor  # [B, S] bool: columns holding a document token
    next_tokens: torch.Tensor  # [B, S] the document's next token for real columns (IGNORE elsewhere)
    real_columns: torch.Tensor  # [N] the columns of the N real tokens, in document order
    last_real: torch.Tensor  # [R] document index of each region's last real token

    def to(self, device: torch.device | str) -> Layout:
        fields = {name: getattr(self, name) for name in self.__dataclass_fields__}
        return Layout(**{n: v.to(device) if isinstance(v, torch.Tensor) else v for n, v in fields.items()})


def build_layout(
    documents: Sequence[Sequence[int]],
    geometry: LayoutGeometry,
    mask_ids: Sequence[int],
    pad_id: int,
) -> Layout:
    """Lay out ``documents`` (token ids, one per row) with ``geometry``; ``mask_ids`` has k-1 ids
    (slot j uses ``mask_ids[j-1]``)."""
    g = geometry
    if len(mask_ids) != g.k - 1:
        raise ValueError(f"need k-1={g.k - 1} mask ids for k={g.k}, got {len(mask_ids)}")
    S, R, k, C = g.columns, g.regions, g.k, g.context

    # Column metadata shared by every row.
    kind = torch.full((S,), 2, dtype=torch.long)  # 0 real, 1 mask, 2 unused
    region = torch.full((S,), -1, dtype=torch.long)
    slot = torch.zeros(S, dtype=torch.long)  # mask slot number j (1..k-1)
    doc_index = torch.full((S,), -1, dtype=torch.long)  # document index of real columns
    position = torch.zeros(S, dtype=torch.long)
    last_real = torch.zeros(R, dtype=torch.long)  # document index of each region's last real token
    supervised_columns = torch.zeros((R, k), dtype=torch.long)
    kind[:C], doc_index[:C], position[:C] = 0, torch.arange(C), torch.arange(C)  # the context
    column, start = C, C
    for r, n in enumerate(g.real_counts):
        cols = torch.arange(column, column + n)
        kind[cols], region[cols], doc_index[cols] = 0, r, torch.arange(start, start + n)
        position[cols] = doc_index[cols]
        last_real[r] = start + n - 1
        supervised_columns[r, 0] = column + n - 1
        masks = torch.arange(column + n, column + n + k - 1)
        kind[masks], region[masks], slot[masks] = 1, r, torch.arange(1, k)
        position[masks] = last_real[r] + slot[masks]
        supervised_columns[r, 1:] = masks
        column, start = column + n + k - 1, start + n
    mask_columns = supervised_columns[:, 1:]

    # Geometry of attention: query column (rows of the matrix) may attend key column.
    q, c = torch.arange(S)[:, None], torch.arange(S)[None, :]
    real_q, real_c = kind[q] == 0, kind[c] == 0
    mask_q, mask_c = kind[q] == 1, kind[c] == 1
    causal_real = real_q & real_c & (doc_index[c] <= doc_index[q])
    region_of_q = region[q].clamp(min=0)
    mask_to_real = mask_q & real_c & (doc_index[c] <= last_real[region_of_q])
    mask_to_mask = mask_q & mask_c & (region[c] == region[q]) & (slot[c] <= slot[q])
    geometry_mask = causal_real | mask_to_real | mask_to_mask  # [S, S]

    B = len(documents)
    lengths = torch.tensor([len(d) for d in documents])  # [B]
    padded = torch.full((B, g.tokens_needed + 1), pad_id, dtype=torch.long)
    for b, doc in enumerate(documents):
        n = min(len(doc), g.tokens_needed + 1)
        padded[b, :n] = torch.as_tensor(list(doc[:n]), dtype=torch.long)
    in_doc = (doc_index[None, :] >= 0) & (doc_index[None, :] < lengths[:, None])  # [B, S] real and present
    input_ids = torch.full((B, S), pad_id, dtype=torch.long)
    input_ids[in_doc] = padded[:, doc_index.clamp(min=0)][in_doc]
    input_ids[:, mask_columns.flatten()] = torch.as_tensor(list(mask_ids), dtype=torch.long).repeat(R)
    key_ok = in_doc | (kind == 1)[None, :]  # padding columns are attended by nobody
    attention = geometry_mask[None] & key_ok[:, None, :]
    attention |= torch.eye(S, dtype=torch.bool)[None]  # every query sees itself: no empty softmax row

    target_index = last_real[:, None] + torch.arange(1, k + 1)[None, :]  # [R, k] document indices
    targets = padded[:, target_index.clamp(max=g.tokens_needed)]
    present = target_index[None] < lengths[:, None, None]  # [B, R, k]
    targets = torch.where(present, targets, torch.full_like(targets, IGNORE))
    supervised = present.all(dim=2)

    next_index = (doc_index + 1).clamp(min=0, max=g.tokens_needed)
    next_tokens = torch.where(  # the context is never supervised
        in_doc & (doc_index[None, :] >= C) & (doc_index[None, :] + 1 < lengths[:, None]), padded[:, next_index],
        torch.full((B, S), IGNORE),
    )
    return Layout(
        geometry=g,
        input_ids=input_ids,
        position_ids=position.expand(B, S).clone(),
        attention=attention[:, None],
        supervised_columns=supervised_columns,
        mask_columns=mask_columns,
        targets=targets,
        supervised=supervised,
        real=in_doc,
        next_tokens=next_tokens,
        real_columns=(kind == 0).nonzero().flatten(),
        last_real=last_real,
    )
