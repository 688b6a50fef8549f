"""Where the decode engine keeps keys and values between passes.

Both kinds hold, besides the model's cache, ``valid``: which cache columns of each row hold real
tokens (holes: the left padding of short rows, rejected drafts). The engine feeds a block of new
columns per pass, drops the block's trailing mask slots afterwards, and marks rejected drafts.

- ``DynamicKV`` (the default): HF's ``DynamicCache``. It grows by each pass's block, finished rows
  leave the batch, and the holes are dropped once they are most of it.
- ``StaticKV`` (``cache="static"``): HF's ``StaticCache``, preallocated for the whole call, so every
  tensor keeps its address and (with ``compile``) every pass after the first has one of a few fixed
  shapes, as ``torch.compile`` with CUDA graphs needs: the batch is padded to a power of two and
  finished rows stay as idle rows until the active ones fit a cache half the size (they move there),
  the block is padded on the left with holes to a power-of-two width, the cache length is rounded
  up to a multiple of ``CAPACITY_STEP``, and the logits kept per row are the most any pass needs. Holes are dropped only when the next block would not fit.
  The first pass (the prompt) always runs eagerly.

Moving cached entries is safe because keys already carry their rotary positions; each row keeps its
real entries in order, right-aligned.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

#: A dynamic cache is compacted when its longest row holds at most this share of real entries ...
COMPACT_BELOW = 0.5
#: ... and it has at least this many columns.
COMPACT_MIN = 64
#: A static cache's length is rounded up to a multiple of this, so calls with similar prompt lengths
#: share compiled graphs (and the preallocated cache).
CAPACITY_STEP = 512

#: (block, attention, positions, cache, keep[, fn]) -> logits [B, keep, V]; ``fn``: the model's call to
#: use instead of the model (its compiled form)
Call = Callable[..., torch.Tensor]


#: A reserved layer's buffers hold this many columns beyond what they need when they grow ...
RESERVE_MIN = 128
#: ... or this share of what they need, if more.
RESERVE_SHARE = 0.25


def _reserved_layer_class() -> type:
    from transformers.cache_utils import DynamicLayer

    class ReservedLayer(DynamicLayer):
        """HF's ``DynamicLayer`` whose keys and values are views of buffers with spare columns.

        ``DynamicLayer.update`` concatenates, so every pass copies the layer's whole cache to add a
        few columns; here a pass writes its columns into the spare ones, and the buffers are copied
        only when they run out (every ``RESERVE_MIN`` columns or more). ``keys`` and ``values`` hold
        the same entries as ``DynamicLayer``'s, so attention computes the same. Anything that sets
        ``keys``/``values`` itself (``batch_select_indices``, the engine's compaction) is taken as the
        new content: the next update moves it into fresh buffers."""

        def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
            super().lazy_initialization(key_states, value_states)
            self._buffers: tuple[torch.Tensor, torch.Tensor] | None = None

        def update(
            self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
        ) -> tuple[torch.Tensor, torch.Tensor]:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            if key_states.requires_grad or value_states.requires_grad:  # in-place writes would not backpropagate
                self._buffers = None
                return super().update(key_states, value_states, *args, **kwargs)
            length, added = self.keys.shape[-2] if self.keys.dim() == 4 else 0, key_states.shape[-2]
            held = self._buffers
            if (
                held is None
                or held[0].shape[-2] < length + added
                or not _views_of(self.keys, held[0])
                or not _views_of(self.values, held[1])
                or held[0].shape[:2] != key_states.shape[:2]
            ):
                held = self._grow(key_states, value_states, length, length + added)
            held[0][:, :, length : length + added].copy_(key_states)
            held[1][:, :, length : length + added].copy_(value_states)
            self.keys, self.values = held[0][:, :, : length + added], held[1][:, :, : length + added]
            return self.keys, self.values

        def _grow(self, key_states: torch.Tensor, value_states: torch.Tensor, length: int, needed: int) -> Any:
            room = needed + max(RESERVE_MIN, int(needed * RESERVE_SHARE))
            fresh = []
            for old, new in ((self.keys, key_states), (self.values, value_states)):
                buffer = new.new_empty((*new.shape[:2], room, new.shape[3]))
                if length:
                    buffer[:, :, :length].copy_(old)
                fresh.append(buffer)
            self._buffers = (fresh[0], fresh[1])
            return self._buffers

        def reset(self) -> None:
            self._buffers = None
            super().reset()

    return ReservedLayer


def _views_of(t: torch.Tensor, buffer: torch.Tensor) -> bool:
    """Whether ``t`` is ``buffer``'s leading columns (what ``update`` and ``crop`` leave)."""
    return t.data_ptr() == buffer.data_ptr() and t.stride() == buffer.stride() and t.shape[:2] == buffer.shape[:2]


_RESERVED: list[type] = []


def reserved_layer_class() -> type:
    if not _RESERVED:
        _RESERVED.append(_reserved_layer_class())
    return _RESERVED[0]


def new_dynamic_cache(model: Any, reserve: bool = False) -> Any:
    """HF's ``DynamicCache`` for ``model``; ``reserve``: its plain layers replaced by
    ``ReservedLayer`` (the same entries without copying the whole cache on every pass; for passes
    without gradients: the decode engine's)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    try:
        cache = DynamicCache(config=model.config)
    except TypeError:  # older signature
        cache = DynamicCache()
    if not reserve:
        return cache
    reserved = reserved_layer_class()
    layers = getattr(cache, "layers", None)
    if layers is not None:
        cache.layers = [reserved() if type(layer) is DynamicLayer else layer for layer in layers]
    if getattr(cache, "layer_class_to_replicate", None) is DynamicLayer:
        cache.layer_class_to_replicate = reserved
    return cache


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _real_order(valid: torch.Tensor, longest: int) -> torch.Tensor:
    """[B, longest]: each row's real columns in order, right-aligned (the columns of holes before them)."""
    return torch.sort(valid.to(torch.int8), dim=1, stable=True).indices[:, valid.shape[1] - longest :]


def _gather_columns(t: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """The cache columns ``order`` [B, N] of keys or values ``t`` [B, H, L, D]: [B, H, N, D]."""
    return t.gather(2, order[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[3]))


class _KV:
    """What both kinds share: the real-entry counts per active row (kept on the host) and holes."""

    cache: Any
    valid: torch.Tensor  # [rows, columns] bool: the cache columns that hold real tokens

    def __init__(self, batch: int) -> None:
        self.real = [0] * batch  # real (non-hole) cache entries of each active row

    def columns(self, width: int) -> int:
        """How many columns a pass whose rows need ``width`` is fed as (extra columns are holes)."""
        return width

    def logits_kept(self, keep: int) -> int:
        """How many trailing logits per row to compute when the pass needs ``keep``."""
        return keep

    def settle(self, fed: list[int], rejected: list[int], width: int) -> None:
        """After a pass whose block had ``width`` columns before its mask slots: each active row cached
        ``fed`` tokens, the last ``rejected`` of which (rejected drafts) are holes now."""
        self.real = [n + f - x for n, f, x in zip(self.real, fed, rejected)]
        if any(rejected):
            dev = self.valid.device
            cols = torch.arange(width, device=dev)
            self.valid[self._tail(width)] &= cols < (width - torch.tensor(rejected, device=dev))[:, None]

    def _tail(self, width: int) -> tuple[Any, slice]:
        """Index of ``valid`` for the active rows' last ``width`` columns in use."""
        raise NotImplementedError


class DynamicKV(_KV):
    def __init__(self, model: Any, batch: int, call: Call, device: torch.device) -> None:
        super().__init__(batch)
        self.call = call
        self.cache = new_dynamic_cache(model, reserve=True)
        self.valid = torch.zeros((batch, 0), dtype=torch.bool, device=device)  # [B, L]
        # Holes can be dropped from plain per-layer key/value tensors (not sliding windows, not quantized).
        layers = getattr(self.cache, "layers", None)
        self.compactable = layers is not None and all(type(layer).__name__ in ("DynamicLayer", "ReservedLayer") for layer in layers)

    def forward(
        self, block: torch.Tensor, block_valid: torch.Tensor, positions: torch.Tensor, keep: int,
        within: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The pass; ``within`` [B, W, W] (True = may attend) replaces the causal order inside the
        block (a 4D mask is fed then: the engine's recovery slots see only part of the block)."""
        attention = torch.cat([self.valid, block_valid], dim=1)  # [B, L + W]; holes are False
        mask = attention
        if within is not None:
            B, W = block.shape
            itself = torch.eye(W, dtype=torch.bool, device=block.device)[None]  # no query without a key
            inner = (within & block_valid[:, None, :]) | itself
            mask = torch.cat([self.valid[:, None, :].expand(-1, W, -1), inner], dim=2)[:, None]  # [B, 1, W, L + W]
        logits = self.call(block, mask, positions, self.cache, keep)
        self.valid = attention
        return logits

    def drop_tail(self, n: int) -> None:
        """Drop the last ``n`` columns (the pass's mask slots)."""
        if n:
            self.cache.crop(-n)
            self.valid = self.valid[:, : self.valid.shape[1] - n]

    def _tail(self, width: int) -> tuple[Any, slice]:
        return slice(None), slice(-width, None)

    def retire(self, keep: list[int]) -> None:
        """Keep only the active rows at ``keep`` (the others finished)."""
        self.real = [self.real[i] for i in keep]
        index = torch.tensor(keep, device=self.valid.device)
        self.cache.batch_select_indices(index)
        self.valid = self.valid[index]

    def compact(self) -> bool:
        """Drop the holes once they are most of the cache (rejected drafts, padding of short rows).

        Every pass appends as many columns as the widest row feeds, so holes pile up (with ``verify``
        most drafts are rejected), and each later pass attends over them and copies them when the
        cache grows. Returns whether it compacted.
        """
        length = self.valid.shape[1]
        if length < COMPACT_MIN or not self.compactable or not self.real:
            return False
        longest = max(self.real)
        if longest > COMPACT_BELOW * length:
            return False
        order = _real_order(self.valid, longest)
        for layer in self.cache.layers:
            layer.keys, layer.values = _gather_columns(layer.keys, order), _gather_columns(layer.values, order)
        self.valid = self.valid.gather(1, order)
        return True


class StaticKV(_KV):
    """A preallocated cache of ``slots`` rows x ``capacity`` columns; see the module docstring.

    ``room`` is the most columns any pass after the first feeds; ``keep`` the most logits per row any
    pass needs. ``call`` runs the model; ``compiled`` (``torch.compile`` of the model's call), given to
    it, runs the passes after the first, at fixed shapes; without it the batch and block are not padded.
    """

    def __init__(
        self, model: Any, batch: int, prompt_width: int, max_new_tokens: int, room: int, keep: int,
        device: torch.device, call: Call, compiled: Callable[..., Any] | None,
    ) -> None:
        super().__init__(batch)
        self.model = model
        self.call = call
        self.compiled = compiled
        self.keep = keep
        self.slots = _pow2(batch) if compiled else batch
        # After a compaction the longest row holds at most prompt + generated entries: a block fits.
        needed = prompt_width + max_new_tokens + (_pow2(room) if compiled else room)
        self.capacity = -(-needed // CAPACITY_STEP) * CAPACITY_STEP
        self.cache = _static_cache(model, self.slots, self.capacity)
        self.length = 0  # columns in use
        self.valid = torch.zeros((self.slots, self.capacity), dtype=torch.bool, device=device)
        self.rows = torch.arange(batch, device=device)  # the slot of each active row

    def columns(self, width: int) -> int:
        return _pow2(width) if self.compiled and self.length else width

    def logits_kept(self, keep: int) -> int:
        return self.keep if self.compiled else keep

    def forward(
        self, block: torch.Tensor, block_valid: torch.Tensor, positions: torch.Tensor, keep: int,
        within: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if within is not None:  # fixed shapes: the engine feeds a static cache no recovery groups
            raise ValueError("a static cache takes no block mask (within): recovery groups need cache='dynamic'")
        width = block.shape[1]
        if self.length + width > self.capacity:
            self._compact()
        if self.length + width > self.capacity:
            raise RuntimeError(f"static cache overflow: {self.length} + {width} columns > capacity {self.capacity}")
        rows, begin, end = self.rows, self.length, self.length + width
        idle = len(rows) < self.slots
        if idle:  # idle rows attend to their own block only (never to nothing)
            ids = block.new_zeros((self.slots, width))
            ids[rows] = block
            new_valid = torch.ones((self.slots, width), dtype=torch.bool, device=block.device)
            new_valid[rows] = block_valid
            pos = torch.arange(width, device=block.device).repeat(self.slots, 1)
            pos[rows] = positions
            block, block_valid, positions = ids, new_valid, pos
        attention = self.valid.clone()
        attention[:, begin:end] = block_valid
        compiled = self.compiled is not None and begin > 0
        if compiled and block.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()
        logits = self.call(block, attention, positions, self.cache, keep, self.compiled if compiled else None)
        if compiled:  # the output buffer of a CUDA graph is reused by the next pass
            logits = logits.clone()
        self.valid[rows, begin:end] = block_valid[rows] if idle else block_valid
        self.length = end
        return logits[rows] if idle else logits

    def drop_tail(self, n: int) -> None:
        if n:
            self.cache.crop(-n)
            self.valid[:, self.length - n : self.length] = False
            self.length -= n

    def _tail(self, width: int) -> tuple[Any, slice]:
        return self.rows, slice(self.length - width, self.length)

    def retire(self, keep: list[int]) -> None:
        self.real = [self.real[i] for i in keep]
        kept = self.rows[torch.tensor(keep, dtype=torch.long, device=self.rows.device)]
        slots = _pow2(len(keep)) if self.compiled else len(keep)
        if slots < self.slots:
            self._shrink(kept, slots)
            return
        gone = torch.ones(self.slots, dtype=torch.bool, device=self.rows.device)
        gone[kept] = False
        self.valid[gone] = False  # an idle row's entries are never read again
        self.rows = kept

    def _shrink(self, kept: torch.Tensor, slots: int) -> None:
        """Move the rows still active into a cache of ``slots`` rows (a power of two when compiled:
        at most log2(batch) shapes), so idle rows never outnumber active ones."""
        cache = _static_cache(self.model, slots, self.capacity, hold=self.compiled is not None)
        for old, new in zip(self.cache.layers, cache.layers):
            if not new.is_initialized:
                new.lazy_initialization(old.keys[:slots], old.values[:slots])
            new.keys[: len(kept)].copy_(old.keys[kept])
            new.values[: len(kept)].copy_(old.values[kept])
            new.cumulative_length.fill_(self.length)
        valid = torch.zeros((slots, self.capacity), dtype=torch.bool, device=self.valid.device)
        valid[: len(kept)] = self.valid[kept]
        self.cache, self.valid, self.slots = cache, valid, slots
        self.rows = torch.arange(len(kept), device=kept.device)

    def compact(self) -> bool:
        return False  # attention always spans the whole capacity: holes cost nothing until it fills

    def _compact(self) -> None:
        """Move each row's real entries to the start of the cache (right-aligned at the longest row)."""
        length = self.length
        longest = max(self.real, default=0)
        order = _real_order(self.valid[:, :length], longest)
        for layer in self.cache.layers:
            for t in (layer.keys, layer.values):  # written in place: their addresses are fixed
                t[:, :, :longest].copy_(_gather_columns(t[:, :, :length], order))
            layer.cumulative_length.fill_(longest)
        moved_valid = self.valid[:, :length].gather(1, order)
        self.valid.zero_()
        self.valid[:, :longest] = moved_valid
        self.length = longest


def _static_cache(model: Any, slots: int, capacity: int, hold: bool = True) -> Any:
    """An empty ``StaticCache`` for ``model``. With ``hold``, caches are kept on the model by shape
    (for the latest capacity: the batch and the smaller batches rows retire to) and reused by later
    calls, so CUDA graphs recorded on their tensors stay valid."""
    from transformers import StaticCache
    from transformers.cache_utils import StaticLayer

    held = model.__dict__.setdefault("_mtp_static_caches", {})
    if (slots, capacity) in held:
        cache = held[(slots, capacity)]
        cache.reset()
        return cache
    cache = StaticCache(config=model.config, max_cache_len=capacity)
    kinds = sorted({type(layer).__name__ for layer in cache.layers if type(layer) is not StaticLayer})
    if kinds:
        raise ValueError(
            f"cache='static' needs full attention in every layer (plain StaticLayer), but this model's "
            f"static cache has {', '.join(kinds)}; use cache='dynamic'"
        )
    if hold:
        for key in [key for key in held if key[1] != capacity]:  # memory for one capacity at a time
            del held[key]
        held[(slots, capacity)] = cache
    return cache


#: Graphs one compiled model may hold: batch sizes (the batch and the halves rows retire to) x block
#: widths x cache lengths x strategies add up past dynamo's default of 8, after which it would give up
#: compiling the model's forward for the rest of the process.
RECOMPILE_LIMIT = 64


def compiled_call(model: Any, mode: str) -> Callable[..., Any]:
    """``torch.compile`` of the model's call in ``mode``, made once per model and mode."""
    held = model.__dict__.setdefault("_mtp_compiled", {})
    if mode not in held:
        compiled = torch.compile(model.__call__, mode=mode, dynamic=False)

        def call(**kwargs: Any) -> Any:
            with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
                return compiled(**kwargs)

        held[mode] = call
    return held[mode]
