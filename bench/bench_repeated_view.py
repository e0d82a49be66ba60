"""Stage-2 step speed: the LLM reading each image's base view and its repeated one-tile view (as built) against
the same batches with the repeated view's tokens cut out, in the same process.

    python bench/bench_repeated_view.py                  # 5 rounds of 20 steps each, batch 8
    python bench/bench_repeated_view.py --rounds 3 --steps 30

With one 96 px tile per side (`max_tiles_side: 1`) a square image's tile repeats its base view pixel for pixel, and
the LLM reads both: 36 base tokens, then the tile's 36 and a newline per row (42), so 78 image tokens where 36 would
carry the same pixels. This measures what cutting those 42 would save in stage 2 before anyone builds it: the
variant keeps every other token (the text, the look-twice tokens and their marker) and drops the 42 positions from
the embeddings, the attention mask and the labels (which are -100 there). The tower, expert and projector run the
same in both. Each step is the real stage-2 update of the embedded default model (its LLM and projector trained, the
rest frozen, eager as the recipe runs it, fused AdamW) on conversations written by `data_prep.instruct` for a small
synthetic set; the two variants take turns. Prints steps/s per variant, the ratio, and the sequence lengths.

Measured figures: docs/benchmarks.md.

It is a measurement of the LLM's share only: a model without the repeated view would be trained from the start
without it, and its answers would need checking (docs/default_model_history.md).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20, help="steps per variant per round")
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args(argv)

    from assistant import checkpoint
    from data_prep.instruct import build_instructions, write_instructions
    from data_prep.readers.mvtec import read_mvtec
    from data_prep.synth import SynthPlan, write_dataset
    from train.data import ConversationCollator, Conversations, read_conversations
    from train.run import train_in_full

    torch.manual_seed(0)
    model, processor, _, _ = checkpoint.load("assistant/default_model")
    config = model.config
    if (
        config.image_grid_pinpoints
        and max(max(p) for p in config.image_grid_pinpoints) > config.vision_config.image_size
    ):
        sys.exit("error: this model has more than one tile per side, so its tile does not repeat the base view")
    with tempfile.TemporaryDirectory() as tmp:
        write_dataset(Path(tmp) / "synth", SynthPlan(16, ("wood", "pill"), 128, 0, 0.6))
        entries, _ = build_instructions(read_mvtec(Path(tmp) / "synth"), Path(tmp), seed=0)
        write_instructions(entries, Path(tmp) / "instructions.json", overwrite=True)
        records, _ = read_conversations(Path(tmp) / "instructions.json")
        data = Conversations(records, processor, with_levels=model.expert is not None, workers=1)
        collate = ConversationCollator(processor.tokenizer.pad_token_id)
        n = len(data)
        batches = [collate([data[(args.batch * i + j) % n] for j in range(args.batch)]) for i in range(8)]

    side = config.llm_patches_per_side
    base_tokens, tile_tokens = side * side, side * side + side  # the tile's grid and a newline per row
    image_id = config.image_token_index

    def cut(batch):
        """The repeated view's positions removed: every row loses the same count, so the batch stays rectangular."""
        keep = torch.ones_like(batch["input_ids"], dtype=torch.bool)
        for row in range(batch["input_ids"].shape[0]):
            at = torch.nonzero(batch["input_ids"][row] == image_id).flatten()
            keep[row, at[base_tokens : base_tokens + tile_tokens]] = False
        return keep

    for batch in batches:
        batch["keep"] = cut(batch)

    train_in_full(model)  # what the recipe's stage 2 trains
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5, fused=True)
    model.train()

    def step(batch, short: bool) -> None:
        if not short:
            loss = model(
                input_ids=batch["input_ids"],
                pixel_values=batch["pixel_values"],
                image_sizes=batch["image_sizes"],
                attention_mask=batch["attention_mask"],
                labels=batch["labels"],
            ).loss
        else:
            visual = model.encode_images(batch["pixel_values"], batch["image_sizes"])
            embeds = model.merge_embeddings(batch["input_ids"], visual)
            keep, rows = batch["keep"], batch["input_ids"].shape[0]
            loss = model(
                inputs_embeds=embeds[keep].view(rows, -1, embeds.shape[-1]),
                attention_mask=batch["attention_mask"][keep].view(rows, -1),
                labels=batch["labels"][keep].view(rows, -1),
            ).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for short in (False, True):  # warm-up
        for batch in batches[:2]:
            step(batch, short)
    seconds = {False: 0.0, True: 0.0}
    for _ in range(args.rounds):
        for short in (False, True):
            start = time.perf_counter()
            for i in range(args.steps):
                step(batches[i % len(batches)], short)
            seconds[short] += time.perf_counter() - start
    total = args.rounds * args.steps
    full, short = total / seconds[False], total / seconds[True]
    length = sum(b["input_ids"].shape[1] for b in batches) / len(batches)
    print(
        f"trainable parameters: {sum(p.numel() for p in trainable):,}; mean padded sequence {length:.0f} tokens, "
        f"{tile_tokens} of them the repeated view"
    )
    print(f"as built (base view + repeated tile): {full:.2f} steps/s")
    print(f"repeated view cut out:               {short:.2f} steps/s ({short / full:.2f}x)")


if __name__ == "__main__":
    main()
