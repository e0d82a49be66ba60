"""The score head's contrast input (`ExpertConfig.score_input="contrast"`)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from assistant.expert import ExpertConfig, normal_context


def test_normal_context_averages_the_patches_the_map_finds_normal():
    torch.manual_seed(0)
    features = torch.randn(2, 9, 5)  # two crops of one image, 9 patches each
    anomaly_map = torch.zeros(2, 9)
    anomaly_map[0, :3] = 1.0  # three certain defects: left out
    anomaly_map[1, 4] = 0.5  # a half-suspicious patch: counts half
    weights = torch.ones(2, 9)
    weights[0, :3] = 0.0
    weights[1, 4] = 0.5
    expected = (features * weights[..., None]).sum((0, 1)) / weights.sum()
    torch.testing.assert_close(normal_context(features, anomaly_map), expected)


def _score(model, features, anomaly_map):
    """The image score given the expert's map: look twice, then the head (as `_look_once` does)."""
    with torch.no_grad():
        tokens, weights = model.selector(features, anomaly_map, anomaly_map.mean(-1))
        return model.expert.score(tokens, weights, features, anomaly_map)


@pytest.mark.parametrize("score_input", ["tokens", "contrast"])
def test_contrast_score_ignores_what_the_whole_image_shares(tmp_path, score_input):
    # for a given map, a shift shared by every patch (a new texture's look, a colour cast) moves the look-twice
    # tokens and the image's normal context alike: the contrast head does not see it, the token head does
    # (exactly with the top-k selector, whose tokens are patch features; the pool selector's attention moves too)
    from assistant import AnomalyAssistant
    from assistant.selector import SelectorConfig
    from assistant.testing import tiny_assistant, tiny_config

    expert = {**tiny_config().expert_config, "score_input": score_input}
    selector = SelectorConfig(mode="topk", num_tokens=4, attention_dim=16).to_dict()
    path = tiny_assistant(tmp_path / score_input, expert_config=expert, selector_config=selector)
    assistant = AnomalyAssistant.from_pretrained(path)
    assert json.loads((path / "config.json").read_text())["expert_config"]["score_input"] == score_input
    model = assistant.model.eval()
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    pixels = assistant.processor.preprocess([image])
    with torch.no_grad():
        features, levels, _ = model.vision_features(pixels["pixel_values"], pixels["image_sizes"])
        features = features[:1]
        _, _, learned = model.expert([level[:1] for level in levels], features)
    shift = 3.0 * torch.randn(features.shape[-1], generator=torch.Generator().manual_seed(0))
    before, after = _score(model, features, learned), _score(model, features + shift, learned)
    if score_input == "contrast":
        torch.testing.assert_close(after, before, atol=1e-5, rtol=0)
    else:
        assert not torch.allclose(after, before, atol=1e-3)
    # and the detection path gives the same score after a save and load
    again = AnomalyAssistant.from_pretrained(path).detect(image)
    assert again.pred_score == pytest.approx(assistant.detect(image).pred_score, abs=1e-6)


def test_bad_score_input_is_rejected():
    with pytest.raises(ValueError, match="score_input"):
        ExpertConfig(feature_layers=[1, 2], score_input="difference")
