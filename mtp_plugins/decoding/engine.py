"""The batched, KV-cached decode engine: one loop for every strategy.

Each pass, every active row feeds ``[pending tokens] + [k-1 mask tokens]`` (METHOD.md section 6):

- *pending* tokens are decided tokens whose keys/values are not cached yet (what the row emitted in
  the previous pass; the whole prompt in the first pass), followed by the row's *drafts* when its
  strategy verifies drafts;
- rows are right-aligned in one block, so the mask slots are the last k-1 columns of every row and a
  single ``crop`` drops them from the cache after the pass; a row with fewer pending tokens gets
  holes on the left, kept out by the attention mask, and every token gets an explicit position id;
- rejected drafts stay in the cache as holes (masked out); finished rows leave the batch;
- a draft-verifying strategy with ``recovery`` groups (``verify``: 1) also feeds, after those mask
  slots, k-1 more after the decided token (and after each of the first drafts, one group per
  anchor), which see the block only up to their anchor (a 4D mask, ``_recovery_layout``): the mask
  slots after the drafts continue a prefix that a rejected draft makes wrong, the anchor's group
  does not, so the next pass still has drafts. All of them are dropped from the cache after the pass.

The logits of the last decided token give proposal 0 (the ordinary next token); mask slot j gives
proposal j. The strategy chooses how many leading proposals each row emits; mask tokens are never
a proposal. How many mask slots a pass feeds is ``mask_slots``: all k-1, a fixed number, or what the
acceptance so far and a cost model make worth it (``width.py``; never timing-driven unless asked). Strategies that verify
drafts can also draft from the row's own text (``lookup.py``) where the mask proposals run short.
The cache and its validity mask live in ``kvcache.py``: a growing ``DynamicCache`` (the default) or a
preallocated ``StaticCache`` whose passes have fixed shapes for ``torch.compile``.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from mtp_plugins.adapters import gate_tail
from mtp_plugins.checkpoint import read_mtp_spec
from mtp_plugins.decoding.attention import grouped_attention
from mtp_plugins.decoding.base import Decoder, Proposals, greedy_tokens
from mtp_plugins.decoding.kvcache import DynamicKV, StaticKV, compiled_call
from mtp_plugins.decoding.lookup import NgramIndex
from mtp_plugins.decoding.stats import GenerateOutput, GenerationStats, RowStats
from mtp_plugins.decoding.stopping import StopStrings, sample_tokens
from mtp_plugins.decoding.width import ModelCost, PassCost, WidthPolicy, pass_width
from mtp_plugins.modeling import attention_for, forward_kwargs
from mtp_plugins.registry import load_decoder


@dataclass
class _Row:
    index: int  # row in the caller's batch
    pending: list[int]  # tokens to feed next pass: decided ones, then `drafts` drafts
    position: int  # position id of pending[0]
    drafts: int = 0
    generated: list[int] = field(default_factory=list)
    stats: RowStats = field(default_factory=RowStats)
    lookup: NgramIndex | None = None  # the row's decided tokens, for drafts from its own text


#: Mask proposals at least this confident stay drafts; where they are less sure, drafts continue from
#: the row's own text (``draft_lookup``), falling back to the remaining mask proposals.
DRAFT_CONFIDENCE = 0.5


@dataclass(frozen=True)
class _Limits:
    max_new_tokens: int
    eos: frozenset[int]
    stops: StopStrings | None


def generate(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    strategy: str = "confadapt",
    k: int = 8,
    tau: float = 0.9,
    max_new_tokens: int = 256,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    stop_strings: str | Sequence[str] | None = None,
    tokenizer: Any = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    mask_slots: int | str = "auto",
    draft_lookup: int | None = None,
    cache: str | None = None,
    compile: bool | str = False,
    decoder_options: dict[str, Any] | None = None,
) -> GenerateOutput:
    """Decode a batch with an MTP model; see ``GenerateOutput`` for what comes back.

    ``input_ids`` is ``[B, T]``; rows may be padded (left padding, as for HF ``generate``), with
    ``attention_mask`` marking real tokens. ``strategy`` is a decoder name registered under
    ``mtp_plugins.decoders`` (built-ins: ``ar``, ``static``, ``confadapt``, ``verify``); ``k`` is the
    number of proposals per pass and ``tau`` the ConfAdapt confidence threshold. As in HF
    ``generate``, ``eos_token_id=None`` means the model's generation config EOS id(s). Each row stops
    on its own at EOS, ``max_new_tokens`` (never exceeded) or a stop string (needs ``tokenizer``).
    ``do_sample`` samples the ordinary next-token position with ``temperature``/``top_p``; mask
    proposals stay greedy.

    ``mask_slots`` is how many mask slots a pass feeds; it never depends on timing unless asked to:
    ``"auto"`` (default) is all k-1 (the paper's method) for strategies whose output depends on it
    (``confadapt``, ``static``), and ``"adaptive"`` for those whose output does not
    (``adaptive_width``: ``verify``); ``"adaptive"`` feeds the slots that pay for themselves by the
    acceptance seen so far and a fixed cost model of a pass (``width.ModelCost``), reproducible to
    the token; ``"timed"`` uses the measured cost of a pass on this machine instead (the first call
    per model and batch size times a few passes): faster where the fixed model is off, but the
    widths, and so the output of a lossy strategy (and of ``verify`` in bf16, by rounding), can
    differ between runs; an int feeds exactly that many. ``decoder_options`` are the strategy's
    own options (``Decoder.options``). ``draft_lookup`` is the longest n-gram a draft-verifying strategy
    matches in the row's own text to draft where mask proposals are unsure (0: off; default: the
    strategy's ``draft_lookup``).

    ``cache`` is where keys and values live: ``"dynamic"`` (the default: grows as needed, finished
    rows leave the batch) or ``"static"`` (preallocated for the call, reused by later calls of the
    same shape; ``mask_slots="auto"`` then feeds all k-1 slots). ``compile`` runs every pass after
    the first through ``torch.compile`` at a few fixed shapes: ``True`` (mode ``"reduce-overhead"``,
    i.e. CUDA graphs, on a GPU; ``"default"`` elsewhere) or a ``torch.compile`` mode name; it needs
    (and implies) ``cache="static"``. Outputs are the same whatever the cache (up to the rounding of
    a different kernel in low precision; exact in float32).
    """
    start = time.perf_counter()
    decoder = make_decoder(strategy, k, tau, do_sample, temperature, top_p, decoder_options)
    static, mode = check_cache(cache, compile)
    slots = check_mask_slots(mask_slots, decoder)
    if static and isinstance(slots, str):
        slots = decoder.num_proposals - 1  # fixed shapes: the width policy would vary them
    lookup = check_draft_lookup(draft_lookup, decoder)
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    prompts = _prompt_rows(input_ids, attention_mask)
    mask_ids = _mask_ids(model, decoder, strategy)
    eos = _eos_ids(model, eos_token_id)
    pad = _pad_id(model, pad_token_id, eos)
    if isinstance(stop_strings, str):
        stop_strings = [stop_strings]
    limits = _Limits(max_new_tokens, frozenset(eos), StopStrings(tokenizer, stop_strings) if stop_strings else None)

    rows = [
        _Row(index=i, pending=p, position=0, lookup=NgramIndex(p, lookup) if lookup else None)
        for i, p in enumerate(prompts)
    ]
    stats = GenerationStats(strategy=strategy, k=k, tau=float(tau), rows=[r.stats for r in rows])
    if max_new_tokens > 0:
        sampler = (lambda logits: sample_tokens(logits, temperature, top_p, generator)) if do_sample else None
        loop = _DecodeLoop(model, decoder, strategy, mask_ids, pad, limits, sampler, slots, _never_emitted(model))
        with torch.inference_mode(), grouped_attention(model):
            loop.run(rows, static=static, mode=mode)
        stats.model_calls = len(loop.slots_per_call)
        stats.mask_slots_per_call = loop.slots_per_call

    width = max(len(r.generated) for r in rows)
    new = torch.full((len(rows), width), pad, dtype=input_ids.dtype, device=input_ids.device)
    for r in rows:
        if r.generated:
            new[r.index, : len(r.generated)] = torch.tensor(r.generated, dtype=input_ids.dtype)
    stats.wall_seconds = time.perf_counter() - start
    return GenerateOutput(sequences=torch.cat([input_ids, new], dim=1), stats=stats)


class _DecodeLoop:
    """The state of one ``generate`` call: the KV cache, the cache's validity mask, the active rows."""

    def __init__(
        self,
        model: Any,
        decoder: Decoder,
        name: str,
        mask_ids: list[int],
        pad: int,
        limits: _Limits,
        sampler: Any,
        slots: int | str,
        never: list[int],
    ) -> None:
        self.model = model
        self.decoder = decoder
        self.name = name
        self.mask_ids = mask_ids
        self.pad = pad
        self.limits = limits
        self.sampler = sampler
        self.device = model.get_input_embeddings().weight.device
        # Mask tokens are never a prediction: no proposal, draft or sample may be one.
        self.never = torch.tensor(never, device=self.device) if never else None
        self.cache_kwarg, self.keep_kwarg = forward_kwargs(model)
        self.kv: DynamicKV | StaticKV
        self.slots = len(mask_ids) if isinstance(slots, str) else min(slots, len(mask_ids))  # unless ``policy`` chooses
        self.recovery = check_recovery(decoder)
        self.policy = None
        if isinstance(slots, str) and mask_ids:
            width = pass_width(len(mask_ids), decoder.feeds_drafts, self.recovery)
            cost = PassCost(model, self._forward_at, self.device, width) if slots == "timed" else ModelCost(self.device)
            self.policy = WidthPolicy(len(mask_ids), decoder.feeds_drafts, cost, self.recovery)
        self.slots_per_call: list[int] = []

    def run(self, rows: list[_Row], static: bool = False, mode: str | None = None) -> None:
        self.active = list(rows)
        self.lookup_drafts = any(r.lookup is not None for r in rows)
        self.decoder.start(len(rows), self.device)
        if static:
            self.recovery = 0  # fixed shapes: no recovery groups
            self.kv = self._static_kv(rows, mode)
        else:
            self.kv = DynamicKV(self.model, len(rows), self._forward_at, self.device)
        while self.active:
            self._step()
            self._retire_finished()
            self.kv.compact()

    def _static_kv(self, rows: list[_Row], mode: str | None) -> StaticKV:
        if self.keep_kwarg != "logits_to_keep":
            raise ValueError(
                f"cache='static' needs a model whose forward takes logits_to_keep; {type(self.model).__name__} does not"
            )
        n = self.slots
        feeds = self.decoder.feeds_drafts
        # Pending tokens per row: at most k emitted, plus (draft strategies) up to n drafts; then n masks.
        room = self.decoder.num_proposals + (n if feeds else 0) + n
        if mode == "auto":
            mode = "reduce-overhead" if self.device.type == "cuda" else "default"
        compiled = compiled_call(self.model, mode) if mode else None
        return StaticKV(
            self.model, len(rows), max(len(r.pending) for r in rows), self.limits.max_new_tokens, room,
            pass_width(n, feeds), self.device, self._forward_at, compiled,
        )

    def _step(self) -> None:
        rows = self.active
        n_masks = self.policy.choose(len(rows)) if self.policy else self.slots
        self.slots_per_call.append(n_masks)
        if self.decoder.feeds_drafts:
            for r in rows:  # drafts beyond this pass's slots would not pay for themselves either
                if r.drafts > n_masks:
                    del r.pending[len(r.pending) - r.drafts + n_masks :]
                    r.drafts = n_masks
        mask_ids = self.mask_ids[:n_masks]
        # Pending columns of the block (wider where the cache feeds fixed shapes: holes on the left).
        width = self.kv.columns(max(len(r.pending) for r in rows) + n_masks) - n_masks
        max_drafts = max(r.drafts for r in rows)
        groups = min(self.recovery, max_drafts)  # recovery groups: mask slots after the first fed tokens
        tail = n_masks * (1 + groups)
        # One host-to-device copy per pass: each row's hole count, first position id, draft count, then its tokens.
        packed = []
        for r in rows:
            hole = width - len(r.pending)
            packed.append([hole, r.position - hole, r.drafts] + [self.pad] * hole + r.pending + mask_ids * (1 + groups))
        dev = self.device
        packed_t = torch.tensor(packed, device=dev)
        block = packed_t[:, 3:]  # [B, W], W = width + tail
        columns = torch.arange(block.shape[1], device=dev)
        positions = (packed_t[:, 1:2] + columns).clamp_(min=0)
        within = None
        if groups:
            positions, within = _recovery_layout(positions, packed_t[:, 2], width, n_masks, groups)
        keep = max_drafts + 1 + tail  # logits from the oldest last-decided token to the last mask
        with gate_tail(self.model, tail):  # gated adapters act on the mask slots only
            logits = self.kv.forward(block, columns >= packed_t[:, :1], positions, self.kv.logits_kept(keep), within)
        logits = logits[:, -keep:]  # [B, keep, V]
        if self.never is not None:
            logits.index_fill_(-1, self.never, float("-inf"))
        self.kv.drop_tail(tail)

        drafted = block[:, width - max_drafts : width]
        proposals, verified = self._propose(logits, drafted, packed_t[:, 2], max_drafts, groups)
        chosen = self.decoder.select(proposals)  # [B]
        columns = [chosen.view(-1, 1), verified.view(-1, 1), proposals.valid.view(-1, 1)]
        if self.lookup_drafts and n_masks:
            # Mask proposals count as drafts while they are this confident; lookup continues after.
            sure = (proposals.mask_confidence >= DRAFT_CONFIDENCE).long().cumprod(dim=1).sum(dim=1)
            columns.append(sure.view(-1, 1))
        else:
            columns.append(torch.full_like(chosen.view(-1, 1), n_masks))
        # One host transfer per pass carries everything the bookkeeping needs.
        host = torch.cat([*columns, proposals.tokens], dim=1).tolist()
        outcomes: list[tuple[int, int]] = []
        fed = [len(r.pending) for r in rows]
        rejected = [self._advance(r, *h[:4], h[4:], outcomes) for r, h in zip(rows, host)]
        self.kv.settle(fed, rejected, width)  # rejected drafts keep their cache slots as holes
        if self.policy:
            self.policy.observe(outcomes)

    def _forward_at(
        self, block: torch.Tensor, attention: torch.Tensor, positions: torch.Tensor, cache: Any, keep: int,
        fn: Any = None,
    ) -> torch.Tensor:
        """The last ``keep`` logits of every row, from the model (or ``fn``: the model compiled)."""
        kwargs = {self.cache_kwarg: cache, "use_cache": True}
        if self.keep_kwarg:
            kwargs[self.keep_kwarg] = keep
        if attention.dim() == 4:  # a custom mask (recovery groups), in the form the model's attention reads
            attention = attention_for(self.model, attention, self.model.get_input_embeddings().weight.dtype)
        out = (fn or self.model)(input_ids=block, attention_mask=attention, position_ids=positions, **kwargs)
        return out.logits[:, -keep:]

    def _propose(
        self, logits: torch.Tensor, drafted: torch.Tensor, n_drafts: torch.Tensor, max_drafts: int, groups: int = 0
    ) -> tuple[Proposals, torch.Tensor]:
        """Verify drafts (``n_drafts`` [B]: each row's, on the device), then build the proposals.
        Returns them and the verified draft count [B]."""
        rows = self.active
        dev = logits.device
        if not max_drafts:  # no drafts fed (ConfAdapt, static, ar): no verification, no recovery group
            return self._propose_undrafted(logits), torch.zeros(len(rows), dtype=torch.long, device=dev)
        exact = logits[:, : max_drafts + 1]  # [B, D+1, V]: last decided token, then the drafts
        B, V = logits.shape[0], logits.shape[-1]
        n = (logits.shape[1] - max_drafts - 1) // (1 + groups)  # mask slots per group
        mask_groups = logits[:, max_drafts + 1 :].view(B, 1 + groups, n, V)  # [B, 1+g, n, V]: after the drafts, recovery
        batch = torch.arange(len(rows), device=dev)
        greedy = greedy_tokens(exact)  # [B, D+1]; column c predicts the token at column c+1
        is_draft = torch.arange(max_drafts, device=dev) >= (max_drafts - n_drafts)[:, None]
        agrees = (drafted == greedy[:, :-1]) | ~is_draft  # [B, D]
        at = agrees.long().cumprod(dim=1).sum(dim=1)  # [B] column whose logits give the next token
        verified = at - (max_drafts - n_drafts)
        all_verified = verified == n_drafts
        next_logits = exact[batch, at]  # [B, V]
        first = self.sampler(next_logits) if self.sampler else greedy_tokens(next_logits)
        # Mask proposals made after a rejected draft continue a wrong prefix, unless a recovery group
        # sits after the token whose logits gave proposal 0 (``verified`` drafts past the decided one).
        recovered = ~all_verified & (verified < groups)
        group = torch.where(recovered, 1 + verified.clamp(max=max(groups - 1, 0)), 0)
        mask_logits = mask_groups[batch, group]  # [B, n, V]
        top = mask_logits.max(dim=-1)  # the slots' greedy tokens, and their logits (for the confidence)
        tokens = torch.cat([first.view(-1, 1), top.indices], dim=1)  # [B, k]
        # Otherwise only proposal 0 is valid.
        valid = torch.where(all_verified | recovered, tokens.shape[1], 1)
        proposals = Proposals(tokens=tokens, valid=valid, next_logits=next_logits, mask_logits=mask_logits,
                              row_index=[r.index for r in rows], _mask_top=top.values)
        return proposals, verified

    def _propose_undrafted(self, logits: torch.Tensor) -> Proposals:
        """``_propose`` for a pass that fed no drafts: ``logits`` [B, 1 + n, V] are the last decided
        token's, then the mask slots' (every proposal valid). The same proposals, from views of
        ``logits`` and one reduction over all of it (every row reduces on its own, as row by row)."""
        if self.sampler:
            slots = logits[:, 1:].max(dim=-1)
            tokens = torch.cat([self.sampler(logits[:, 0]).view(-1, 1), slots.indices], dim=1)
            known: dict[str, Any] = {"_mask_top": slots.values}
        else:
            tokens = logits.max(dim=-1).indices  # [B, 1 + n]: proposal 0 and the slots' greedy tokens
            known = {"_logits": logits}  # every proposal is its row's greedy token
        valid = torch.full((logits.shape[0],), tokens.shape[1], dtype=torch.long, device=logits.device)
        return Proposals(tokens=tokens, valid=valid, next_logits=logits[:, 0], mask_logits=logits[:, 1:],
                         row_index=[r.index for r in self.active], **known)

    def _advance(
        self, r: _Row, n_emit: int, n_verified: int, n_valid: int, n_sure: int, proposed: list[int],
        outcomes: list[tuple[int, int]],
    ) -> int:
        """Apply one pass's outcome to a row; returns how many of its drafts were rejected.

        Appends to ``outcomes`` what the width policy learns from the row: (proposals at stake, how
        many of them were taken).
        """
        if not 1 <= n_emit <= n_valid:
            raise RuntimeError(
                f"decoder {self.name!r} chose to emit {n_emit} proposals; it must choose 1..{n_valid}"
            )
        decided = len(r.pending) - r.drafts
        emitted = r.pending[decided : decided + n_verified] + proposed[:n_emit]
        rejected = r.drafts - n_verified
        r.position += decided + n_verified
        if self.decoder.feeds_drafts:
            outcomes.append((r.drafts, n_verified))
        else:
            outcomes.append((n_valid - 1, n_emit - 1))
        before = len(r.generated)
        self._record(r, emitted)
        if not self.decoder.feeds_drafts:
            r.pending, r.drafts = proposed[:n_emit], 0
            return rejected
        drafts = proposed[n_emit:n_valid]
        if r.lookup is not None and r.stats.stop_reason is None:
            r.lookup.extend(r.generated[before:])
            sure = drafts[: max(0, n_sure + 1 - n_emit)]
            found = r.lookup.continuation(sure, len(self.mask_ids) - len(sure))
            if found:
                drafts = sure + found
        r.pending, r.drafts = proposed[:n_emit] + drafts, len(drafts)
        return rejected

    def _record(self, r: _Row, emitted: list[int]) -> None:
        """Append what the row emitted, cut at its stop conditions, and set its stop reason."""
        limits = self.limits
        emitted = emitted[: limits.max_new_tokens - len(r.generated)]
        for i, token in enumerate(emitted):
            if token in limits.eos:
                emitted = emitted[: i + 1]
                break
        r.generated.extend(emitted)
        stopped = False
        if limits.stops is not None:
            keep = limits.stops.tokens_to_keep(r.generated, len(emitted))
            if keep is not None:
                del r.generated[len(r.generated) - len(emitted) + keep :]
                emitted = emitted[:keep]
                stopped = True
        r.stats.tokens_per_pass.append(len(emitted))
        if emitted[-1] in limits.eos:
            r.stats.stop_reason = "eos"
        elif stopped:
            r.stats.stop_reason = "stop_string"
        elif len(r.generated) >= limits.max_new_tokens:
            r.stats.stop_reason = "length"

    def _retire_finished(self) -> None:
        keep = [i for i, r in enumerate(self.active) if r.stats.stop_reason is None]
        if len(keep) == len(self.active):
            return
        self.active = [self.active[i] for i in keep]
        if keep:
            self.kv.retire(keep)


def make_decoder(
    strategy: str, k: int, tau: float, do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
    options: dict[str, Any] | None = None,
) -> Decoder:
    """The decoder ``strategy`` built for one call, with its own ``options`` (ValueError naming a bad one)."""
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    if not isinstance(tau, (int, float)) or isinstance(tau, bool):
        raise ValueError(f"tau must be a number, got {tau!r}")
    cls = load_decoder(strategy)
    if options is not None and not isinstance(options, dict):
        raise ValueError(f"decoder_options must be a dict of option name -> value, got {type(options).__name__}")
    decoder = cls(k=k, tau=float(tau), **(options or {}))
    if do_sample:
        if not cls.supports_sampling:
            raise ValueError(
                f"strategy {strategy!r} does not support do_sample=True (it is exact greedy decoding); "
                "use do_sample=False, or a sampling strategy such as 'ar' or 'confadapt'"
            )
        if not isinstance(temperature, (int, float)) or temperature <= 0:
            raise ValueError(f"temperature must be > 0 when do_sample=True, got {temperature!r}")
        if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    proposals = decoder.num_proposals
    if not isinstance(proposals, int) or proposals < 1:
        raise RuntimeError(f"decoder {strategy!r} asked for {proposals!r} proposals per pass; it must be an int >= 1")
    return decoder


WIDTH_POLICIES = ("adaptive", "timed")


def check_mask_slots(mask_slots: int | str, decoder: Decoder) -> int | str:
    """The fixed mask slots per pass, or the width policy that chooses them per pass
    (``"adaptive"``: from the inputs alone; ``"timed"``: from measured pass times)."""
    most = decoder.num_proposals - 1
    if mask_slots == "auto":
        return "adaptive" if decoder.adaptive_width and most else most
    if mask_slots in WIDTH_POLICIES:
        return mask_slots if most else 0
    if not isinstance(mask_slots, int) or isinstance(mask_slots, bool) or not 0 <= mask_slots <= most:
        raise ValueError(
            f"mask_slots must be 'auto', 'adaptive', 'timed' or an int in [0, {most}] (k-1 for k={decoder.k}), "
            f"got {mask_slots!r}"
        )
    return mask_slots


def check_recovery(decoder: Decoder) -> int:
    """The recovery groups a pass of this decoder may feed (its ``recovery`` option; 0 unless it
    verifies drafts)."""
    recovery = getattr(decoder, "recovery", 0)
    if not isinstance(recovery, int) or isinstance(recovery, bool) or recovery < 0:
        raise ValueError(
            f"recovery must be an int >= 0 (mask-slot groups after the first fed tokens of a pass; 0: off), got {recovery!r}"
        )
    return recovery if decoder.feeds_drafts and decoder.num_proposals > 1 else 0


def _recovery_layout(
    positions: torch.Tensor, drafts: torch.Tensor, width: int, slots: int, groups: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Position ids and the block-to-block attention ``[B, W, W]`` of a pass with recovery groups.

    The block is ``[pending (width columns: holes, decided tokens, drafts)] [slots mask slots after
    the last draft] [groups x slots mask slots]``. Recovery group j is anchored at the j-th token
    after the last decided one (j = 0: the decided token itself): its slots continue the row from
    there, exactly as a pass that had fed nothing past the anchor, so when draft j+1 is rejected the
    next pass still has drafts. Everything else keeps the causal order.
    """
    B, W = positions.shape
    dev = positions.device
    cols = torch.arange(W, device=dev)
    start = width + slots  # first column of recovery group 0
    causal = cols[None, :] <= cols[:, None]  # [W, W]
    rel = (cols - start).clamp(min=0)
    in_group = cols >= start  # [W]
    group, slot = rel // slots, rel % slots + 1  # [W]
    group_start = start + group * slots
    anchor = (width - 1 - drafts[:, None] + group[None, :]).clamp(min=0, max=width - 1)  # [B, W] anchor column
    sees = (cols[None, None, :] <= anchor[:, :, None]) | (
        (cols[None, None, :] >= group_start[None, :, None]) & causal[None]
    )  # [B, W, W] for group queries
    within = torch.where(in_group[None, :, None], sees, causal[None])
    positions = torch.where(in_group[None, :], positions.gather(1, anchor) + slot[None, :], positions)
    return positions, within


def check_draft_lookup(draft_lookup: int | None, decoder: Decoder) -> int:
    """The n-gram length of lookup drafts this decoder uses (0: none)."""
    if draft_lookup is None:
        draft_lookup = decoder.draft_lookup
    if not isinstance(draft_lookup, int) or isinstance(draft_lookup, bool) or draft_lookup < 0:
        raise ValueError(f"draft_lookup must be an int >= 0 (the longest n-gram matched; 0: off), got {draft_lookup!r}")
    return draft_lookup if decoder.feeds_drafts and decoder.num_proposals > 1 else 0


def _prompt_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> list[list[int]]:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[0] == 0:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must be a [batch, length] tensor with batch >= 1, got {shape}")
    if attention_mask is None:
        return input_ids.tolist()
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask shape {tuple(attention_mask.shape)} differs from input_ids shape {tuple(input_ids.shape)}"
        )
    rows = [ids[mask.bool()].tolist() for ids, mask in zip(input_ids, attention_mask)]
    empty = [i for i, r in enumerate(rows) if not r]
    if empty:
        raise ValueError(f"rows {empty} of the batch have an empty prompt (attention_mask all zero)")
    return rows


def _mask_ids(model: Any, decoder: Decoder, strategy: str) -> list[int]:
    slots = decoder.num_proposals - 1
    if slots == 0:
        return []
    spec = read_mtp_spec(model)
    if spec is None:
        raise ValueError(
            f"strategy {strategy!r} with k={decoder.k} feeds {slots} mask token(s), but this model has "
            "no MTP mask token (config.mtp is missing). Add one with "
            "mtp_plugins.add_mask_tokens(model, tokenizer) and train it with `mtp-train`, "
            "or decode with strategy='ar' (or k=1)."
        )
    if spec.k_max is not None and decoder.k > spec.k_max:
        warnings.warn(
            f"decoding with k={decoder.k}, beyond the k_max={spec.k_max} this checkpoint was trained for",
            stacklevel=3,
        )
    return spec.mask_ids(slots)


def _never_emitted(model: Any) -> list[int]:
    """The checkpoint's mask token ids (none for a plain model): never emitted, drafted or sampled."""
    spec = read_mtp_spec(model)
    return list(spec.mask_token_ids) if spec is not None else []


def _eos_ids(model: Any, eos_token_id: int | Sequence[int] | None) -> list[int]:
    if eos_token_id is None:
        config = getattr(model, "generation_config", None)
        eos_token_id = getattr(config, "eos_token_id", None)
    if eos_token_id is None:
        return []
    if isinstance(eos_token_id, torch.Tensor):
        eos_token_id = eos_token_id.tolist()
    return [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)


def _pad_id(model: Any, pad_token_id: int | None, eos: list[int]) -> int:
    if pad_token_id is None:
        pad_token_id = getattr(getattr(model, "generation_config", None), "pad_token_id", None)
    if pad_token_id is None:
        pad_token_id = eos[0] if eos else 0
    return int(pad_token_id)


_CACHES = ("dynamic", "static")


def check_cache(cache: str | None, compile: bool | str) -> tuple[bool, str | None]:
    """(static cache?, torch.compile mode or None; ``"auto"``: chosen by device)."""
    if compile is None or compile is False:
        mode = None
    elif compile is True:
        mode = "auto"
    elif isinstance(compile, str):
        modes = list(torch._inductor.list_mode_options())
        if compile not in modes:
            raise ValueError(f"compile must be True, False or a torch.compile mode {modes}, got {compile!r}")
        mode = compile
    else:
        raise ValueError(f"compile must be True, False or a torch.compile mode name, got {compile!r}")
    if cache is None:
        cache = "static" if mode else "dynamic"
    if cache not in _CACHES:
        raise ValueError(f"cache must be one of {list(_CACHES)}, got {cache!r}")
    if mode and cache != "static":
        raise ValueError(
            f"compile={compile!r} needs cache='static' (torch.compile needs fixed shapes), got cache={cache!r}"
        )
    return cache == "static", mode
