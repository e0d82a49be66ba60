"""Stage-1 step speed by the vision tower's attention heads: the embedded default model's tower as built (one head
per 16 channels: 8 x 16) against fewer, wider heads (4 x 32, 2 x 64), in the same process.

    python bench/bench_heads.py                  # compiled, 5 rounds of 40 steps each
    python bench/bench_heads.py --eager --rounds 3

The weights are the same in every variant (a head count does not change any weight's shape; the tower is the
shipped model's), so the only difference is how attention splits the 128 channels. Each variant runs the real
stage-1 objective (`train.stage1.ExpertObjective`: tower + expert, trained tower) forward, backward and a fused
AdamW step on the same batches of 8 synthetic 128 px images, and the variants take turns, so a slow patch of a
shared machine does not land on one of them. Prints steps/s per variant and the ratio to the built tower's.
`model.init.vision_heads` in a recipe picks the head count of a tower built from scratch.

Measured figures and what they decided are in docs/benchmarks.md and docs/default_model_history.md.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--heads", type=int, nargs="+", default=[8, 4, 2], help="head counts; the first is the baseline"
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=40, help="steps per variant per round")
    parser.add_argument("--eager", action="store_true", help="no torch.compile")
    args = parser.parse_args(argv)

    from assistant import checkpoint
    from data_prep.readers.mvtec import read_mvtec
    from data_prep.synth import SynthPlan, write_dataset
    from train.config import LossConfig
    from train.data import Augment, MaskedImages, collate_masked
    from train.stage1 import ExpertObjective

    torch.manual_seed(0)
    model, processor, _, _ = checkpoint.load("assistant/default_model")
    with tempfile.TemporaryDirectory() as tmp:
        write_dataset(tmp, SynthPlan(8, ("wood", "pill"), 128, 0, 0.6))
        records = [r for r in read_mvtec(tmp).records if r.label is not None]
        data = MaskedImages(records, processor, 64, cache=True, augment=Augment(flips=True, hue=0.5, saturation=0.5))
        batches = [collate_masked([data[(8 * i + j) % len(data)] for j in range(8)]) for i in range(8)]

    variants = {}
    for heads in args.heads:
        if model.vision_tower.config.hidden_size % heads:
            parser.error(
                f"--heads {heads} does not divide the tower's {model.vision_tower.config.hidden_size} channels"
            )
        copy_ = copy.deepcopy(model)
        config = copy.deepcopy(copy_.vision_tower.config)
        config.num_attention_heads = heads
        tower = type(copy_.vision_tower)(config)
        tower.load_state_dict(copy_.vision_tower.state_dict())
        copy_.vision_tower = tower
        objective = ExpertObjective(copy_, LossConfig(), 64, train_vision=True).train()
        optimizer = torch.optim.AdamW([p for p in objective.parameters() if p.requires_grad], lr=1e-5, fused=True)
        variants[heads] = (objective if args.eager else torch.compile(objective), optimizer)

    def step(batch, variant):
        objective, optimizer = variant
        objective(**batch)["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()

    for heads, variant in variants.items():
        start = time.perf_counter()
        for batch in batches[:3]:
            step(batch, variant)
        print(f"{heads} heads: first 3 steps (compile) {time.perf_counter() - start:.1f} s", flush=True)

    total = dict.fromkeys(variants, 0.0)
    for round_ in range(1, args.rounds + 1):
        for heads, variant in variants.items():
            start = time.perf_counter()
            for i in range(args.steps):
                step(batches[i % len(batches)], variant)
            total[heads] += time.perf_counter() - start
        rates = {h: args.steps * round_ / t for h, t in total.items()}
        base = rates[args.heads[0]]
        print(
            f"round {round_}: "
            + ", ".join(
                f"{h} x {model.vision_tower.config.hidden_size // h}: {r:.2f} steps/s ({r / base:.3f}x)"
                for h, r in rates.items()
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
