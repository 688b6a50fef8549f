"""``entropy-confadapt``: ConfAdapt that falls back to one token per pass while a row is uncertain.

Per row it keeps a moving average of the entropy of its next-token distribution (per-row state,
indexed by ``Proposals.row_index``). While that average is above ``gate`` nats the row emits one
token per pass; otherwise it emits ConfAdapt's leading run of proposals with confidence >= tau.

``gate`` and ``decay`` are the decoder's own options (``Decoder.options``): a user sets them as
``generate(..., decoder_options={"gate": 0.5})`` or ``lm_eval --model_args ...,gate=0.5,decay=0.9``.
"""

import torch

from mtp_plugins.decoding import Decoder


class EntropyGatedConfAdapt(Decoder):
    uses_tau = True
    options = {
        "gate": 1.0,  # nats
        "decay": 0.5,  # weight of the past in the moving average
    }

    def __init__(self, *, k, tau, **options):
        super().__init__(k=k, tau=tau, **options)  # refuses names not in ``options``; sets the attributes
        if isinstance(self.gate, bool) or not isinstance(self.gate, (int, float)) or self.gate < 0:
            raise ValueError(f"gate must be a number of nats >= 0, got {self.gate!r}")
        if isinstance(self.decay, bool) or not isinstance(self.decay, (int, float)) or not 0 <= self.decay < 1:
            raise ValueError(f"decay must be a number in [0, 1), got {self.decay!r}")

    def start(self, batch_size, device):
        self.entropy = torch.zeros(batch_size, device=device)

    def select(self, proposals):
        rows = torch.tensor(proposals.row_index, device=proposals.tokens.device)
        probs = torch.softmax(proposals.next_logits.float(), dim=-1)
        # entr(p) = -p ln p, and 0 where p = 0 (tokens the engine rules out, such as mask ids, have
        # logit -inf: p ln p would be 0 * -inf = nan there, and nan never passes the gate)
        now = torch.special.entr(probs).sum(dim=-1)  # [B] entropy of the next token, nats
        self.entropy[rows] = self.decay * self.entropy[rows] + (1 - self.decay) * now
        confident = proposals.confidence >= self.tau
        run = confident.long().cumprod(dim=1).sum(dim=1).clamp(min=1).minimum(proposals.valid)
        return torch.where(self.entropy[rows] > self.gate, torch.ones_like(run), run)
