"""The training loss on a real-size vocabulary: `assistant.loss` (chunked, supervised positions only) vs. stock.

    python bench/bench_loss.py [--hidden 896] [--vocab 151936] [--seq 2048] [--supervised 0.25] [--repeats 3]

Defaults are Qwen2-0.5B's head (hidden 896, vocabulary 151,936) on one 2048-token sequence of which a quarter is
supervised (assistant turns; the rest is image tokens and the prompt, labels -100). Stock: transformers' way,
`lm_head` on every position then `cross_entropy` (fp32 logits [seq, vocab]). Ours: `linear_cross_entropy`.
Each runs forward + backward with the head trained (full fine-tuning) and frozen (LoRA); printed per case: the
peak bytes of tensors alive at once (the profiler's memory timeline, as `torch.cuda.max_memory_allocated` counts
on a GPU), the best wall time of `--repeats`, and the ratios ours / stock. Loss and gradients agree (checked here).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=896)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--supervised", type=float, default=0.25)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import torch
    import torch.nn.functional as F
    from torch.profiler import ProfilerActivity, profile

    from assistant.loss import linear_cross_entropy
    from bench.bench_train import peak_allocated

    torch.manual_seed(0)
    hidden = (torch.randn(1, args.seq, args.hidden) * 0.5).requires_grad_(True)
    head = torch.nn.Linear(args.hidden, args.vocab, bias=False)
    labels = torch.randint(0, args.vocab, (1, args.seq))
    labels[:, : int(args.seq * (1 - args.supervised))] = -100

    def stock():
        logits = head(hidden).float()
        return F.cross_entropy(logits[:, :-1].reshape(-1, args.vocab), labels[:, 1:].reshape(-1), ignore_index=-100)

    def ours():
        return linear_cross_entropy(hidden, head, labels)

    for train_head in (True, False):
        head.weight.requires_grad_(train_head)
        measured, grads = {}, {}
        for name, fn in (("stock", stock), ("ours", ours)):
            times = []
            for _ in range(args.repeats):
                hidden.grad, head.weight.grad = None, None
                start = time.perf_counter()
                loss = fn()
                loss.backward()
                times.append(time.perf_counter() - start)
            grads[name] = (loss.detach(), hidden.grad.clone())
            hidden.grad, head.weight.grad = None, None
            with profile(
                activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True
            ) as prof:
                fn().backward()
            # what the loss adds on top of the inputs and the head (which exist before it runs in both cases)
            measured[name] = (peak_allocated(prof) / 2**20, min(times))
        torch.testing.assert_close(grads["ours"][0], grads["stock"][0], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(grads["ours"][1], grads["stock"][1], rtol=1e-3, atol=1e-6)
        case = "head trained (full)" if train_head else "head frozen (LoRA)"
        (ms, ts), (mo, to) = measured["stock"], measured["ours"]
        print(
            f"{case:20s} stock {ms:8.0f} MiB {ts:6.2f} s   ours {mo:8.0f} MiB {to:6.2f} s   "
            f"memory ours/stock {mo / ms:.3f}   time ours/stock {to / ts:.3f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
