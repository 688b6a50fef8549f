"""Drafts from a row's own text: continue the latest earlier occurrence of its last tokens.

GSM8K-style answers copy numbers and phrases from the question, so where the model's own mask
proposals are unsure, "what followed these tokens last time" is often right; ``verify`` checks every
draft anyway, so a wrong guess costs only its share of the pass.
"""

from __future__ import annotations

from collections.abc import Iterable


class NgramIndex:
    """The decided tokens of one row (prompt, then output) and, for every n-gram up to ``max_n``,
    where the token after its latest occurrence sits."""

    def __init__(self, tokens: Iterable[int], max_n: int) -> None:
        self.max_n = max_n
        self.tokens: list[int] = []
        self.after: dict[tuple[int, ...], int] = {}
        self.extend(tokens)

    def extend(self, new: Iterable[int]) -> None:
        tokens, after = self.tokens, self.after
        for token in new:
            tokens.append(token)
            end = len(tokens) - 1  # every n-gram ending just before this token is now followed by it
            for n in range(1, min(self.max_n, end) + 1):
                after[tuple(tokens[end - n : end])] = end

    def continuation(self, tail: list[int], limit: int) -> list[int]:
        """Up to ``limit`` tokens that followed the longest n-gram ending the text + ``tail``."""
        if limit <= 0:
            return []
        suffix = (self.tokens[-self.max_n :] + tail)[-self.max_n :]
        for n in range(len(suffix), 0, -1):
            at = self.after.get(tuple(suffix[-n:]))
            if at is not None:
                return self.tokens[at : at + limit]
        return []
