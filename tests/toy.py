"""A deterministic toy MTP model that checks the engine's bookkeeping.

Random tiny models almost never confirm a mask proposal, so they cannot show that accepted drafts,
holes and position ids are handled right. This toy LM follows the HF forward contract (2D attention
mask, explicit position ids, a ``DynamicCache``) and computes its predictions from what it can SEE:

- the next token after token ``t`` at position ``p`` is ``rule(t, p)``; so a wrong position id or a
  hole that leaks into attention changes the output;
- a mask slot at position ``p + j`` (j masks after the last visible real token ``t`` at ``p``)
  predicts the token at ``p + j + 1`` by iterating the rule, except where ``wrong(...)`` says this
  slot is wrong; wrong slots can also be made low-confidence.

The cache stores token ids and positions instead of keys and values.
"""

from __future__ import annotations

import torch
from transformers import GenerationConfig, LlamaConfig

from mtp_plugins.checkpoint import MTPSpec, write_mtp_spec


class ToyMTP(torch.nn.Module):
    def __init__(
        self,
        vocab: int = 97,
        *,
        wrong_every: int = 3,
        calibrated: bool = True,
        eos_token_id: int | None = None,
        num_masks: int = 1,
    ) -> None:
        super().__init__()
        self.real_vocab = vocab
        self.mask_ids = list(range(vocab, vocab + num_masks))
        self.wrong_every = wrong_every
        self.calibrated = calibrated
        self.config = LlamaConfig(vocab_size=vocab + num_masks, num_hidden_layers=1, hidden_size=8, num_attention_heads=1)
        write_mtp_spec(self, MTPSpec(mask_token_ids=tuple(self.mask_ids)))
        self.generation_config = GenerationConfig(eos_token_id=eos_token_id, pad_token_id=0)
        self.embed = torch.nn.Embedding(vocab + num_masks, 1)
        self.calls: list[torch.Tensor] = []  # every input block, for tests that look at what was fed

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.embed

    def rule(self, token: int, position: int) -> int:
        return (token * 7 + position * 3 + 1) % self.real_vocab

    def wrong(self, token: int, position: int, offset: int) -> bool:
        return self.wrong_every > 0 and (token + position + offset) % self.wrong_every == 0

    def greedy_continuation(self, prompt: list[int], n: int) -> list[int]:
        out, token, position = [], prompt[-1], len(prompt) - 1
        for _ in range(n):
            token = self.rule(token, position)
            position += 1
            out.append(token)
        return out

    def forward(self, input_ids, attention_mask, position_ids, cache, use_cache=True, logits_to_keep=0):
        self.calls.append(input_ids.clone())
        batch, width = input_ids.shape
        keys = input_ids.float()[:, None, :, None]
        values = position_ids.float()[:, None, :, None]
        past = int(cache.get_seq_length())  # a static cache returns all its columns, used or not
        all_tokens, all_positions = cache.update(keys, values, 0)
        tokens = all_tokens[:, 0, : past + width, 0].long().tolist()
        positions = all_positions[:, 0, : past + width, 0].long().tolist()
        mask = attention_mask.bool()
        if mask.dim() == 4:  # a custom mask [B, 1, W, L + W]: what each query sees
            sees = mask[:, 0].tolist()
            visible = lambda b, q, i: sees[b][q][i]  # noqa: E731
        else:  # 2D: the causal order over the valid columns
            valid = mask.tolist()
            visible = lambda b, q, i: valid[b][i] and i <= past + q  # noqa: E731
        logits = torch.full((batch, width, self.config.vocab_size), -20.0)
        for b in range(batch):
            for q in range(width):
                col = past + q
                if not visible(b, q, col):
                    continue
                last = max(i for i in range(col + 1) if visible(b, q, i) and tokens[b][i] not in self.mask_ids)
                token, position = tokens[b][last], positions[b][last]
                offset = positions[b][col] - position
                if offset < 0 or (offset > 0 and tokens[b][col] not in self.mask_ids):
                    raise AssertionError(f"row {b}: inconsistent positions at column {col}")
                for s in range(offset + 1):
                    token = self.rule(token, position + s)
                if offset > 0 and self.wrong(token, position, offset):
                    token = (token + 1) % self.real_vocab
                    if self.calibrated:  # a flat row: the wrong token wins with low confidence
                        logits[b, q] = 0.0
                        logits[b, q, token] = 1.0
                        continue
                logits[b, q, token] = 8.0
        keep = logits_to_keep if logits_to_keep else width
        return _Out(logits[:, -keep:])


class _Out:
    def __init__(self, logits: torch.Tensor) -> None:
        self.logits = logits
