"""The built-in decoding strategies. Each is an entry point of this distribution under
``mtp_plugins.decoders``, registered exactly like a third party's."""

from __future__ import annotations

import torch

from mtp_plugins.decoding.base import Decoder, Proposals


class AutoRegressive(Decoder):
    """``ar``: one token per pass; no mask slots are fed, so it is ordinary greedy (or sampled) decoding."""

    lossless = True

    @property
    def num_proposals(self) -> int:
        return 1

    def select(self, proposals: Proposals) -> torch.Tensor:
        return torch.ones_like(proposals.valid)


class Static(Decoder):
    """``static``: emit all k proposals every pass."""

    def select(self, proposals: Proposals) -> torch.Tensor:
        return proposals.valid


class ConfAdapt(Decoder):
    """``confadapt``: emit the longest leading run of proposals whose confidence is >= tau (at least 1)."""

    uses_tau = True

    def select(self, proposals: Proposals) -> torch.Tensor:
        confident = proposals.confidence >= self.tau  # [B, P]
        run = confident.long().cumprod(dim=1).sum(dim=1)  # [B] leading run length
        return run.clamp(min=1).minimum(proposals.valid)


class Verify(Decoder):
    """``verify``: lossless self-speculative decoding.

    Emits only the exact next token and feeds the mask proposals back as drafts; the engine keeps the
    drafts the model itself would have produced. The output equals greedy ``ar`` decoding of the same
    checkpoint; the speed comes from drafts that verify. With ``recovery`` (default 1) each pass also
    feeds mask slots after its decided token, so a rejected first draft still leaves drafts.
    """

    lossless = True
    feeds_drafts = True
    supports_sampling = False
    adaptive_width = True
    draft_lookup = 3
    #: ``recovery``: groups of mask slots a pass also feeds after its last decided token (and the
    #: drafts after it, one group each), so that a rejected draft still leaves the next pass drafts
    #: to verify (0: off; the dynamic cache only).
    options = {"recovery": 1}

    def select(self, proposals: Proposals) -> torch.Tensor:
        return torch.ones_like(proposals.valid)
