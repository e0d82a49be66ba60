"""Training throughput and peak memory: this project's stage-2 path (LoRA and full) vs. stock HF Trainer.

    python bench/bench_train.py [--steps 8] [--seq 256] [--batch 4] [--repeats 3]

A ~44M-parameter Llama LLM (hidden 512, 8 layers, vocab 16k, untied head) (random weights; speed does not depend on their values). Each configuration
runs in its own subprocess on the same token batches (seeded random ids, fixed length):

* baseline  — `LlamaForCausalLM` alone, stock `transformers.Trainer`, full fine-tuning;
* full      — `AnomalyAssistantModel` (tiny vision tower + the same LLM) through `train.trainer.ReliableTrainer`
              (NaN guard, atomic checkpoints), text-only batches, LLM + projector trained;
* lora      — the same with peft LoRA r=16 on the LLM's attention (scoped regex) + projector in modules_to_save.

tokens/s counts every input token of the timed steps (after 2 warm-up steps).

Memory, two measures, both printed:
* peak allocated tensor bytes — every allocation and free is recorded by the PyTorch profiler (memory
  timeline) from before the model is built through 4 training steps; the peak of bytes alive at once is what
  `torch.cuda.max_memory_allocated` reports on a GPU, and what the target (LoRA ≤ 0.6× full) is read on;
* the subprocess's peak RSS (`ru_maxrss`) minus the RSS just before the model is built: also counts what the C
  allocator keeps after tensors are freed and the first step's one-off buffers.
Each is measured as is and with gradient checkpointing on in both LoRA and full fine-tuning (`trainer.
gradient_checkpointing`, the usual LoRA/QLoRA setting). The summary prints the ratios.

Throughput: the three configurations run `--repeats` times in interleaved order (baseline, full, lora,
baseline, …) and each keeps its best run, so a slow patch of a shared machine does not land on one side.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def llm_config(vocab: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )


def batches(vocab: int, n: int, batch: int, seq: int):
    import torch

    g = torch.Generator().manual_seed(0)
    return [torch.randint(10, vocab, (batch, seq), generator=g) for _ in range(n)]


class TokenData:
    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return {"input_ids": self.rows[i], "labels": self.rows[i].clone()}


def collate(items):
    import torch

    ids = torch.stack([i["input_ids"] for i in items])
    return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}


def worker(kind: str, steps: int, batch: int, seq: int, stock_loss: bool = False) -> dict:
    profiled = kind.endswith("+mem")
    kind = kind.removesuffix("+mem")
    checkpointing = kind.endswith("+gc")
    kind = kind.removesuffix("+gc")
    import resource

    import peft  # noqa: F401  imported by every worker so the runtime baseline is the same
    import torch
    from transformers import LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

    import train.trainer

    torch.manual_seed(0)
    vocab = 16000
    rows = torch.cat(batches(vocab, steps + 2, batch, seq))
    data = TokenData(list(rows))
    args = TrainingArguments(
        output_dir=f"/tmp/bench_train_{kind}",
        max_steps=steps + 2,
        per_device_train_batch_size=batch,
        learning_rate=1e-4,
        save_strategy="no",
        logging_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_drop_last=True,
        seed=0,
    )

    class Clock(TrainerCallback):
        def __init__(self):
            self.times = []

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter())

    clock = Clock()
    if (
        profiled
    ):  # allocated-bytes peak, as torch.cuda.max_memory_allocated would give: the profiler sees every allocation
        from torch.profiler import ProfilerActivity, profile

        steps = 2
        args.max_steps = steps + 2
        profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True)
        profiler.__enter__()
    # resident memory before any model exists: torch, transformers, peft and the data are loaded
    rss_before_mib = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    if kind == "baseline":
        model = LlamaForCausalLM(llm_config(vocab))
        trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=collate, callbacks=[clock])
    else:
        from transformers import CLIPVisionConfig

        from assistant.config import AnomalyAssistantConfig
        from assistant.modeling import AnomalyAssistantModel
        from train.config import TrainConfig
        from train.trainer import ReliableTrainer

        config = AnomalyAssistantConfig(
            vision_config=CLIPVisionConfig(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=2,
                image_size=32,
                patch_size=8,
            ),
            text_config=llm_config(vocab),
            image_token_index=3,
            vision_feature_select_strategy="default",
        )
        model = AnomalyAssistantModel(config)
        model.chunked_loss = not stock_loss
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith(("language_model", "multi_modal_projector")))
        if kind == "lora":
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(
                model,
                LoraConfig(
                    r=16,
                    lora_alpha=32,
                    target_modules=r"language_model\..*\.(q_proj|k_proj|v_proj|o_proj)",
                    modules_to_save=["multi_modal_projector"],
                ),
            )
        if checkpointing:
            base = model.get_base_model() if kind == "lora" else model
            train.trainer.enable_checkpointing(base.language_model)
        trainer = ReliableTrainer(
            model=model,
            args=args,
            train_dataset=data,
            data_collator=collate,
            callbacks=[clock],
            run_config=TrainConfig(),
            commit=None,
        )
    trainer.train()
    if profiled:
        profiler.__exit__(None, None, None)
        allocated_peak_mib = peak_allocated(profiler) / 2**20
    timed = clock.times[2:]
    seconds = timed[-1] - clock.times[1]
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in trainer.model.parameters())
    peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if profiled:
        return {"kind": kind + ("+gc" if checkpointing else "") + "+mem", "allocated_peak_mib": allocated_peak_mib}
    return {
        "kind": kind + ("+gc" if checkpointing else ""),
        "tokens_per_s": steps * batch * seq / seconds,
        "peak_rss_mib": peak_rss_mib,
        # what building and training the model added on top of the runtime: the memory a method decides
        "training_mib": peak_rss_mib - rss_before_mib,
        "params": total,
        "trainable": trainable,
        # weights + gradients + AdamW's two moments, fp32: the part of memory the training method decides
        "state_mib": (total * 4 + trainable * 12) / 2**20,
    }


def peak_allocated(profiler) -> int:
    """The most bytes of tensors alive at once during the profile (the profiler's memory timeline)."""
    from torch.profiler._memory_profiler import Action

    live = peak = 0
    for _, action, _, size in profiler._memory_profile().timeline:
        if action in (Action.PREEXISTING, Action.CREATE):
            live += size
        elif action == Action.DESTROY:
            live -= size
        peak = max(peak, live)
    return peak


def run_worker(kind: str, args) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(
        [
            sys.executable,
            __file__,
            "--worker",
            kind,
            "--steps",
            str(args.steps),
            "--batch",
            str(args.batch),
            "--seq",
            str(args.seq),
        ]
        + (["--stock-loss"] if args.stock_loss else []),
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    line = [l for l in done.stdout.splitlines() if l.startswith("RESULT ")]
    if done.returncode != 0 or not line:
        sys.exit(f"{kind} failed:\n{done.stderr[-3000:]}")
    return json.loads(line[0][7:])


def show(r: dict) -> None:
    if "allocated_peak_mib" in r:
        print(
            f"{r['kind']:10s} peak allocated tensors {r['allocated_peak_mib']:7.0f} MiB (profiler memory timeline)",
            flush=True,
        )
        return
    print(
        f"{r['kind']:10s} params {r['params'] / 1e6:6.1f}M  trainable {r['trainable'] / 1e6:6.2f}M  "
        f"{r['tokens_per_s']:8.0f} tokens/s  peak RSS {r['peak_rss_mib']:7.0f} MiB (training {r['training_mib']:6.0f} MiB)  "
        f"param+grad+optim {r['state_mib']:6.0f} MiB",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs per configuration; the best is kept")
    parser.add_argument(
        "--stock-loss", action="store_true", help="this project's model with transformers' loss (no assistant.loss)"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, args.steps, args.batch, args.seq, args.stock_loss)))
        return
    results: dict[str, dict] = {}
    for _ in range(max(1, args.repeats)):
        for kind in ("baseline", "full", "lora"):
            r = run_worker(kind, args)
            show(r)
            if kind not in results or r["tokens_per_s"] > results[kind]["tokens_per_s"]:
                results[kind] = r
    for kind in ("full+gc", "lora+gc", "full+mem", "lora+mem", "full+gc+mem", "lora+gc+mem"):
        results[kind] = run_worker(kind, args)
        show(results[kind])
    base = results["baseline"]
    print(
        f"full / baseline throughput: {results['full']['tokens_per_s'] / base['tokens_per_s']:.3f}  (target >= 0.95; best of {args.repeats})"
    )
    print(f"lora / baseline throughput: {results['lora']['tokens_per_s'] / base['tokens_per_s']:.3f}")
    allocated = lambda kind: results[kind]["allocated_peak_mib"]  # noqa: E731
    print(
        f"lora / full peak allocated tensor bytes: {allocated('lora+mem') / allocated('full+mem'):.3f}  (target <= 0.6); "
        f"with gradient checkpointing in both: {allocated('lora+gc+mem') / allocated('full+gc+mem'):.3f}"
    )
    print(
        f"lora / full peak RSS above the runtime: {results['lora']['training_mib'] / results['full']['training_mib']:.3f}; "
        f"with gradient checkpointing in both: {results['lora+gc']['training_mib'] / results['full+gc']['training_mib']:.3f}"
    )
    print(
        f"lora / full whole-process peak RSS: {results['lora']['peak_rss_mib'] / results['full']['peak_rss_mib']:.3f}"
    )
    print(f"lora / full param+grad+optimizer bytes: {results['lora']['state_mib'] / results['full']['state_mib']:.3f}")


if __name__ == "__main__":
    main()
