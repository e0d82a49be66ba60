"""Stage-2 training data: LLaVA conversations tokenised with the model's own processor, and their collator.

Stage-2 inputs are built with the model's `AssistantProcessor` (chat template, `<image>` expansion,
tokenizer) so training and inference see the same token layout; only assistant turns carry labels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from data_prep.records import ANOMALOUS, Record

from .data import Skipped, load_rgb

IGNORE_INDEX = -100
ROLE = {"human": "user", "gpt": "assistant"}


def chat_messages(conversations: list[dict]) -> list[dict]:
    """LLaVA turns → chat messages; the image goes first in the first user turn, as at inference."""
    messages = []
    for index, turn in enumerate(conversations):
        text = turn["value"]
        if index == 0:
            text = text.replace("<image>", "").strip()
            messages.append({"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]})
        else:
            messages.append({"role": ROLE[turn["from"]], "content": text.strip()})
    return messages


def level_for(label: int | None) -> str | None:
    """The suspicion level shown to the LLM during training: from the ground truth label."""
    if label is None:
        return None
    return "highly" if label == ANOMALOUS else "slightly"


def where_for(record: Record) -> str:
    """A marker's `{where}` during training: the ground-truth location of an anomalous record, else ""."""
    from assistant.processing import where_text

    return where_text(record.extra.get("location")) if record.label == ANOMALOUS else ""


def encode_conversation(
    processor,
    conversations: list[dict],
    image_size: tuple[int, int],
    level: str | None,
    where: str = "",
    expansions: dict | None = None,
) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one conversation: the chat rendered with the model's template, `<image>`
    expanded into the exact image (and look-twice) token count, labels only on assistant text.

    `expansions`, when given, keeps each (image size, level, where)'s expansion ids for the next conversations."""
    tokenizer = processor.tokenizer
    messages = chat_messages(conversations)
    encoded = tokenizer.apply_chat_template(
        messages,
        chat_template=processor.chat_template,
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
        add_generation_prompt=False,
    )
    ids, assistant = list(encoded["input_ids"]), list(encoded["assistant_masks"])
    image_id = processor.config.image_token_index
    positions = [i for i, t in enumerate(ids) if t == image_id]
    if len(positions) != 1:
        raise ValueError(f"the rendered chat holds {len(positions)} image tokens, expected 1")
    key = (tuple(image_size), level, where)
    expansion = expansions.get(key) if expansions is not None else None
    if expansion is None:
        expansion = tokenizer(processor.expand_image(image_size, level, where), add_special_tokens=False)["input_ids"]
        if expansions is not None:
            expansions[key] = expansion
    at = positions[0]
    ids = ids[:at] + expansion + ids[at + 1 :]
    labels = [t if m else IGNORE_INDEX for t, m in zip(ids[:at], assistant[:at])]
    labels += [IGNORE_INDEX] * len(expansion)
    labels += [t if m else IGNORE_INDEX for t, m in zip(ids[at + len(expansion) :], assistant[at + 1 :])]
    return ids, labels


#: conversations from which `Conversations` tokenises in one forked process per core
PARALLEL_ENCODE_FROM = 2000


class Conversations(Dataset):
    """Tokenised conversations with their image pixels; records longer than `max_length` are dropped up front.

    Each conversation is tokenised once, here (its length decides whether it is kept), and the token ids and
    labels are kept as int32 arrays (the default model's 32,000 conversations: about 50 MB), so an item costs
    only its image's decode and preprocessing. From `PARALLEL_ENCODE_FROM` conversations the tokenising runs in one
    forked process per core, and each (image size, level, location)'s `<image>` expansion is tokenised once.
    """

    def __init__(
        self, records: list[Record], processor, with_levels: bool, max_length: int = 2048, workers: int | None = None
    ):
        from data_prep.parallel import default_workers, ordered_map

        self.processor, self.with_levels = processor, with_levels
        self._expansions: dict = {}
        if (
            workers is None
        ):  # forked workers pay from a few thousand (8,000 of the default model's: 4.0-4.2 s against 11.2 s)
            workers = default_workers() if len(records) >= PARALLEL_ENCODE_FROM else 1
        self.records, problems = [], []
        for record, (size, ids, labels) in zip(
            records, ordered_map(self._encode_record, records, workers, chunksize=256)
        ):
            if len(ids) > max_length:
                problems.append(f"{record.image}: {len(ids)} tokens > data.max_length {max_length}")
                continue
            self.records.append((record, size, ids, labels))
        self.skipped = Skipped(problems, len(records))

    def _encode_record(self, record: Record) -> tuple[tuple[int, int], np.ndarray, np.ndarray]:
        with Image.open(record.image) as image:
            size = (image.height, image.width)
        ids, labels = self._encode(record, size)
        return size, np.asarray(ids, dtype=np.int32), np.asarray(labels, dtype=np.int32)

    def _encode(self, record: Record, size):
        level = level_for(record.label) if self.with_levels else None
        where = where_for(record) if self.with_levels else ""
        return encode_conversation(self.processor, record.extra["conversations"], size, level, where, self._expansions)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        record, size, ids, labels = self.records[index]
        image = load_rgb(record.image)
        return {
            "input_ids": torch.from_numpy(ids).long(),
            "labels": torch.from_numpy(labels).long(),
            "pixel_values": self.processor.pixels_of(image),
            "image_sizes": torch.tensor(size),
        }


@dataclass
class ConversationCollator:
    pad_token_id: int

    def __call__(self, batch: list[dict]) -> dict:
        length = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), length), IGNORE_INDEX, dtype=torch.long)
        attention = torch.zeros((len(batch), length), dtype=torch.long)
        for row, b in enumerate(batch):  # right padding: positions stay those of an unpadded sequence
            n = len(b["input_ids"])
            ids[row, :n], labels[row, :n], attention[row, :n] = b["input_ids"], b["labels"], 1
        return {
            "input_ids": ids,
            "labels": labels,
            "attention_mask": attention,
            "pixel_values": torch.cat([b["pixel_values"] for b in batch]),
            "image_sizes": torch.stack([b["image_sizes"] for b in batch]),
        }
