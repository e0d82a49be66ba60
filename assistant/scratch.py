"""The parts a model built from scratch needs (no download): a byte-level BPE tokenizer trained on a corpus, with the
chat and image special tokens, and a LLaVA-OneVision image processor for a given tile size.

Training uses them for a recipe's `model.init` section (`train.build.init_model`); `assistant.testing` builds its tiny
checkpoints with them.
"""

from __future__ import annotations

from .processing import CHAT_TEMPLATE

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]

#: a few sentences of the assistant's domain, so that a tokenizer trained on them alone still covers its answers
DEFAULT_CORPUS = [
    "The image shows a normal part with no visible defect.",
    "Yes, there is an anomaly: a scratch in the upper left of the surface.",
    "No, the object looks normal and free of defects.",
    "A small stain appears near the center; it looks like contamination.",
    "The crack runs across the lower right; it is severe and likely caused by impact.",
    "Describe the defect. How severe is it? What is the likely cause?",
    "Is there any anomaly in the image? Where is it located?",
    "user assistant system",
]


def train_tokenizer(corpus: list[str] | None = None, vocab_size: int = 400, special_tokens=None, chat_template=None):
    """A byte-level BPE tokenizer trained on `corpus`, with the chat and image special tokens (this project's, or the
    given `special_tokens`, the first of them the padding token, and `chat_template`)."""
    special_tokens = special_tokens or SPECIAL_TOKENS
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus or DEFAULT_CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=special_tokens[1:],
    )
    fast.chat_template = chat_template or CHAT_TEMPLATE
    return fast


def image_processor(tile: int, clip_normalisation: bool = False, max_tiles_side: int = 3, mean_std=None):
    """LLaVA-OneVision's PIL image processor for `tile`-pixel crops, anyres up to `max_tiles_side` tiles a side;
    CLIP's normalisation, SigLIP's (mean and std 0.5) or the given `mean_std` (a pretrained backbone's)."""
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil

    pinpoints = [[tile * i, tile * j] for i in range(1, max_tiles_side + 1) for j in range(1, max_tiles_side + 1)]
    kwargs = {"size": {"height": tile, "width": tile}, "image_grid_pinpoints": pinpoints}
    if mean_std is not None:
        kwargs.update(image_mean=list(mean_std[0]), image_std=list(mean_std[1]))
    elif not clip_normalisation:  # SigLIP's
        kwargs.update(image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    return LlavaOnevisionImageProcessorPil(**kwargs)
