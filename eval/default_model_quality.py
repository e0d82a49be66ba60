"""Quality of the embedded default model on a held-out synthetic set.

    python -m eval.default_model_quality                          # the shipped model, n=100 per family, seed 1
    python -m eval.default_model_quality --model runs/default_model/stage2/model --n 100 --seed 1 --out runs/quality.json

The set is drawn fresh from the synthetic generator (`data_prep.synth`) with a seed the training run never
used (training uses seed 0), half normal and half anomalous (every defect type in turn), for every family;
families absent from the checkpoint's `training_config.yaml` (`data.synth.families`) are the *unseen*
families. Rows: seen and unseen procedural families, seen and unseen real photographed surfaces
(`data_prep.synth.photos`: defects pasted onto new crops of the photos, all at one scale, `PHOTO_SCALE`), far real
surfaces (`FAR_SURFACES`: photos as far from the training surfaces as landscapes are), and all. Per row:

- image AUROC on the expert's `pred_score`, pixel AUROC on the `anomaly_map` (`eval.metrics`);
- verdict accuracy: `pred_label` equals the ground truth; false alarms: the share of normal images judged anomalous;
- location accuracy on anomalous images: the report's `location` equals `location_words(gt_mask)`
  (the exact 3×3-cell words; an image judged normal has no location and counts as wrong);
- with `--shots K`, every image is scored with K normal images of its family as references (the few-shot
  mode: `AnomalyAssistant.detect(image, references=...)`), drawn with another seed (`--seed` + 1000) than the
  test images; with `--zero-shot batch`, each family's images are scored against each other (the folder mode);
- on a sample (`--text-n` per row), the answer text to the default question, classified as claiming a
  defect or not (`answer_claim`): how often it agrees with the verdict, and how often an anomalous
  verdict's answer names the report's location.

The row's "family mean" is each family's own image AUROC averaged over the row's families (the MVTec AD
convention: families whose normal images score at different levels do not mix in one ranking); a second table
gives every family's own figures, and a third counts, per truth (normal or the defect type) and for seen and unseen
families apart, the verdicts and location words that are right: which kinds of defect the model misses.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from assistant import jsonutil

_NORMAL = re.compile(
    r"^(no\b|normal\b)|appears normal|\bis a normal\b|\bit is normal\b|no anomaly|free of defects|passes the inspection|"
    r"everything looks as expected|nothing is wrong"
)
_DEFECT = re.compile(
    r"^yes\b|^anomalous\b|\bit is anomalous\b|not normal|defect found|does not pass|\bi found\b|there is an anomaly|is defective|"
    r"\bis visible\b|\bhas (a|an)\b"
)


def answer_claim(answer: str) -> str:
    """ "anomalous", "normal" or "unclear": what the answer text claims about the image."""
    text = answer.strip().lower()
    defect, normal = bool(_DEFECT.search(text)), bool(_NORMAL.search(text))
    if defect != normal:
        return "anomalous" if defect else "normal"
    return "unclear"


#: the real-surface rows crop their photos at one scale (this share of the photo's side), as one camera at one distance
#: frames one product line; training drew the scale at random
PHOTO_SCALE = 0.5


def sample_of(family: str, index: int, seed: int, size: int, defect: str | None):
    """One generated sample; a photographed surface is cropped at `PHOTO_SCALE`."""
    from data_prep.synth import make_sample
    from data_prep.synth.generate import sample_rng
    from data_prep.synth.photos import PHOTOS, make_photo_crop

    normal = None
    if family in PHOTOS:
        crop = make_photo_crop(family, size, sample_rng(seed, family, index, stream=2), scale=PHOTO_SCALE)[0]
        normal = np.clip(np.rint(crop), 0, 255).astype(np.uint8)
    return make_sample(family, index, seed, size, defect, normal=normal)


def held_out_samples(families: list[str], n: int, seed: int, size: int, defects: tuple[str, ...] | None = None):
    """(family, PIL image, gt mask bool [H, W], label, defect type or None) for `n` images per family: even index
    normal, odd anomalous (the `defects` in turn; default: the standard `DEFECT_TYPES`)."""
    from data_prep.synth import DEFECT_TYPES

    defects = tuple(defects or DEFECT_TYPES)
    for family in families:
        for index in range(n):
            defect = defects[(index // 2) % len(defects)] if index % 2 else None
            sample = sample_of(family, index, seed, size, defect)
            mask = sample.mask.astype(bool) if sample.mask is not None else np.zeros((size, size), dtype=bool)
            yield family, Image.fromarray(sample.image), mask, int(sample.mask is not None), defect


def training_families(model_path: Path) -> list[str] | None:
    """The synthetic families the checkpoint was trained on, from its `training_config.yaml` (None if unknown)."""
    from assistant.run_config import config_section, read_run_config

    return list(config_section(read_run_config(model_path), "data", "synth").get("families") or []) or None


def _rate(values: list[bool]) -> float:
    return float(np.mean(values)) if values else float("nan")


def best_threshold_accuracy(labels: np.ndarray, scores: np.ndarray) -> float:
    """The verdict accuracy of the best single threshold on these scores (`score >= t` anomalous), chosen on the
    set itself: an upper bound that no calibration on other data can beat, so it tells a calibration miss from
    a ranking miss."""
    labels = labels.astype(bool)
    candidates = np.r_[np.unique(scores), np.inf]
    return float(max(((scores[:, None] >= candidates[None, :]) == labels[:, None]).mean(0)))


def row_metrics(items: list[dict]) -> dict:
    from eval.metrics import image_auroc, pixel_auroc, verdict_rates

    labels = np.array([it["label"] for it in items])
    verdicts = verdict_rates(labels, [it["pred_label"] for it in items])
    scores = np.array([it["score"] for it in items])
    anomalous = [it for it in items if it["label"]]
    texts = [it for it in items if "claim" in it]
    located = [it for it in texts if it["pred_label"] and it["location"]]
    return {
        "n": len(items),
        "n_anomalous": int(labels.sum()),
        "image_AUROC": image_auroc(labels, scores),
        "pixel_AUROC": pixel_auroc(np.stack([it["mask"] for it in items]), np.stack([it["map"] for it in items])),
        "verdict_accuracy": verdicts["verdict_accuracy"],
        "false_alarms": verdicts["false_alarms"],
        "verdict_accuracy_best_threshold": best_threshold_accuracy(labels, scores) if len(items) else float("nan"),
        "location_accuracy": _rate([it["location"] == it["gt_location"] for it in anomalous]),
        "location_accuracy_detected": _rate(
            [it["location"] == it["gt_location"] for it in anomalous if it["pred_label"]]
        ),
        "text_n": len(texts),
        "text_agrees_with_verdict": _rate(
            [it["claim"] == ("anomalous" if it["pred_label"] else "normal") for it in texts]
        ),
        "text_names_location": _rate([it["location"] in it["answer"].lower() for it in located]),
    }


def _fmt(value) -> str:
    return (
        "–"
        if value is None or (isinstance(value, float) and np.isnan(value))
        else f"{value:.3f}"
        if isinstance(value, float)
        else str(value)
    )


#: the rows' columns (`markdown_table`): (metric key, title)
ROW_COLUMNS = [
    ("n", "images"),
    ("image_AUROC", "image AUROC"),
    ("image_AUROC_family_mean", "image AUROC, family mean"),
    ("pixel_AUROC", "pixel AUROC"),
    ("verdict_accuracy", "verdict acc."),
    ("false_alarms", "false alarms"),
    ("location_accuracy", "location acc."),
    ("text_agrees_with_verdict", "text = verdict"),
    ("text_names_location", "text names location"),
    ("text_n", "texts"),
]
#: the per-family table's columns: the ranking and the verdicts, without the family mean or the sampled answers
FAMILY_COLUMNS = [c for c in ROW_COLUMNS[:6] if c[0] != "image_AUROC_family_mean"]


def markdown_table(rows: dict[str, dict], columns: list[tuple[str, str]] | None = None, first: str = "set") -> str:
    columns = columns or ROW_COLUMNS
    lines = [f"| {first} | " + " | ".join(title for _, title in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, metrics in rows.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(metrics[key]) for key, _ in columns) + " |")
    return "\n".join(lines)


def reference_images(family: str, shots: int, seed: int, size: int) -> list[Image.Image]:
    """`shots` normal images of `family` for the few-shot mode, drawn with `seed` + 1000 (never a test image)."""
    return [Image.fromarray(sample_of(family, 2 * i, seed + 1000, size, None).image) for i in range(shots)]


def row_name(family: str, unseen: list[str]) -> str:
    """The table row a family belongs to: seen or unseen, procedural or real photographed surface; the far real
    surfaces (`FAR_SURFACES`, never trained on) have their own row."""
    from data_prep.synth.photos import FAR_SURFACES, PHOTOS

    if family in FAR_SURFACES and family in unseen:
        return "far real surfaces"
    return f"{'unseen' if family in unseen else 'seen'} {'real surfaces' if family in PHOTOS else 'synthetic families'}"


def evaluate(
    assistant,
    families: list[str],
    unseen: list[str],
    n: int,
    seed: int,
    size: int,
    text_n: int,
    shots: int = 0,
    zero_shot: str = "single",
    defects: tuple[str, ...] | None = None,
) -> dict:
    from assistant.localize import location_words

    items: list[dict] = []
    text_budget: dict[tuple[str, int], int] = {}
    references = {family: reference_images(family, shots, seed, size) for family in families} if shots else {}
    samples = list(held_out_samples(families, n, seed, size, defects))
    folder_reports = {}
    if zero_shot == "batch" and not shots:  # each family's images scored against each other
        for family in families:
            indices = [i for i, sample in enumerate(samples) if sample[0] == family]
            reports = assistant.detect_batch([samples[i][1] for i in indices], zero_shot="batch")
            folder_reports.update(zip(indices, reports))
    for index, (family, image, mask, label, defect) in enumerate(samples):
        refs = references.get(family)
        report = folder_reports[index] if folder_reports else assistant.detect(image, references=refs)
        item = {
            "family": family,
            "label": label,
            "defect": defect or "normal",
            "mask": mask,
            "map": report.anomaly_map,
            "score": report.pred_score,
            "pred_label": bool(report.pred_label),
            "location": report.location,
            "gt_location": location_words(mask),
        }
        group = (row_name(family, unseen), label)
        if text_budget.get(group, 0) < text_n / 2:  # half normal, half anomalous images per row
            text_budget[group] = text_budget.get(group, 0) + 1
            item["answer"] = assistant.analyze(image, references=refs, max_new_tokens=64).answer
            item["claim"] = answer_claim(item["answer"])
        items.append(item)
    by_family = {family: row_metrics([it for it in items if it["family"] == family]) for family in families}
    rows = {}
    for name in (
        "seen synthetic families",
        "seen real surfaces",
        "unseen synthetic families",
        "unseen real surfaces",
        "far real surfaces",
        "all",
    ):
        members = families if name == "all" else [f for f in families if row_name(f, unseen) == name]
        if members:
            row = row_metrics([it for it in items if it["family"] in members])
            # each family's own ranking, averaged (the MVTec AD convention)
            row["image_AUROC_family_mean"] = float(np.mean([by_family[f]["image_AUROC"] for f in members]))
            rows[name if name == "all" else f"{name} ({', '.join(members)})"] = row
    examples = [
        {k: it[k] for k in ("family", "label", "pred_label", "score", "location", "gt_location", "answer", "claim")}
        for it in items
        if "answer" in it
    ]
    return {"rows": rows, "by_family": by_family, "by_defect": by_defect(items, unseen), "examples": examples}


def by_defect(items: list[dict], unseen: list[str]) -> dict[str, dict[str, dict]]:
    """Per truth ("normal" or the defect type), seen and unseen families apart: images, verdicts right, and (for
    defects) location words right — which kinds of defect the model misses."""
    out: dict[str, dict[str, dict]] = {}
    for it in items:
        group = "unseen" if it["family"] in unseen else "seen"
        cell = out.setdefault(it["defect"], {}).setdefault(group, {"n": 0, "verdict_right": 0, "location_right": 0})
        cell["n"] += 1
        cell["verdict_right"] += int(it["pred_label"] == bool(it["label"]))
        cell["location_right"] += int(bool(it["label"]) and it["location"] == it["gt_location"])
    return out


def defect_table(table: dict[str, dict[str, dict]]) -> str:
    groups = [g for g in ("seen", "unseen") if any(g in cells for cells in table.values())]
    lines = [
        "| truth | " + " | ".join(f"{g}: verdict right | {g}: location right" for g in groups) + " |",
        "|---" * (1 + 2 * len(groups)) + "|",
    ]
    for truth, cells in table.items():
        parts = []
        for g in groups:
            c = cells.get(g)
            parts += (
                ["–", "–"]
                if c is None
                else [f"{c['verdict_right']}/{c['n']}", "–" if truth == "normal" else f"{c['location_right']}/{c['n']}"]
            )
        lines.append(f"| {truth} | " + " | ".join(parts) + " |")
    return "\n".join(lines)


def sample_conversation(assistant, seed: int, size: int, family: str = "wood") -> list[dict]:
    """A multi-turn chat about one held-out anomalous image: verdict, then describe / severity / cause."""
    _, image, _, _, _ = next(s for s in held_out_samples([family], 2, seed, size) if s[3])
    messages, turns = [], []
    for question in (
        "Is there any anomaly in this image? If so, where is it and what does it look like?",
        "Describe the defect.",
        "How severe is it?",
        "What is the likely cause?",
    ):
        messages.append({"role": "user", "content": question})
        answer = assistant.chat(messages, image, stream=False, max_new_tokens=64).strip()
        messages.append({"role": "assistant", "content": answer})
        turns.append({"question": question, "answer": answer})
    return turns


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval.default_model_quality", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default", help="checkpoint folder or 'default' (the embedded model)")
    parser.add_argument(
        "--n",
        type=int,
        default=100,
        help="images per family (half anomalous; at 100 the image AUROC still moves by up to 0.03 between seeds)",
    )
    parser.add_argument("--seed", type=int, default=1, help="generator seed (training used 0)")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    parser.add_argument("--families", nargs="+", default=None, help="families to draw (default: all)")
    parser.add_argument(
        "--unseen", nargs="+", default=None, help="families to report as unseen (default: those not in training)"
    )
    parser.add_argument(
        "--text-n", type=int, default=20, help="answers generated per row (half normal, half anomalous)"
    )
    parser.add_argument(
        "--shots", type=int, default=0, help="normal reference images per family (few-shot mode; default 0: zero-shot)"
    )
    parser.add_argument(
        "--zero-shot",
        choices=["single", "batch"],
        default="single",
        help="without --shots: each image on its own, or each family's images against each other",
    )
    parser.add_argument(
        "--defects",
        nargs="+",
        default=None,
        help="defect types drawn in turn (default: the standard seven; shading: a large darker or brighter region)",
    )
    parser.add_argument("--out", default=None, help="write the metrics and sample answers as JSON here")
    args = parser.parse_args(argv)

    import torch

    from assistant import AnomalyAssistant, checkpoint
    from data_prep.synth.families import all_families

    torch.manual_seed(0)
    families = args.families or list(all_families())
    from assistant.run_config import ConfigError

    if args.shots < 0:
        print(f"error: --shots must be ≥ 0, got {args.shots}", file=sys.stderr)
        return 2
    from data_prep.synth import ALL_DEFECT_TYPES

    wrong = sorted(set(args.defects or []) - set(ALL_DEFECT_TYPES))
    if wrong:
        print(f"error: unknown defect types {wrong}; the generator has {list(ALL_DEFECT_TYPES)}", file=sys.stderr)
        return 2
    unknown = sorted(set(families + (args.unseen or [])) - set(all_families()))
    if unknown:
        print(f"error: unknown families {unknown}; the generator has {list(all_families())}", file=sys.stderr)
        return 2
    try:
        trained = training_families(checkpoint.resolve(args.model))
        assistant = AnomalyAssistant.from_pretrained(args.model)
    except (checkpoint.ModelLoadError, ConfigError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    unseen = (
        args.unseen if args.unseen is not None else [f for f in families if trained is not None and f not in trained]
    )
    result = evaluate(
        assistant,
        families,
        unseen,
        args.n,
        args.seed,
        args.size,
        args.text_n,
        args.shots,
        args.zero_shot,
        args.defects,
    )
    result["conversation"] = sample_conversation(assistant, args.seed, args.size)
    command = "python -m eval.default_model_quality " + " ".join(sys.argv[1:] if argv is None else argv)
    mode = (
        f"{args.shots}-shot: {args.shots} normal references per family"
        if args.shots
        else f"zero-shot, {args.zero_shot}"
    )
    print(
        f"`{command.strip()}`  (model: {args.model}; {mode}; location rule: exact words of location_words(gt_mask))\n"
    )
    print(markdown_table(result["rows"]))
    print(
        "\nverdict accuracy at the threshold best on each row itself (an upper bound for any calibration): "
        + ", ".join(
            f"{name.split(' (')[0]} {_fmt(row['verdict_accuracy_best_threshold'])}"
            for name, row in result["rows"].items()
        )
    )
    print("\nby family:\n")
    print(markdown_table(result["by_family"], FAMILY_COLUMNS, first="family"))
    print("\nby truth (normal, or the defect type):\n")
    print(defect_table(result["by_defect"]))
    print("\nsample answers:")
    shown = [e for e in result["examples"] if not e["label"]][:3] + [e for e in result["examples"] if e["label"]][:3]
    for example in shown:
        truth = "anomalous" if example["label"] else "normal"
        print(
            f"  [{example['family']}, truth {truth}, verdict {'anomalous' if example['pred_label'] else 'normal'}, "
            f"location {example['location'] or '-'}] {example['answer']}"
        )
    print("\nsample conversation (held-out wood image):")
    for turn in result["conversation"]:
        print(f"  Q: {turn['question']}\n  A: {turn['answer']}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(jsonutil.dumps({"command": command.strip(), **result}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
