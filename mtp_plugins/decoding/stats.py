"""Decode statistics returned with the tokens: per row and pooled."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class RowStats:
    """One row: the passes it took part in and what each emitted (after stop truncation)."""

    tokens_per_pass: list[int] = field(default_factory=list)
    stop_reason: str | None = None  # "eos", "stop_string", "length"

    @property
    def forward_passes(self) -> int:
        return len(self.tokens_per_pass)

    @property
    def tokens(self) -> int:
        return sum(self.tokens_per_pass)

    @property
    def eff_k(self) -> float:
        """Tokens emitted per forward pass (the paper's "acceleration"); 0 for a row with no pass."""
        return self.tokens / self.forward_passes if self.forward_passes else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "forward_passes": self.forward_passes,
            "tokens": self.tokens,
            "eff_k": self.eff_k,
            "tokens_per_pass": list(self.tokens_per_pass),
            "stop_reason": self.stop_reason,
        }


@dataclass
class GenerationStats:
    """Statistics of one ``generate`` call."""

    strategy: str
    k: int
    tau: float
    rows: list[RowStats]
    model_calls: int = 0  # batched forward calls (a call serves every active row)
    wall_seconds: float = 0.0
    mask_slots_per_call: list[int] = field(default_factory=list)  # mask slots each call fed

    @property
    def forward_passes(self) -> int:
        """Row-passes: each row counts every call it took part in."""
        return sum(r.forward_passes for r in self.rows)

    @property
    def tokens(self) -> int:
        return sum(r.tokens for r in self.rows)

    @property
    def eff_k(self) -> float:
        """Pooled Eff. k: all tokens emitted / all row-passes."""
        return self.tokens / self.forward_passes if self.forward_passes else 0.0

    @property
    def mean_eff_k(self) -> float:
        """Per-sample Eff. k averaged over the rows that generated anything."""
        rows = [r.eff_k for r in self.rows if r.forward_passes]
        return sum(rows) / len(rows) if rows else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.wall_seconds if self.wall_seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy,
            "k": self.k,
            "tau": self.tau,
            "forward_passes": self.forward_passes,
            "model_calls": self.model_calls,
            "tokens": self.tokens,
            "eff_k": self.eff_k,
            "mean_eff_k": self.mean_eff_k,
            "wall_seconds": self.wall_seconds,
            "tokens_per_second": self.tokens_per_second,
            "mean_mask_slots": sum(self.mask_slots_per_call) / len(self.mask_slots_per_call) if self.mask_slots_per_call else 0.0,
            "rows": [r.to_dict() for r in self.rows],
        }


@dataclass
class GenerateOutput:
    """What ``mtp_plugins.generate`` returns."""

    sequences: torch.Tensor  # [B, T + n] prompt included; finished rows padded with the pad id
    stats: GenerationStats
