"""The settings of a gated adapter (rank, alpha, target projections), apart from the adapter itself
so that reading and checking them (``mtp-train``'s config) imports no torch."""

from __future__ import annotations

import math
from dataclasses import dataclass

#: The attention and MLP projections of Llama-, Qwen-, Mistral- and Gemma-style models, and GPT-2's.
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj", "c_attn", "c_proj")
MLP = ("gate_proj", "up_proj", "down_proj", "c_fc")
TARGET_SETS = {"attention": ATTENTION, "mlp": MLP, "all": ATTENTION + MLP}


class AdapterError(ValueError):
    """An adapter checkpoint that cannot be used as asked; the message names it and says why."""


@dataclass(frozen=True)
class AdapterSettings:
    """Shape of the gated adapter: rank, scale ``alpha / rank`` and the projections it targets."""

    rank: int = 16
    alpha: float = 32.0
    targets: tuple[str, ...] = TARGET_SETS["all"]

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise AdapterError(f"adapter rank must be an int >= 1, got {self.rank!r}")
        if not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool) or not math.isfinite(self.alpha) or self.alpha <= 0:
            raise AdapterError(f"adapter alpha must be a finite number > 0, got {self.alpha!r}")
        if not self.targets:
            raise AdapterError("adapter targets must name at least one projection")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def parse_targets(text: str) -> tuple[str, ...]:
    """``all``, ``attention``, ``mlp`` or comma-separated module names (``q_proj,v_proj``)."""
    names: list[str] = []
    for part in (p.strip() for p in str(text).split(",")):
        if part:
            names.extend(TARGET_SETS.get(part, (part,)))
    if not names:
        raise AdapterError(f"adapter targets {text!r}: name at least one projection, or all, attention, mlp")
    return tuple(dict.fromkeys(names))
