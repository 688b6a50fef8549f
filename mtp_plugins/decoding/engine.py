"""The batched, KV-cached decode engine: one loop for every strategy.

Each pass, every active row feeds ``[pending tokens] + [k-1 mask tokens]`` (METHOD.md section 6):

- *pending* tokens are decided tokens whose keys/values are not cached yet (what the row emitted in
  the previous pass; the whole prompt in the first pass), followed by the row's *drafts* when its
  strategy verifies drafts;
- rows are right-aligned in one block, so the mask slots are the last k-1 columns of every row and a
  single ``crop`` drops them from the cache after the pass; a row with fewer pending tokens gets
  holes on the left, kept out by the attention mask, and every token gets an explicit position id;
- rejected drafts stay in the cache as holes (masked out); finished rows leave the batch.

The logits of the last decided token give proposal 0 (the ordinary next token); mask slot j gives
proposal j. The strategy chooses how many leading proposals each row emits.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from mtp_plugins.checkpoint import read_mtp_spec
from mtp_plugins.decoding.attention import grouped_attention
from mtp_plugins.decoding.base import Decoder, Proposals
from mtp_plugins.decoding.stats import GenerateOutput, GenerationStats, RowStats
from mtp_plugins.decoding.stopping import StopStrings, sample_tokens
from mtp_plugins.modeling import forward_kwargs
from mtp_plugins.registry import load_decoder


@dataclass
class _Row:
    index: int  # row in the caller's batch
    pending: list[int]  # tokens to feed next pass: decided ones, then `drafts` drafts
    position: int  # position id of pending[0]
    drafts: int = 0
    generated: list[int] = field(default_factory=list)
    stats: RowStats = field(default_factory=RowStats)


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
    """
    start = time.perf_counter()
    decoder = _make_decoder(strategy, k, tau, do_sample, temperature, top_p)
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    prompts = _prompt_rows(input_ids, attention_mask)
    mask_ids = _mask_ids(model, decoder, strategy)
    eos = _eos_ids(model, eos_token_id)
    pad = _pad_id(model, pad_token_id, eos)
    if isinstance(stop_strings, str):
        stop_strings = [stop_strings]
    limits = _Limits(max_new_tokens, frozenset(eos), StopStrings(tokenizer, stop_strings) if stop_strings else None)

    rows = [_Row(index=i, pending=p, position=0) for i, p in enumerate(prompts)]
    stats = GenerationStats(strategy=strategy, k=k, tau=float(tau), rows=[r.stats for r in rows])
    if max_new_tokens > 0:
        sampler = (lambda logits: sample_tokens(logits, temperature, top_p, generator)) if do_sample else None
        loop = _DecodeLoop(model, decoder, strategy, mask_ids, pad, limits, sampler)
        with torch.inference_mode(), grouped_attention(model):
            stats.model_calls = loop.run(rows)

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
    ) -> None:
        self.model = model
        self.decoder = decoder
        self.name = name
        self.mask_ids = mask_ids
        self.pad = pad
        self.limits = limits
        self.sampler = sampler
        self.device = model.get_input_embeddings().weight.device
        self.cache_kwarg, self.keep_kwarg = forward_kwargs(model)
        self.cache = _new_cache(model)
        self.valid: torch.Tensor  # [B, L] bool: cache slots that hold real tokens (holes are False)

    def run(self, rows: list[_Row]) -> int:
        self.active = list(rows)
        self.decoder.start(len(rows), self.device)
        self.valid = torch.zeros((len(rows), 0), dtype=torch.bool, device=self.device)
        calls = 0
        while self.active:
            self._step()
            calls += 1
            self._retire_finished()
        return calls

    def _step(self) -> None:
        rows, n_masks = self.active, len(self.mask_ids)
        width = max(len(r.pending) for r in rows)  # pending columns of the block
        max_drafts = max(r.drafts for r in rows)
        tokens, real, starts = [], [], []
        for r in rows:
            hole = width - len(r.pending)
            tokens.append([self.pad] * hole + r.pending + self.mask_ids)
            real.append([False] * hole + [True] * (len(r.pending) + n_masks))
            starts.append(r.position - hole)
        dev = self.device
        block = torch.tensor(tokens, device=dev)  # [B, W], W = width + n_masks
        positions = (torch.tensor(starts, device=dev)[:, None] + torch.arange(block.shape[1], device=dev)).clamp_(min=0)
        attention = torch.cat([self.valid, torch.tensor(real, device=dev)], dim=1)  # [B, L + W]
        keep = max_drafts + 1 + n_masks  # logits from the oldest last-decided token to the last mask
        logits = self._forward(block, attention, positions, keep)  # [B, keep, V]
        if n_masks:
            self.cache.crop(-n_masks)
        self.valid = attention[:, : attention.shape[1] - n_masks]

        proposals, verified = self._propose(logits, block[:, width - max_drafts : width], max_drafts)
        chosen = self.decoder.select(proposals)  # [B]
        # One host transfer per pass carries everything the bookkeeping needs.
        host = torch.cat(
            [chosen.view(-1, 1), verified.view(-1, 1), proposals.valid.view(-1, 1), proposals.tokens], dim=1
        ).tolist()
        rejected = [self._advance(r, *h[:3], h[3:]) for r, h in zip(rows, host)]
        if any(rejected):
            # Rejected drafts keep their cache slots as holes.
            cols = torch.arange(width, device=dev)
            keep_cols = cols < (width - torch.tensor(rejected, device=dev))[:, None]
            self.valid[:, -width:] &= keep_cols

    def _forward(self, block: torch.Tensor, attention: torch.Tensor, positions: torch.Tensor, keep: int) -> torch.Tensor:
        kwargs = {self.cache_kwarg: self.cache, "use_cache": True}
        if self.keep_kwarg:
            kwargs[self.keep_kwarg] = keep
        out = self.model(input_ids=block, attention_mask=attention, position_ids=positions, **kwargs)
        return out.logits[:, -keep:]

    def _propose(
        self, logits: torch.Tensor, drafted: torch.Tensor, max_drafts: int
    ) -> tuple[Proposals, torch.Tensor]:
        """Verify drafts, then build the proposals. Returns them and the verified draft count [B]."""
        rows = self.active
        dev = logits.device
        exact = logits[:, : max_drafts + 1]  # [B, D+1, V]: last decided token, then the drafts
        mask_logits = logits[:, max_drafts + 1 :]  # [B, k-1, V]
        batch = torch.arange(len(rows), device=dev)
        if max_drafts:
            n_drafts = torch.tensor([r.drafts for r in rows], device=dev)
            greedy = exact.argmax(dim=-1)  # [B, D+1]; column c predicts the token at column c+1
            is_draft = torch.arange(max_drafts, device=dev) >= (max_drafts - n_drafts)[:, None]
            agrees = (drafted == greedy[:, :-1]) | ~is_draft  # [B, D]
            at = agrees.long().cumprod(dim=1).sum(dim=1)  # [B] column whose logits give the next token
            verified = at - (max_drafts - n_drafts)
            all_verified = verified == n_drafts
        else:
            at = torch.zeros(len(rows), dtype=torch.long, device=dev)
            verified = at
            all_verified = torch.ones(len(rows), dtype=torch.bool, device=dev)
        next_logits = exact[batch, at]  # [B, V]
        first = self.sampler(next_logits) if self.sampler else next_logits.argmax(dim=-1)
        tokens = torch.cat([first.view(-1, 1), mask_logits.argmax(dim=-1)], dim=1)  # [B, k]
        # Mask proposals made after a rejected draft continue a wrong prefix: only proposal 0 is valid.
        valid = torch.where(all_verified, tokens.shape[1], 1)
        proposals = Proposals(tokens=tokens, valid=valid, next_logits=next_logits, mask_logits=mask_logits,
                              row_index=[r.index for r in rows])
        return proposals, verified

    def _advance(self, r: _Row, n_emit: int, n_verified: int, n_valid: int, proposed: list[int]) -> int:
        """Apply one pass's outcome to a row; returns how many of its drafts were rejected."""
        if not 1 <= n_emit <= n_valid:
            raise RuntimeError(
                f"decoder {self.name!r} chose to emit {n_emit} proposals; it must choose 1..{n_valid}"
            )
        decided = len(r.pending) - r.drafts
        emitted = r.pending[decided : decided + n_verified] + proposed[:n_emit]
        rejected = r.drafts - n_verified
        r.position += decided + n_verified
        if self.decoder.feeds_drafts:
            r.pending, r.drafts = proposed[:n_valid], n_valid - n_emit
        else:
            r.pending, r.drafts = proposed[:n_emit], 0
        self._record(r, emitted)
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
            index = torch.tensor(keep, device=self.device)
            self.cache.batch_select_indices(index)
            self.valid = self.valid[index]


def _make_decoder(strategy: str, k: int, tau: float, do_sample: bool, temperature: float, top_p: float) -> Decoder:
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    if not isinstance(tau, (int, float)) or isinstance(tau, bool):
        raise ValueError(f"tau must be a number, got {tau!r}")
    cls = load_decoder(strategy)
    decoder = cls(k=k, tau=float(tau))
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


def _new_cache(model: Any) -> Any:
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:  # older signature
        return DynamicCache()
