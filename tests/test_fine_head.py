"""The expert's fine head (`ExpertConfig.fine_stages`): the EfficientNet-Lite tower's stride-4 and stride-8 stages
segmented at stride 4, blended into the map and the score; saved and loaded with the checkpoint; trained in stage 1,
alone on top of a trained expert or with it."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
TILE = 64  # a 4 x 4 patch grid; the fine head's map is 16 x 16


def _tiny_model(fine_stages=(1, 2), vision=None):
    from assistant.backbones.tower import EfficientNetLiteVisionConfig
    from assistant.expert import ExpertConfig
    from assistant.modeling import AnomalyAssistantModel
    from assistant.testing import image_processor, tiny_config, train_tokenizer

    tokenizer = train_tokenizer()
    processor = image_processor(TILE)
    expert = ExpertConfig(
        feature_layers=[0, 1], embedding_dim=16, class_dim=16, predictor_dim=16, fine_stages=list(fine_stages)
    )
    config = tiny_config(
        vocab_size=len(tokenizer),
        vision_config=vision or EfficientNetLiteVisionConfig(image_size=TILE),
        vision_feature_select_strategy="full",
        image_grid_pinpoints=processor.image_grid_pinpoints,
        expert_config=expert.to_dict(),
    )
    torch.manual_seed(0)
    return AnomalyAssistantModel(config).eval(), processor, tokenizer


def _pixels(processor, images):
    inputs = processor(images, return_tensors="pt")
    return inputs["pixel_values"], inputs["image_sizes"].tolist()


def test_a_spot_the_fine_head_sees_raises_that_part_of_the_map_and_the_score():
    from conftest import random_image

    model, processor, _ = _tiny_model()
    pixels, sizes = _pixels(processor, [random_image(TILE, TILE, seed=1)])
    with torch.no_grad():
        _, _, fine = model.detect(pixels, sizes, with_fine=True)
    assert fine.shape == (1, TILE // 4, TILE // 4) and 0 <= float(fine.min()) <= float(fine.max()) <= 1

    def fixed(spot: bool):
        def forward(features):
            out = torch.full(features.shape[:1] + features.shape[2:], 0.02)
            if spot:
                out[:, :3, :3] = 0.98  # the top-left corner: the first patch of the 4 x 4 grid
            return out

        return forward

    results = {}
    for spot in (False, True):
        model.expert.fine_head.forward = fixed(spot)
        with torch.no_grad():
            maps, scores = model.detect(pixels, sizes)
        results[spot] = (maps[0][0], float(scores[0]))
    quiet, hot = results[False], results[True]
    assert hot[0][0] > quiet[0][0] + 0.1  # the spot's patch rises
    assert torch.allclose(hot[0][1:], quiet[0][1:])  # the rest of the map does not move
    # and so does the image's score: by the head's share of the spot's logit (0.25 x 7.8)
    rise = torch.logit(torch.tensor(hot[1]), eps=1e-6) - torch.logit(torch.tensor(quiet[1]), eps=1e-6)
    assert 1.5 < float(rise) < 2.5, float(rise)


def test_the_fine_head_is_saved_and_loaded_with_the_checkpoint(tmp_path):
    from conftest import random_image

    from assistant.modeling import AnomalyAssistantModel

    model, processor, _ = _tiny_model()
    model.save_pretrained(tmp_path)
    assert any(k.startswith("expert.fine_head.") for k in load_file(tmp_path / "model.safetensors"))
    loaded = AnomalyAssistantModel.from_pretrained(tmp_path).eval()
    assert loaded.expert.config.fine_stages == [1, 2]
    pixels, sizes = _pixels(processor, [random_image(TILE, TILE, seed=2), random_image(TILE, TILE, seed=3)])
    with torch.no_grad():
        before, after = model.detect(pixels, sizes), loaded.detect(pixels, sizes)
    assert torch.allclose(before[1], after[1], atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(before[0], after[0]))
    without = _tiny_model(fine_stages=())[0]  # the same expert weights but no fine head: other scores
    without.load_state_dict({k: v for k, v in model.state_dict().items() if ".fine_head." not in k}, strict=False)
    with torch.no_grad():
        assert not torch.allclose(without.detect(pixels, sizes)[1], after[1], atol=1e-4)


def test_a_fine_head_on_a_tower_without_finer_stages_is_refused():
    from transformers import CLIPVisionConfig

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    with pytest.raises(ValueError, match="EfficientNet-Lite"):
        _tiny_model(vision=vision)
    from assistant.expert import ExpertConfig

    with pytest.raises(ValueError, match="views 'base'"):  # its map is trained against each whole image's mask
        ExpertConfig(feature_layers=[0, 1], fine_stages=[1, 2], views="all")


def _config(out, *overrides):
    from train.config import load_config

    return load_config(
        ROOT / "configs/train/debug_tiny.yaml",
        [
            f"output_dir={out}",
            "stage=stage1",
            "data.synth.n=12",
            "data.synth.families=[wood]",
            "data.synth.size=64",
            "model.init.vision=efficientnet_lite0",
            "model.init.tile=64",
            "model.expert.feature_layers=[0,1]",
            "trainer.logging_steps=1",
            *overrides,
        ],
    )


def test_stage1_trains_a_fine_head_added_to_a_trained_expert_and_leaves_the_expert_as_it_was(tmp_path):
    from assistant.checkpoint import add_fine_head
    from train.build import load_model
    from train.run import run

    first = run(_config(tmp_path / "first", "stage1_steps=3"))["stage1"]
    data = tmp_path / "first" / "data" / "synth"
    second = run(
        _config(
            tmp_path / "second",
            f"model.path={first}",
            f"data.masked={data}",
            "model.expert.fine_stages=[1,2]",
            "stage1_trainable=[expert.fine_head.]",
            "stage1_steps=4",
            "stage1_lr=0.01",
        )
    )["stage1"]
    before, after = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    trained = {k for k in after if k.startswith("expert.fine_head.")}
    assert trained and set(after) - set(before) == trained
    assert all(torch.equal(before[k], after[k]) for k in before)  # the expert, the selector, everything else kept
    fresh, _, _ = load_model(first)  # the head as stage 1 added it, before its steps
    add_fine_head(fresh, _config(tmp_path / "x", "model.expert.fine_stages=[1,2]").model.expert, seed=0)
    start = {f"expert.{k}": v for k, v in fresh.expert.state_dict().items() if k.startswith("fine_head.")}
    assert set(start) == trained and any(not torch.equal(start[k], after[k]) for k in trained)
    from assistant.config import AnomalyAssistantConfig

    assert AnomalyAssistantConfig.from_pretrained(second).expert_config["fine_stages"] == [1, 2]


def test_stage1_refuses_to_train_nothing(tmp_path):
    from train.config import ConfigError
    from train.run import run

    with pytest.raises(ConfigError, match="train nothing"):
        run(_config(tmp_path / "none", "stage1_steps=1", "stage1_trainable=[no_such_module.]"))


def test_stage1_trains_a_fine_head_with_a_new_expert(tmp_path):
    from conftest import random_image

    from assistant import AnomalyAssistant
    from train.run import run

    model = run(_config(tmp_path / "joint", "stage1_steps=3", "model.expert.fine_stages=[1,2]"))["stage1"]
    weights = load_file(model / "model.safetensors")
    assert any(k.startswith("expert.fine_head.") for k in weights) and any(k.startswith("selector.") for k in weights)
    report = AnomalyAssistant.from_pretrained(str(model)).detect(random_image(64, 64, seed=4))  # with its head
    assert 0.0 <= report.pred_score <= 1.0 and report.anomaly_map.shape == (64, 64)
