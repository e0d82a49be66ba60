"""The expert's per-image input (`ExpertConfig.input_norm="image"`, the default model's): the patch map reads each
crop's features relative to the crop's own median patch and spread."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from assistant.expert import AnomalyExpert, ExpertConfig, relative_to_image


def test_relative_to_image_centres_on_the_median_patch_and_scales_to_unit_spread():
    torch.manual_seed(0)
    features = torch.randn(3, 16, 8) * 5 + 2
    relative = relative_to_image(features)
    torch.testing.assert_close(relative.median(dim=1).values, torch.zeros(3, 8), atol=1e-5, rtol=0)
    torch.testing.assert_close(relative.pow(2).mean(dim=(1, 2)), torch.ones(3), atol=1e-4, rtol=0)
    flat = torch.full((1, 16, 8), 0.7)  # a crop with no variation stays finite
    assert torch.isfinite(relative_to_image(flat)).all()


@pytest.mark.parametrize("input_norm", ["absolute", "image"])
def test_a_surfaces_overall_look_does_not_move_the_map_with_per_image_input(input_norm):
    # the same defect pattern on a surface whose features are all shifted and scaled (a brighter, busier or new
    # kind of surface): per-image input gives the same map, absolute input does not
    torch.manual_seed(0)
    config = ExpertConfig(
        feature_layers=[0, 1], embedding_dim=16, class_dim=16, predictor_dim=16, input_norm=input_norm
    )
    expert = AnomalyExpert(config, vision_hidden_size=12, num_patches=16).eval()
    levels = [torch.randn(2, 16, 12) for _ in range(2)]
    base = torch.randn(2, 16, 12)
    shift, scale = torch.randn(12), 3.0
    with torch.no_grad():
        before = expert(levels, base)[0]
        after = expert([level * scale + shift for level in levels], base)[0]
    if input_norm == "image":
        torch.testing.assert_close(after, before, atol=1e-4, rtol=0)
    else:
        assert not torch.allclose(after, before, atol=1e-3)


def test_per_image_input_survives_save_and_load(tmp_path):
    # a checkpoint saved with the option scores with it after loading: the same weights read absolutely give
    # another map
    from assistant import AnomalyAssistant
    from assistant.testing import tiny_assistant, tiny_config

    expert = {**tiny_config().expert_config, "input_norm": "image"}
    path = tiny_assistant(tmp_path / "m", expert_config=expert)
    assert json.loads((path / "config.json").read_text())["expert_config"]["input_norm"] == "image"
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    loaded = AnomalyAssistant.from_pretrained(path)
    assert loaded.model.expert.config.input_norm == "image"
    relative = loaded.detect(image).anomaly_map
    absolute = AnomalyAssistant.from_pretrained(path)
    absolute.model.expert.config = ExpertConfig.from_dict({**expert, "input_norm": "absolute"})
    assert not np.allclose(absolute.detect(image).anomaly_map, relative, atol=1e-4)


def test_bad_input_norm_is_rejected():
    with pytest.raises(ValueError, match="input_norm"):
        ExpertConfig(feature_layers=[1, 2], input_norm="batch")
