"""Causal-LM loss without the full logits tensor: only supervised positions, one chunk at a time.

transformers' causal-LM heads compute fp32 logits for every position ([batch, seq, vocab]: 2.4 GB for one
4096-token sequence with Qwen2's 152k vocabulary), then the log-softmax and its gradient, each as large again.
Here the head runs only on the positions whose label is not -100 (in instruction data, the assistant turns),
in chunks of about 64 MiB of logits, and each chunk's gradient with respect to the hidden states and the head's weight is
computed right away, in the forward pass (the softmax minus the one-hot target, times the head), so no logits
are kept for backward. The arithmetic is the same as `logits = lm_head(h); cross_entropy(logits, labels)` —
the same matmuls, no recomputation — with peak memory of one chunk. It is written here because the fused
kernels that do this (Liger-Kernel, Cut Cross-Entropy) need Triton/CUDA and the project trains on CPU too;
`bench/bench_train.py` measures the effect.
"""

from __future__ import annotations

import torch
from torch import nn

#: causal-LM classes whose logits are exactly `lm_head(decoder(x))` (no soft-capping, scaling or aux losses)
PLAIN_HEADS = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM")


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, scale, chunk):
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ctx.weight_dtype, ctx.done = weight.dtype, False
        if chunk is None:  # rows per chunk: about 64 MiB of fp32 logits (at least 16 rows)
            chunk = max(16, (64 << 20) // (4 * weight.shape[0]))
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            h, t = hidden[start : start + chunk], targets[start : start + chunk]
            logits = (h @ weight.T).float()
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            if need_hidden or need_weight:
                grad = torch.exp(logits - lse[:, None])  # softmax, then minus the one-hot target
                grad[torch.arange(len(t), device=grad.device), t] -= 1.0
                grad = (grad * scale).to(h.dtype)
                if need_hidden:
                    grad_hidden[start : start + chunk] = grad @ weight
                if need_weight:
                    grad_weight += (grad.T @ h).float()
            del logits
        ctx.save_for_backward(
            grad_hidden if need_hidden else torch.empty(0), grad_weight if need_weight else torch.empty(0)
        )
        return total * scale

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.done:
            raise RuntimeError(
                "linear_cross_entropy supports one backward pass per forward (its gradients are scaled in place)"
            )
        ctx.done = True
        grad_hidden, grad_weight = ctx.saved_tensors
        # in place: the weight's gradient is as large as the head itself (0.5 GB for Qwen2's vocabulary in fp32)
        out_hidden = grad_hidden.mul_(grad_output.to(grad_hidden.dtype)) if ctx.needs_input_grad[0] else None
        out_weight = grad_weight.mul_(grad_output).to(ctx.weight_dtype) if ctx.needs_input_grad[1] else None
        return out_hidden, out_weight, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor, head: nn.Linear, labels: torch.Tensor, num_items_in_batch=None, chunk: int | None = None
) -> torch.Tensor:
    """The causal-LM loss of `head(hidden)` against `labels` shifted by one, -100 ignored.

    hidden [B, T, H]; labels [B, T]. Mean over supervised tokens, or sum / `num_items_in_batch` when given
    (as transformers' loss does under gradient accumulation). `chunk`: rows of logits computed at once (default:
    about 64 MiB of them).
    """
    targets = labels[:, 1:].to(hidden.device)
    keep = targets != -100
    rows = hidden[:, :-1][keep]  # [N, H]: only supervised positions reach the head
    targets = targets[keep]
    count = num_items_in_batch if num_items_in_batch is not None else keep.sum()
    count = float(count.item() if torch.is_tensor(count) else count)
    # nothing supervised (a rank whose batch is all prompt): zero rows still pass through the head, so it gets a zero
    # gradient and data-parallel ranks reduce the same parameters
    return _LinearCrossEntropy.apply(rows, head.weight, targets, 1.0 / max(count, 1.0), chunk)


def fused_loss_applies(language_model) -> bool:
    """True when the language model's head is a plain, unpartitioned `nn.Linear` without bias or soft-capping."""
    if type(language_model).__name__ not in PLAIN_HEADS:
        return False
    head = language_model.get_output_embeddings()
    if type(head) is not nn.Linear or head.bias is not None:  # peft/bitsandbytes-wrapped heads keep the stock path
        return False
    weight = head.weight
    if hasattr(weight, "ds_id") or weight.numel() == 0:  # DeepSpeed ZeRO-3 partitions it
        return False
    config = language_model.config
    return getattr(config, "final_logit_softcapping", None) is None and getattr(config, "logit_scale", None) in (
        None,
        1.0,
    )
