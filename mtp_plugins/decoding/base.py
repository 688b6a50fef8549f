"""The decoder protocol (API version 1): what a decoding strategy sees each pass and what it answers.

The engine runs one loop for every strategy. Each pass it computes, for every active row, up to k
*proposals*: proposal 0 is the ordinary next token (exact, from the last accepted real token) and
proposal j >= 1 comes from mask slot j (the token j positions further on). A strategy only answers
how many leading proposals each row emits this pass (at least 1). A strategy with
``feeds_drafts = True`` has the proposals it does not emit fed back next pass as *drafts*: the engine
checks them against the model's own next-token predictions and emits the verified prefix, so the
output is exactly greedy decoding (see ``Verify``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from collections.abc import Mapping
from typing import Any, ClassVar

import torch

DECODER_API_VERSION = 1


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """The index of the largest logit along the last dimension (the first one on ties, as
    ``argmax``): ``max(dim=-1).indices``, which on a CPU runs several times faster than ``argmax``
    over a vocabulary (bfloat16 and float32 alike)."""
    return logits.max(dim=-1).indices


@dataclass
class Proposals:
    """One pass's proposals for the B active rows."""

    tokens: torch.Tensor  # [B, P] long; P = decoder.num_proposals (fewer where the width policy feeds fewer slots)
    valid: torch.Tensor  # [B] long in [1, P]; fewer than P after a rejected draft (masks saw a wrong prefix)
    next_logits: torch.Tensor = field(repr=False)  # [B, V] logits behind proposal 0
    mask_logits: torch.Tensor = field(repr=False)  # [B, P-1, V] logits behind proposals 1..P-1
    #: Row i of this pass is row ``row_index[i]`` of the ``generate`` batch. Finished rows leave the
    #: pass, so B shrinks; a decoder with per-row state indexes it with these numbers.
    row_index: list[int] = field(default_factory=list)
    _confidence: torch.Tensor | None = field(default=None, repr=False)
    _mask_confidence: torch.Tensor | None = field(default=None, repr=False)
    _mask_top: torch.Tensor | None = field(default=None, repr=False)  # [B, P-1]: each slot's largest logit
    #: [B, P, V]: ``next_logits`` then ``mask_logits`` as one tensor, where the engine has them so
    #: (then the confidences come from one reduction over it, to the same values)
    _logits: torch.Tensor | None = field(default=None, repr=False)

    @property
    def confidence(self) -> torch.Tensor:
        """[B, P] float: the softmax probability of each proposed token (top-1 for greedy slots).

        Computed on first use, so strategies that ignore confidences do not pay for it.
        """
        if self._confidence is None and self._logits is not None:
            every = self._logits.float()
            picked = every.gather(-1, self.tokens[..., None]).squeeze(-1)  # [B, P]
            self._confidence = torch.exp(picked - torch.logsumexp(every, dim=-1))
        if self._confidence is None:
            logits = self.next_logits.float()
            first = torch.exp(logits.gather(1, self.tokens[:, :1]) - torch.logsumexp(logits, dim=-1, keepdim=True))
            self._confidence = torch.cat([first, self.mask_confidence], dim=1)
        return self._confidence

    @property
    def mask_confidence(self) -> torch.Tensor:
        """[B, P-1] float: the top-1 softmax probability of each mask slot (``confidence[:, 1:]``)."""
        if self._mask_confidence is None and self._logits is not None:
            self._mask_confidence = self.confidence[:, 1:]
        if self._mask_confidence is None:
            logits = self.mask_logits.float()
            top = logits.amax(dim=-1) if self._mask_top is None else self._mask_top.float()
            self._mask_confidence = torch.exp(top - torch.logsumexp(logits, dim=-1))
        return self._mask_confidence


class Decoder:
    """Base class of decoding strategies. Subclass it and override ``select``.

    Register a subclass under the stevedore namespace ``mtp_plugins.decoders``; the engine builds it
    per ``generate`` call as ``cls(k=k, tau=tau)``, calls ``start`` once, then ``select`` every pass.
    The protocol is documented in ``docs/plugins.md``; ``api_version`` must equal
    ``DECODER_API_VERSION``.
    """

    api_version: ClassVar[int] = DECODER_API_VERSION
    #: Proposals not emitted are fed back next pass as drafts and verified against the model's own
    #: predictions (only verified drafts are ever emitted).
    feeds_drafts: ClassVar[bool] = False
    #: Whether proposal 0 may be sampled (``do_sample=True``).
    supports_sampling: ClassVar[bool] = True
    #: The decoder's output does not depend on how many mask slots a pass feeds, only its speed does
    #: (``verify``: only drafts the model confirms are emitted). With ``mask_slots="auto"`` the engine
    #: may then feed fewer than ``num_proposals - 1`` mask slots in a pass (where the acceptance seen
    #: so far and the cost model say they do not pay); ``select`` then sees fewer proposals
    #: (``tokens.shape[1]``). Off by default: every other decoder gets all slots unless the user asks
    #: for ``mask_slots="adaptive"``/``"timed"``/N.
    adaptive_width: ClassVar[bool] = False
    #: For ``feeds_drafts`` strategies: the longest n-gram matched in the row's own text to draft
    #: where mask proposals are unsure (0: drafts are the mask proposals only).
    draft_lookup: ClassVar[int] = 0
    #: Whether ``tau`` changes what this decoder emits (summaries and reports show tau only then).
    uses_tau: ClassVar[bool] = False
    #: The decoder's output equals greedy ``ar`` decoding of the same checkpoint, by construction (in
    #: exact arithmetic: in bf16 a wider pass may round differently). ``mtp-sweep``'s report and plot
    #: mark such points "lossless by contract"; claim it only for a decoder that emits nothing but
    #: tokens the model's own next-token prediction confirms.
    lossless: ClassVar[bool] = False
    #: The decoder's own options beyond k and tau: name -> default. A user passes them as
    #: ``generate(..., decoder_options={NAME: VALUE})`` or lm-eval ``--model_args NAME=VALUE``; the
    #: base ``__init__`` refuses names not listed here and stores each option as an attribute.
    options: ClassVar[Mapping[str, Any]] = {}

    def __init__(self, *, k: int, tau: float, **options: Any) -> None:
        self.k = k
        self.tau = tau
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            allowed = ", ".join(sorted(self.options)) or "none"
            raise ValueError(f"decoder {type(self).__name__} has no option(s) {', '.join(unknown)}; its options: {allowed}")
        for name, default in self.options.items():
            setattr(self, name, options.get(name, default))

    def start(self, batch_size: int, device: torch.device) -> None:
        """Called once per ``generate`` call before the first pass; set up per-row state here
        (indexed by ``Proposals.row_index``). The default keeps none."""

    @property
    def num_proposals(self) -> int:
        """Proposals needed per pass; the engine feeds ``num_proposals - 1`` mask slots."""
        return self.k

    def select(self, proposals: Proposals) -> torch.Tensor:
        """[B] long: how many leading proposals each row emits, in ``[1, proposals.valid]``."""
        raise NotImplementedError
