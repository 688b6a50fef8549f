"""How many mask slots a pass feeds: the pass cost against the acceptance seen so far.

A mask slot pays only when its proposal is emitted (``confadapt``) or verified (``verify``). Whether
an extra slot is cheap depends on the hardware and the batch: at batch 1 a pass is bound by memory
traffic or per-call overhead and 7 extra query tokens cost almost nothing, while 16 rows x 8 tokens
make a CPU compute-bound, so the same slots cost more than they return when few are accepted. A
``WidthPolicy`` picks, before each pass, the slot count ``s`` with the most expected tokens per unit
of cost::

    rate(s) = (1 + a_1 + ... + a_s) / cost(batch, width(s))

where ``a_j`` is the share of recent passes whose proposal ``j`` was emitted or verified (counts
decay by ``DECAY`` per pass, start from ``PRIOR``, and never rise with ``j``), so slots that were
switched off get retried now and then.

Results must not depend on timing (the same checkpoint and settings give the same tokens on any
machine and under any load), and in bf16 a pass of another width rounds differently, which can flip
a near-tie and so change the text even of ``verify``. So the cost comes, by default, from the inputs
alone: ``ModelCost`` is a fixed roofline model of a pass (``mask_slots="auto"`` for decoders whose
output does not depend on the width, ``"adaptive"`` for any decoder). ``PassCost``, the time of a
pass measured on the model itself, is an explicit opt-in (``mask_slots="timed"``): faster where the
model is far from the fixed one, but the widths, and with them the output of a lossy strategy (and
of ``verify`` in low precision), can then differ between processes and machines.
"""

from __future__ import annotations

import statistics
import time
import weakref
from typing import Any

import torch

from mtp_plugins.decoding.kvcache import new_dynamic_cache

DECAY = 0.98
#: Before any outcome is seen (and again once old ones have decayed), a slot counts as taken half the
#: time: worth trying where slots are cheap, not where they are dear.
PRIOR = 0.5
_CONTEXT = 64  # cached tokens per row while timing
_REPEATS = 3

_tables: weakref.WeakKeyDictionary[Any, dict[tuple[str, int], dict[int, float]]] = weakref.WeakKeyDictionary()


def _bucket(batch: int) -> int:
    return 1 << max(0, batch - 1).bit_length()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


#: Query tokens per pass (batch x width) at which a pass costs about twice a one-token pass: until the
#: compute units are full a pass is bound by reading the weights and by per-call overhead. Fitted on
#: SmolLM2-135M in bf16 on 2 CPU cores (``benchmarks/results/batch_speed.md``: 8 tokens x 16 rows
#: cost 2.0x one token x 16 rows); a GPU fills far later.
KNEE = {"cpu": 96, "cuda": 1024}
DEFAULT_KNEE = 256


class ModelCost:
    """The cost of a pass from its shape alone: ``1 + batch * width / knee`` (no timing, so the
    widths chosen, and the tokens decoded, are the same on every machine and under any load)."""

    def __init__(self, device: torch.device) -> None:
        self.knee = KNEE.get(device.type, DEFAULT_KNEE)

    def __call__(self, batch: int, width: int) -> float:
        return 1.0 + batch * width / self.knee


def pass_width(slots: int, feeds_drafts: bool, recovery: int = 0) -> int:
    """Query tokens per row of a pass with ``slots`` mask slots: the decided token, as many drafts
    (strategies that verify drafts), the mask slots, and (``recovery`` groups, draft strategies) a
    group of ``slots`` more after each of the first ``recovery`` fed tokens (see the engine)."""
    if not feeds_drafts:
        return 1 + slots
    return 1 + 2 * slots + min(recovery, slots) * slots


class PassCost:
    """Seconds of one decoding pass by batch and query tokens per row, measured on ``model``
    (``mask_slots="timed"``: the widths then depend on the machine and its load).

    Tables are kept per model object (and device), so a process times each batch size once.
    """

    def __init__(self, model: Any, forward: Any, device: torch.device, max_width: int) -> None:
        self.model = model
        self.forward = forward  # (block, attention, positions, cache, keep) -> logits
        self.device = device
        # Timed at 1, 2, 4, ... up to the widest pass the policy may pick; other widths interpolated.
        self.widths = tuple(1 << i for i in range(max(0, max_width - 1).bit_length() + 1))
        self.tables = _tables.setdefault(model, {})

    def __call__(self, batch: int, width: int) -> float:
        table = self._table(_bucket(batch))
        widths = self.widths
        if len(widths) == 1 or width <= widths[0]:
            return table[widths[0]]
        for lo, hi in zip(widths, widths[1:]):
            if width <= hi:
                return table[lo] + (table[hi] - table[lo]) * (width - lo) / (hi - lo)
        lo, hi = widths[-2], widths[-1]  # beyond the table: extend its last slope
        return table[hi] + (table[hi] - table[lo]) * (width - hi) / (hi - lo)

    def _table(self, batch: int) -> dict[int, float]:
        key = (str(self.device), batch, self.widths[-1])
        if key not in self.tables:
            self.tables[key] = self._measure(batch)
        return self.tables[key]

    def _measure(self, batch: int) -> dict[int, float]:
        vocab = self.model.get_input_embeddings().weight.shape[0]
        dev = self.device
        cache = new_dynamic_cache(self.model, reserve=True)
        ids = torch.arange(batch * _CONTEXT, device=dev).remainder(vocab).view(batch, _CONTEXT)
        ones = torch.ones((batch, _CONTEXT), dtype=torch.bool, device=dev)
        positions = torch.arange(_CONTEXT, device=dev).expand(batch, -1)
        self.forward(ids, ones, positions, cache, 1)
        times: dict[int, list[float]] = {w: [] for w in self.widths}
        for repeat in range(_REPEATS + 1):  # widths interleaved; the first round warms up
            for w in self.widths:
                block = torch.arange(w, device=dev).remainder(vocab).expand(batch, -1)
                attention = torch.ones((batch, _CONTEXT + w), dtype=torch.bool, device=dev)
                positions = torch.arange(_CONTEXT, _CONTEXT + w, device=dev).expand(batch, -1)
                _sync(dev)
                start = time.perf_counter()
                logits = self.forward(block, attention, positions, cache, w)
                logits[:, :, :1].tolist()
                cache.crop(-w)
                _sync(dev)
                if repeat:
                    times[w].append(time.perf_counter() - start)
        table = {w: statistics.median(t) for w, t in times.items()}
        for lo, hi in zip(self.widths, self.widths[1:]):  # a wider pass never costs less
            table[hi] = max(table[hi], table[lo])
        return table


class WidthPolicy:
    """Chooses the mask slots of each pass from the acceptance seen so far and a cost model
    (``ModelCost``, or the measured ``PassCost``)."""

    def __init__(self, max_slots: int, feeds_drafts: bool, cost: PassCost, recovery: int = 0) -> None:
        self.max_slots = max_slots
        self.feeds_drafts = feeds_drafts
        self.cost = cost
        self.recovery = recovery
        self.fed = [0.0] * (max_slots + 1)  # index j: decayed count of rows that had proposal j at stake
        self.hit = [0.0] * (max_slots + 1)  # ... and of those whose proposal j was emitted / verified

    def width(self, slots: int) -> int:
        return pass_width(slots, self.feeds_drafts, self.recovery)

    def choose(self, batch: int) -> int:
        best, best_rate = 0, 1.0 / self.cost(batch, 1)
        expected, share = 1.0, 1.0
        for j in range(1, self.max_slots + 1):
            share = min(share, (self.hit[j] + PRIOR) / (self.fed[j] + 1.0))
            expected += share
            rate = expected / self.cost(batch, self.width(j))
            if rate > best_rate:
                best, best_rate = j, rate
        return best

    def observe(self, outcomes: list[tuple[int, int]]) -> None:
        """One pass: for each row, (proposals at stake, how many of them were taken)."""
        fed, hit = self.fed, self.hit
        for j in range(1, self.max_slots + 1):
            fed[j] *= DECAY
            hit[j] *= DECAY
        for at_stake, taken in outcomes:
            for j in range(1, at_stake + 1):
                fed[j] += 1.0
                if taken >= j:
                    hit[j] += 1.0
