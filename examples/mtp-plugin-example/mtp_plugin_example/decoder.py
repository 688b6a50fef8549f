"""``entropy-confadapt``: ConfAdapt that falls back to one token per pass while a row is uncertain.

Per row it keeps a moving average of the entropy of its next-token distribution (per-row state,
indexed by ``Proposals.row_index``). While that average is above ``gate`` nats the row emits one
token per pass; otherwise it emits ConfAdapt's leading run of proposals with confidence >= tau.
"""

import torch

from mtp_plugins.decoding import Decoder


class EntropyGatedConfAdapt(Decoder):
    gate = 1.0  # nats
    decay = 0.5  # weight of the past in the moving average

    def start(self, batch_size, device):
        self.entropy = torch.zeros(batch_size, device=device)

    def select(self, proposals):
        rows = torch.tensor(proposals.row_index, device=proposals.tokens.device)
        log_p = torch.log_softmax(proposals.next_logits.float(), dim=-1)
        now = -(log_p.exp() * log_p).sum(dim=-1)  # [B] entropy of the next token, nats
        self.entropy[rows] = self.decay * self.entropy[rows] + (1 - self.decay) * now
        confident = proposals.confidence >= self.tau
        run = confident.long().cumprod(dim=1).sum(dim=1).clamp(min=1).minimum(proposals.valid)
        return torch.where(self.entropy[rows] > self.gate, torch.ones_like(run), run)
