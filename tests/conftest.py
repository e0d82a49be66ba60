"""Tiny random checkpoints, written once per test session with the real classes' `save_pretrained`."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import pytest
from PIL import Image


@pytest.fixture(scope="session")
def clip_llama(tmp_path_factory):
    from assistant.testing import tiny_assistant

    return tiny_assistant(tmp_path_factory.mktemp("ckpt") / "clip-llama", vision="clip", text="llama")


@pytest.fixture(scope="session")
def siglip_qwen2(tmp_path_factory):
    from assistant.testing import tiny_assistant

    return tiny_assistant(tmp_path_factory.mktemp("ckpt") / "siglip-qwen2", vision="siglip", text="qwen2")


@pytest.fixture(scope="session")
def llava_ov(tmp_path_factory):
    from assistant.testing import tiny_llava_onevision

    return tiny_llava_onevision(tmp_path_factory.mktemp("ckpt") / "llava-ov")


def strict_json(text: str):
    """Parse JSON the way jq or a browser would: NaN and Infinity are not JSON."""

    def reject(constant):
        raise AssertionError(f"non-standard JSON constant {constant} written")

    return json.loads(text, parse_constant=reject)


def random_image(height, width, seed=0, mode="RGB"):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).convert(mode)


@pytest.fixture
def image_file(tmp_path):
    path = tmp_path / "part.png"
    random_image(60, 80).save(path)
    return path
