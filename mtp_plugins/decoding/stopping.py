"""Per-row stop conditions and next-token sampling for the decode engine."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


class StopStrings:
    """Finds where a stop string completes in a row's newly emitted tokens.

    Only a tail window of the row is decoded each pass: the new tokens plus enough earlier tokens to
    hold the longest stop string (every token decodes to at least one character).
    """

    def __init__(self, tokenizer: Any, stop_strings: Sequence[str]) -> None:
        if tokenizer is None:
            raise ValueError("stop_strings need a tokenizer to decode the generated text; pass tokenizer=")
        strings = [s for s in stop_strings if s]
        if not strings:
            raise ValueError(f"stop_strings must hold at least one non-empty string, got {list(stop_strings)!r}")
        self.tokenizer = tokenizer
        self.strings = strings
        self.window = max(len(s) for s in strings) + 2

    def _decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=False)

    def tokens_to_keep(self, generated: Sequence[int], n_new: int) -> int | None:
        """If a stop string completes within the last ``n_new`` of ``generated``, how many of those new
        tokens to keep (the one completing it included); else None."""
        start = max(0, len(generated) - n_new - self.window)
        old_end = len(generated) - n_new
        old_chars = len(self._decode(generated[start:old_end]))
        if not self._has_new_stop(self._decode(generated[start:]), old_chars):
            return None
        for keep in range(1, n_new + 1):
            if self._has_new_stop(self._decode(generated[start : old_end + keep]), old_chars):
                return keep
        return n_new

    def _has_new_stop(self, text: str, old_chars: int) -> bool:
        # A stop string counts only if it ends inside the new text: one that ended earlier would
        # already have stopped the row.
        for s in self.strings:
            at = text.find(s, max(0, old_chars - len(s) + 1))
            if at >= 0:
                return True
        return False


def sample_tokens(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None
) -> torch.Tensor:
    """[B, V] logits -> [B] sampled ids (temperature, then nucleus filtering)."""
    scores = logits.float() / temperature
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
        cumulative = torch.softmax(sorted_scores, dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens ranked above it already hold top_p; the top token always stays.
        drop_sorted = (cumulative - torch.softmax(sorted_scores, dim=-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)
