"""The functions a vocab-parallel embedding and head call (``passes.lower.graph.vocab_parallel`` inserts them):
a lookup in this rank's rows of the vocabulary, the cross-entropy over logits split along the vocabulary, and
under vsp the cross-entropy over rows split along the sequence."""

from __future__ import annotations

import torch
import torch.distributed._functional_collectives as funcol

from galvatron_fx.passes.lower.ops.collectives import _is_fake, all_reduce_sum, completed, tp_reduce
from galvatron_fx.passes.lower.ops.redistribute import scale_grad


def masked_embedding(weight: torch.Tensor, ids: torch.Tensor, start: int, padding_idx: int = -1) -> torch.Tensor:
    """Rows of this rank's vocabulary shard (``start`` onwards); ids outside it give zeros."""
    rows = weight.shape[0]
    local = ids - start
    inside = (local >= 0) & (local < rows)
    local_padding = padding_idx - start if 0 <= padding_idx - start < rows else -1
    out = torch.ops.aten.embedding(weight, local.clamp(0, rows - 1), local_padding)
    return out * inside.unsqueeze(-1).to(out.dtype)


def _all_reduce_max(x: torch.Tensor, ranks) -> torch.Tensor:
    if len(ranks) == 1 or _is_fake(x):
        return x.clone()
    return completed(funcol.all_reduce(x.contiguous(), "max", list(ranks)))


class _VocabCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, start, vocab, ranks, ignore_index):
        logits = logits.float()
        columns = start + torch.arange(logits.shape[-1], device=logits.device)
        logits = logits.masked_fill(columns >= vocab, float("-inf"))  # padding rows of the vocabulary
        shifted = logits - _all_reduce_max(logits.amax(-1), ranks).unsqueeze(-1)
        exp = shifted.exp()
        sum_exp = all_reduce_sum(exp.sum(-1), ranks)
        local = target - start
        mine = (local >= 0) & (local < logits.shape[-1]) & (target != ignore_index)
        picked = shifted.gather(-1, local.clamp(0, logits.shape[-1] - 1).unsqueeze(-1)).squeeze(-1) * mine
        target_logit = all_reduce_sum(picked, ranks)
        valid = (target != ignore_index).to(logits.dtype)
        count = valid.sum().clamp(min=1)
        ctx.save_for_backward(exp / sum_exp.unsqueeze(-1), local, mine, valid)
        ctx.count = count
        return ((sum_exp.log() - target_logit) * valid).sum() / count

    @staticmethod
    def backward(ctx, grad):
        softmax, local, mine, valid = ctx.saved_tensors
        grad_logits = softmax.clone()
        rows = torch.arange(grad_logits.shape[0], device=grad_logits.device)[mine]
        grad_logits[rows, local[mine]] -= 1
        return grad_logits * (valid / ctx.count * grad).unsqueeze(-1), None, None, None, None, None


def vocab_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, start: int, vocab: int, ranks, ignore_index: int = -100
):
    """Mean cross-entropy of ``[rows, shard]`` logits whose columns are vocabulary entries ``start...``
    (entries at or past ``vocab`` are padding) against whole-vocabulary targets, over the group ``ranks``."""
    return _VocabCrossEntropy.apply(logits, target, start, vocab, ranks, ignore_index)


def sequence_cross_entropy(logits: torch.Tensor, target: torch.Tensor, ranks, ignore_index: int = -100):
    """Under vsp: the mean cross-entropy of the group's rows, of which this rank holds ``[rows, vocab]`` logits
    and their targets (its slice of the sequence). Each rank sums its rows' losses and divides by the group's
    count of targets (all-reduced: slices hold different numbers of ignored targets); the value, all-reduced,
    is the group's mean on every rank. Its gradient is scaled by the group size, as the vocab-parallel loss's
    is: each row's gradient is the one the rank holding its sample alone would have produced."""
    count = all_reduce_sum((target != ignore_index).sum().to(torch.float32), ranks).clamp(min=1)
    local = torch.ops.aten.cross_entropy_loss(logits, target, None, 2, ignore_index) / count  # 2: sum
    return scale_grad(tp_reduce(local, ranks), float(len(ranks)))
