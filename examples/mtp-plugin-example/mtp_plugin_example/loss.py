"""``reverse-kl``: KL(student || teacher), the mode-seeking direction of the distillation divergence."""

import torch.nn.functional as F

from mtp_plugins.losses import Loss


class ReverseKL(Loss):
    """Penalises student mass where the teacher has little; ignores teacher modes the student drops."""

    needs_teacher = True

    def per_position(self, student, teacher, targets):
        log_q = F.log_softmax(student, dim=-1)  # student
        log_p = F.log_softmax(teacher, dim=-1)  # frozen teacher
        return (log_q.exp() * (log_q - log_p)).sum(dim=-1)
