"""The settings of a gated adapter (rank, alpha, target projections), apart from the adapter itself
so that reading and checking them (``mtp-train``'s config) imports no torch."""

from __future__ import annotations

import math
from dataclasses import dataclass

#: The attention and MLP projections of Llama-, Qwen-, Mistral- and Gemma-style models, and GPT-2's.
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj", "c_attn", "c_proj")
MLP = ("gate_proj", "up_proj", "down_proj", "c_fc")
#: The projections that write into the residual stream (attention output, MLP output; GPT-2's
#: ``c_proj`` is both): the default. On SmolLM2 they learn about as much per step as every projection
#: at a higher lr, and keep a decoding pass within 1.1x of the plain model's on a CPU, where every
#: projection costs about 1.3x (benchmarks/results/adapter_targets.md, adapter_pass_cost.md).
RESIDUAL = ("o_proj", "down_proj", "c_proj")
TARGET_SETS = {"attention": ATTENTION, "mlp": MLP, "all": ATTENTION + MLP, "residual": RESIDUAL}


class AdapterError(ValueError):
    """An adapter checkpoint that cannot be used as asked; the message names it and says why."""


@dataclass(frozen=True)
class AdapterSettings:
    """Shape of the gated adapter: rank, scale ``alpha / rank`` and the projections it targets."""

    rank: int = 16
    alpha: float = 32.0
    targets: tuple[str, ...] = RESIDUAL

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
    """``residual``, ``all``, ``attention``, ``mlp`` or comma-separated module names (``q_proj,v_proj``)."""
    names: list[str] = []
    for part in (p.strip() for p in str(text).split(",")):
        if part:
            names.extend(TARGET_SETS.get(part, (part,)))
    if not names:
        raise AdapterError(f"adapter targets {text!r}: name at least one projection, or residual, all, attention, mlp")
    return tuple(dict.fromkeys(names))
